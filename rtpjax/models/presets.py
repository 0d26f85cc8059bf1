"""Shapes of well-known models, for benchmarks with random weights generated on the device."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rtpjax.config import ModelConfig, RopeScaling
from rtpjax.models import llama
from rtpjax.models.params import init, normal_init
from rtpjax.sharding import rules

_LLAMA3_ROPE = RopeScaling(
    "llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)

PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
    "llama3-70b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
    "llama3-1b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
    # A few-MB model of real structure, for CPU smoke runs of the benchmarks.
    "tiny": ModelConfig(
        model_type="llama",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
    ),
    "smollm2-135m": ModelConfig(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; known: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def random_params(cfg: ModelConfig, dtype=jnp.bfloat16, mesh=None, seed: int = 0) -> llama.Params:
    """Random weights of cfg's shapes, created directly on the devices in their shardings.

    Scaled like a trained model's (std 1/sqrt(fan-in)) so activations stay in range and sampling is
    not
    degenerate; the values themselves carry no meaning."""
    spec = llama.spec(cfg, dtype)
    spec = jax.tree.map(
        lambda i: (
            dataclasses.replace(i, init=normal_init(i.shape[-1] ** -0.5)) if len(i.shape) > 1 else i
        ),
        spec,
        is_leaf=lambda x: hasattr(x, "axes"),
    )
    shard = None if mesh is None else rules.shardings(spec, mesh)
    return init(spec, jax.random.key(seed), shard)
