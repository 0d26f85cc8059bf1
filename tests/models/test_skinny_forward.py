"""The model's decode path through the weight-streaming kernel (kernels/skinny_matmul, interpret
mode on CPU) gives the XLA path's hidden states and logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.layers.attention import DenseAttention, DenseCache, DenseMeta
from rtpjax.models import llama
from rtpjax.models.presets import preset, random_params


def test_use_skinny_rules():
    x = jnp.zeros((4, 128), jnp.bfloat16)
    assert llama.use_skinny(x, "skinny") and not llama.use_skinny(x, "xla")
    assert llama.use_skinny(x, "auto") == (jax.default_backend() == "gpu")
    assert not llama.use_skinny(jnp.zeros((16, 128), jnp.bfloat16), "auto")
    with pytest.raises(ValueError, match="matmul='cublas' must be one of"):
        llama.use_skinny(x, "cublas")


def test_forward_and_logits_match_xla_for_decode_sized_steps():
    # Widths the kernel covers (K multiple of 128, N of 16); 2 layers, GQA 2.
    cfg = dataclasses.replace(
        preset("tiny"), hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
        head_dim=64, num_layers=2, vocab_size=512,
    )  # fmt: skip
    params = random_params(cfg, jnp.float32)
    tokens = jnp.array([5, 17, 300], jnp.int32)
    positions = jnp.arange(3, dtype=jnp.int32)
    attention = DenseAttention(scale=cfg.head_dim**-0.5)
    zeros = jnp.zeros((8, cfg.num_kv_heads, cfg.head_dim), jnp.float32)
    caches = [DenseCache(zeros, zeros) for _ in range(cfg.num_layers)]
    meta = DenseMeta(positions=positions, start=positions[0])
    out = {}
    for impl in ("xla", "skinny"):
        hidden, _, per_layer = llama.forward(
            params, cfg, tokens, positions, caches, meta, attention,
            collect_hidden=True, matmul=impl,
        )  # fmt: skip
        out[impl] = (per_layer, llama.logits(params, hidden, matmul=impl))
    for a, b in zip(out["xla"][0], out["skinny"][0], strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(
        np.asarray(out["skinny"][1]), np.asarray(out["xla"][1]), rtol=2e-5, atol=2e-5
    )
