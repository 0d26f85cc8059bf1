"""Orbax checkpoints: saved sharded with OCDBT, restored onto another mesh with the same weights
and logits, accepted by load_model, and a damaged one is a clear error."""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.config import ModelConfig
from rtpjax.layers.attention import DenseAttention, DenseCache, DenseMeta
from rtpjax.models import llama
from rtpjax.sharding.mesh import make_mesh
from rtpjax.weights.checkpoint import load_model, open_checkpoint
from rtpjax.weights.loader import load_params
from rtpjax.weights.orbax_io import (
    MARKER,
    OrbaxCheckpoint,
    is_orbax_checkpoint,
    load_orbax_params,
    save_orbax,
)
from rtpjax.weights.safetensors_io import SafetensorsCheckpoint
from tests.conftest import FIXTURES
from tests.weights.test_loading import assert_same_params

MODELS = FIXTURES / "models"
TOKENIZER = FIXTURES / "tokenizer" / "smollm2"


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward_logits(params, ids, *, cfg):
    t = ids.shape[0]
    attn = DenseAttention(scale=cfg.head_dim**-0.5, sliding_window=cfg.sliding_window)
    z = jnp.zeros((t, cfg.num_kv_heads, cfg.head_dim), jnp.float32)
    pos = jnp.arange(t, dtype=jnp.int32)
    x, _, _ = llama.forward(
        params, cfg, ids, pos, [DenseCache(z, z)] * cfg.num_layers, DenseMeta(pos, pos[0]), attn
    )
    return llama.logits(params, x)


def hf_params(name: str, tp: int = 1, dtype=jnp.float32):
    d = MODELS / name
    cfg = ModelConfig.from_hf(d).with_tensor_parallel(tp)
    mesh = make_mesh(tensor_parallel_size=tp)
    return cfg, mesh, load_params(SafetensorsCheckpoint(d), cfg, dtype, mesh)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """llama3_gqa4 (8 query heads, 2 KV heads, 9 files) saved from one device."""
    out = tmp_path_factory.mktemp("orbax") / "llama3_gqa4"
    cfg, _, params = hf_params("llama3_gqa4")
    with open(MODELS / "llama3_gqa4" / "config.json") as f:
        hf_config = json.load(f)
    save_orbax(out, params, cfg, hf_config=hf_config, tokenizer_from=TOKENIZER)
    return out


def test_layout_on_disk(saved):
    assert is_orbax_checkpoint(saved)
    assert (saved / "params" / "manifest.ocdbt").is_file()  # OCDBT, not one file per array
    with open(saved / "config.json") as f, open(MODELS / "llama3_gqa4" / "config.json") as g:
        assert json.load(f) == json.load(g)  # the HF config travels verbatim
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(
        os.listdir(saved)
    )
    assert json.loads((saved / MARKER).read_text())["dtype"] == "float32"
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        save_orbax(saved, None, None)


@pytest.mark.parametrize(("tp", "dtype"), [(1, jnp.float32), (2, jnp.bfloat16), (8, jnp.float32)])
def test_restore_on_another_mesh_equals_hf_load(saved, tp, dtype):
    """Saved from one device; restored at tp=2 (K split) and tp=8 (K=2 replicated 4x)."""
    cfg, mesh, ref = hf_params("llama3_gqa4", tp, dtype)
    got = load_orbax_params(saved, cfg, dtype, mesh)
    assert_same_params(ref, got)


def test_saved_tp1_loaded_tp4_identical_logits(saved):
    ids = jnp.asarray(np.load(MODELS / "llama3_gqa4" / "golden.npz")["input_ids"])
    cfg, mesh, hf = hf_params("llama3_gqa4", 4)
    got = load_orbax_params(saved, cfg, jnp.float32, mesh)
    with jax.set_mesh(mesh):
        want = np.asarray(forward_logits(hf, ids, cfg=cfg))
        out = np.asarray(forward_logits(got, ids, cfg=cfg))
    np.testing.assert_array_equal(out, want)
    cfg1, mesh1, hf1 = hf_params("llama3_gqa4", 1)
    with jax.set_mesh(mesh1):
        one = np.asarray(forward_logits(hf1, ids, cfg=cfg1))
    np.testing.assert_allclose(out, one, rtol=1e-5, atol=1e-5 * np.abs(one).max())


def test_save_from_replicated_mesh_stores_checkpoint_heads(saved, tmp_path):
    cfg8, _, p8 = hf_params("llama3_gqa4", 8)
    save_orbax(tmp_path / "from_tp8", p8, cfg8)
    a, b = OrbaxCheckpoint(saved), OrbaxCheckpoint(tmp_path / "from_tp8")
    assert a.metadata() == b.metadata()
    ra, rb = a.restore(), b.restore()
    for path in ra:
        np.testing.assert_array_equal(ra[path], rb[path], err_msg=path)


def test_load_model_accepts_orbax_directory(saved):
    ckpt = open_checkpoint(saved)
    assert ckpt.kind == "orbax"
    lm = load_model(saved, dtype="float32", tensor_parallel_size=2)
    _, _, ref = hf_params("llama3_gqa4", 2)
    assert_same_params(ref, lm.params)
    assert lm.tokenizer.encode("hello") == load_model(
        MODELS / "llama_tied", tokenizer=TOKENIZER
    ).tokenizer.encode("hello")


def test_orbax_as_hf_tensors_bit_exact(saved):
    ckpt = OrbaxCheckpoint(saved)
    src = SafetensorsCheckpoint(MODELS / "llama3_gqa4")
    assert sorted(ckpt.tensor_names()) == sorted(src.tensor_names())
    for name, a in ckpt.tensors():
        b = src.tensor(name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name


def test_damaged_checkpoint_is_a_clear_error(saved, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    data = [os.path.join(r, f) for r, _, fs in os.walk(bad / "params" / "d") for f in fs]
    assert data
    for f in data:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    cfg = ModelConfig.from_hf(MODELS / "llama3_gqa4")
    with pytest.raises(ValueError, match=r"params: unreadable Orbax checkpoint") as e:
        load_orbax_params(bad, cfg, jnp.float32)
    assert "\n" not in str(e.value)


def test_config_that_does_not_match_the_weights(saved, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 64
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"w_gate_up has shape \(2, 128, 64\), config.json implies"
        r" \(2, 64, 64\)",
    ):
        load_model(bad, dtype="float32")
