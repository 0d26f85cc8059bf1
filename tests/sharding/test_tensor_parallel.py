"""Tensor parallelism 2, 4 and 8 on 8 simulated CPU devices gives the one-device logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.config import ModelConfig
from rtpjax.layers.attention import DenseAttention, DenseCache, DenseMeta
from rtpjax.models import llama
from rtpjax.sharding.mesh import make_mesh
from rtpjax.weights.loader import load_params
from rtpjax.weights.safetensors_io import SafetensorsCheckpoint
from tests.conftest import FIXTURES


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


def run(name: str, tp: int):
    d = FIXTURES / "models" / name
    cfg = ModelConfig.from_hf(d).with_tensor_parallel(tp)
    mesh = make_mesh(tensor_parallel_size=tp)
    params = load_params(SafetensorsCheckpoint(d), cfg, jnp.float32, mesh=mesh)
    ids = jnp.asarray(np.load(d / "golden.npz")["input_ids"])
    with jax.set_mesh(mesh):
        out = forward_logits(params, ids, cfg=cfg)
    return cfg, params, np.asarray(out)


@pytest.mark.parametrize("name", ["llama_mha8", "llama3_gqa4"])  # 8 q / 8 kv heads, 8 q / 2 kv
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tp_logits_match_single_device(name, tp):
    assert len(jax.devices()) >= 8
    _, _, ref = run(name, 1)
    cfg, params, out = run(name, tp)
    # The weights really are split: each device holds 1/tp of the fused qkv projection.
    w = params.layers[0].w_qkv
    assert {s.data.shape[0] for s in w.addressable_shards} == {cfg.num_kv_heads // tp}
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_kv_heads_replicated_when_tp_exceeds_them():
    cfg = ModelConfig.from_hf(FIXTURES / "models" / "llama3_gqa4")  # K = 2
    assert cfg.with_tensor_parallel(2).num_kv_heads == 2
    wide = cfg.with_tensor_parallel(8)
    assert (wide.num_kv_heads, wide.q_per_kv, wide.kv_head_replication) == (8, 1, 4)


def test_indivisible_heads_raise_clearly():
    # SmolLM2-135M: 9 query heads, 3 KV heads.
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=32,
        hidden_size=576,
        intermediate_size=64,
        num_layers=1,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
    )
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=2 must divide num_attention_heads=9"
    ):
        cfg.with_tensor_parallel(2)
    assert cfg.with_tensor_parallel(3).num_kv_heads == 3
    assert cfg.with_tensor_parallel(9).num_kv_heads == 9
    eight_kv = ModelConfig(
        model_type="llama",
        vocab_size=32,
        hidden_size=64,
        intermediate_size=64,
        num_layers=1,
        num_heads=24,
        num_kv_heads=8,
        head_dim=8,
    )
    with pytest.raises(ValueError, match="num_key_value_heads=8"):
        eight_kv.with_tensor_parallel(
            12
        )  # divides 24 query heads, neither divides nor is a multiple of 8
