"""Write this step's keys and values into the paged KV cache, in place.

kv_pages [P, page_size, 2K, H] holds keys and values interleaved on axis 2 (k0, v0, k1, v1, ...).
Token t goes to flat slot slot_mapping[t] = page_id * page_size + offset. The engine maps padding
tokens into page 0, the null page nobody reads, so no mask is needed here.

One XLA scatter over the [P*page_size, 2K, H] view (a bitcast): with kv_pages donated at the jit
boundary XLA updates the buffer in place, writing T*2K*H elements and copying nothing else
(tests/kernels/test_kv_write.py checks the compiled HLO and the buffer address).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["write_kv"]


def _check(kv_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> None:
    if kv_pages.ndim != 4 or kv_pages.shape[2] % 2:
        raise ValueError(
            f"kv_pages.shape={tuple(kv_pages.shape)} must be [P, page_size, 2K, H] (2K even)"
        )
    _, _, K2, H = kv_pages.shape
    want = (k.shape[0], K2 // 2, H)
    for name, arr in (("k", k), ("v", v)):
        if arr.ndim != 3 or tuple(arr.shape[1:]) != want[1:]:
            raise ValueError(
                f"{name}.shape={tuple(arr.shape)} must be [T, K={K2 // 2}, H={H}] to match "
                f"kv_pages.shape={tuple(kv_pages.shape)}"
            )
    if v.shape != k.shape:
        raise ValueError(f"v.shape={tuple(v.shape)} must equal k.shape={tuple(k.shape)}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != jnp.int32:
        raise ValueError(
            f"slot_mapping (shape {tuple(slot_mapping.shape)}, dtype {slot_mapping.dtype}) must "
            f"be i32[T={k.shape[0]}]"
        )


def write_kv(
    kv_pages: jax.Array,  # [P, page_size, 2K, H]
    k: jax.Array,  # [T, K, H]
    v: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # i32[T]: page_id * page_size + offset; padding -> page 0
) -> jax.Array:  # [P, page_size, 2K, H], kv_pages with the T slots written
    """Store k and v (cast to kv_pages.dtype) at their slots; donate kv_pages to update in place."""
    _check(kv_pages, k, v, slot_mapping)
    P, page_size, K2, H = kv_pages.shape
    T = k.shape[0]
    kv = jnp.stack([k, v], axis=2).reshape(T, K2, H).astype(kv_pages.dtype)  # [T, 2K, H]
    flat = kv_pages.reshape(P * page_size, K2, H)
    # mode="drop": a slot past the cache (an engine bug) is ignored rather than clamped onto a
    # live page.
    flat = flat.at[slot_mapping].set(kv, mode="drop")
    return flat.reshape(P, page_size, K2, H)
