"""Tiny random-weight models of every family against transformers' stored outputs: one weight
bitwise, then every layer's hidden state, then the logits, then 32 greedy tokens."""

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.config import ModelConfig
from rtpjax.engine.reference import DenseGenerator
from rtpjax.layers.attention import DenseAttention, DenseCache, DenseMeta
from rtpjax.models import llama
from rtpjax.weights.loader import load_params
from rtpjax.weights.safetensors_io import SafetensorsCheckpoint
from tests.conftest import FIXTURES

MODELS = sorted(p.name for p in (FIXTURES / "models").iterdir() if (p / "golden.npz").exists())


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.cache
def load(name: str):
    d = FIXTURES / "models" / name
    cfg = ModelConfig.from_hf(d)
    params = load_params(SafetensorsCheckpoint(d), cfg, jnp.float32)
    return cfg, params, dict(np.load(d / "golden.npz"))


def full_forward(cfg, params, ids):
    t = len(ids)
    attn = DenseAttention(scale=cfg.head_dim**-0.5, sliding_window=cfg.sliding_window)
    z = jnp.zeros((t, cfg.num_kv_heads, cfg.head_dim), jnp.float32)
    caches = [DenseCache(z, z)] * cfg.num_layers
    pos = jnp.arange(t, dtype=jnp.int32)
    x, _, hidden = llama.forward(
        params,
        cfg,
        jnp.asarray(ids),
        pos,
        caches,
        DenseMeta(pos, pos[0]),
        attn,
        collect_hidden=True,
    )
    return x, hidden, llama.logits(params, x)


def test_fixture_set_covers_every_family():
    types = {
        json.loads((FIXTURES / "models" / m / "config.json").read_text())["model_type"]
        for m in MODELS
    }
    assert types == {"llama", "mistral", "qwen2", "qwen3"}
    assert len(MODELS) >= 7


@pytest.mark.parametrize("name", MODELS)
def test_one_weight_bitwise(name):
    cfg, params, _ = load(name)
    ckpt = SafetensorsCheckpoint(FIXTURES / "models" / name)
    K, G, H, D = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.hidden_size
    q = np.asarray(params.layers[1].w_qkv[:, :G]).reshape(K * G * H, D)
    np.testing.assert_array_equal(q, ckpt.tensor("model.layers.1.self_attn.q_proj.weight"))
    v = np.asarray(params.layers[0].w_qkv[:, G + 1]).reshape(K * H, D)
    np.testing.assert_array_equal(v, ckpt.tensor("model.layers.0.self_attn.v_proj.weight"))


@pytest.mark.parametrize("name", MODELS)
def test_hidden_states_and_logits(name):
    cfg, params, g = load(name)
    x, hidden, logits = full_forward(cfg, params, g["input_ids"])
    ref = g["hidden_states"]  # [L+1, T, D]; HF's last entry is after the final norm
    assert ref.shape[0] == cfg.num_layers + 1
    for i in range(cfg.num_layers):
        assert rel_err(hidden[i], ref[i]) < 1e-4, f"layer {i} input differs"
    assert rel_err(x, ref[-1]) < 1e-4, "final normed hidden state differs"
    assert rel_err(logits, g["logits"]) < 1e-4
    np.testing.assert_allclose(
        logits, g["logits"], rtol=1e-4, atol=1e-4 * np.abs(g["logits"]).max()
    )


@pytest.mark.parametrize("name", MODELS)
def test_greedy_32_tokens(name):
    cfg, params, g = load(name)
    out = DenseGenerator(cfg, params).generate(list(g["input_ids"]), 32)
    assert out == list(g["greedy"])


def test_hf_config_both_rope_styles():
    v5 = ModelConfig.from_hf(FIXTURES / "models" / "llama3_gqa4")
    assert v5.rope_scaling.rope_type == "llama3" and v5.rope_theta == 500000.0
    legacy = ModelConfig.from_hf(FIXTURES / "models" / "llama2_bias")
    raw = json.loads((FIXTURES / "models" / "llama2_bias" / "config.json").read_text())
    assert "rope_parameters" not in raw and "rope_theta" in raw
    assert legacy.rope_scaling is None and legacy.o_bias and legacy.qkv_bias
