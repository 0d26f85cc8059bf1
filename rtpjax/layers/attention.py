"""The attention interface the model calls, and its dense (unpaged) implementation.

The model computes q, k, v and hands them to an `Attention` object together with that layer's cache
and the step's metadata; the object writes the new keys/values into the cache and returns the
attention output. Implementations:
- `DenseAttention` (here): one sequence, a contiguous cache [S, K, H]: the reference generator's.
- `PagedAttention` (layers/paged_attention.py): a ragged batch over the paged KV cache (the
  engine's).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp


class Attention(Protocol):
    """Contract: `__call__` is pure and traceable; the implementation object is static (hashable),
    so it can be closed over by jit. q: [T, K, G, H]; k, v: [T, K, H] (already rotated and normed).
    Returns (out [T, K, G, H] in q's dtype, the updated cache for this layer)."""

    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, cache: Any, meta: Any
    ) -> tuple[jax.Array, Any]: ...


class DenseCache(NamedTuple):
    k: jax.Array  # [S, K, H]
    v: jax.Array  # [S, K, H]


class DenseMeta(NamedTuple):
    positions: jax.Array  # i32[T]  position of each query token; padding tokens continue the run
    start: jax.Array  # i32[]  cache row the first token writes to (= positions[0])


@dataclasses.dataclass(frozen=True)
class DenseAttention:
    """Single-sequence attention over a contiguous cache; the oracle the paged engine is held to."""

    scale: float
    sliding_window: int | None = None
    soft_cap: float | None = None

    def __call__(self, q, k, v, cache: DenseCache, meta: DenseMeta):
        k_all = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), meta.start, 0)
        v_all = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), meta.start, 0)
        out = dense_attention(
            q,
            k_all,
            v_all,
            meta.positions,
            scale=self.scale,
            sliding_window=self.sliding_window,
            soft_cap=self.soft_cap,
        )
        return out, DenseCache(k_all, v_all)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """q: [T, K, G, H]; k, v: [S, K, H] with key j at position j; q_positions: i32[T].
    Query i sees key j when j <= pos_i and (no window or pos_i - j < window)."""
    scores = jnp.einsum("TKGH,SKH->KGTS", q, k, preferred_element_type=jnp.float32) * scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    pos = q_positions[:, None]  # [T, 1]
    key_pos = jnp.arange(k.shape[0])[None, :]  # [1, S]
    visible = key_pos <= pos
    if sliding_window is not None:
        visible &= pos - key_pos < sliding_window
    scores = jnp.where(visible[None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [K, G, T, S]
    return jnp.einsum("KGTS,SKH->TKGH", probs, v).astype(q.dtype)
