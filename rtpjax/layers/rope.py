"""Rotary embeddings (HF's half-split layout) with 'default', 'linear' and 'llama3' scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.config import ModelConfig


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """f32[H/2] inverse frequencies, computed in float32 as transformers computes them."""
    h = cfg.head_dim
    freq = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, h, 2, dtype=np.float32) / h))
    freq = freq.astype(np.float32)
    s = cfg.rope_scaling
    if s is None or s.rope_type == "default":
        return freq
    if s.rope_type == "linear":
        return (freq / np.float32(s.factor)).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    old_len = np.float32(s.original_max_position_embeddings)
    low_wavelen = old_len / np.float32(s.low_freq_factor)
    high_wavelen = old_len / np.float32(s.high_freq_factor)
    wavelen = np.float32(2 * math.pi) / freq
    scaled = np.where(wavelen > low_wavelen, freq / np.float32(s.factor), freq).astype(np.float32)
    smooth = (old_len / wavelen - np.float32(s.low_freq_factor)) / np.float32(
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def cos_sin(positions: jax.Array, freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """positions: i32[T] → cos, sin: [T, H] in `dtype` (HF casts them to the activations' dtype)."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(freq)[None, :]  # f32[T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # f32[T, H]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [T, ..., H]; cos, sin: [T, H]. Rotates the two halves of H (HF's rotate_half)."""
    shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
