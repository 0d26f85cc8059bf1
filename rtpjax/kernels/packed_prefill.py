"""Causal attention for a step whose every sequence starts at position 0 (no cached prefix).

Such a step's attention needs only its own keys and values, so it can skip the paged cache and run
cuDNN's flash attention on the flattened tokens: the sequences are packed end to end in [T] and
cuDNN's packed layout takes their offsets (cu_q_lens) and lengths, with a causal mask inside each
sequence. The paged kernel stays for everything else (chunks over cached prefixes, decode).

Paths: "cudnn" (GPU), "reference" (dense masked softmax in float32, O(T²) memory: the oracle and
the CPU path). Tokens past the last sequence (bucket padding) come out as zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLS = ("auto", "cudnn", "reference")
CUDNN_HEAD_DIMS = (64, 128)


def cudnn_supported(head_dim: int, dtype) -> bool:
    """Whether this platform and shape can take the cuDNN path."""
    return (
        jax.default_backend() == "gpu"
        and head_dim in CUDNN_HEAD_DIMS
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    )


def _token_valid(T: int, cu_q_lens: jax.Array, num_seqs: jax.Array) -> jax.Array:
    return jnp.arange(T) < cu_q_lens[num_seqs[0]]  # bool[T]


@functools.partial(jax.jit, static_argnames=("sm_scale", "impl"))
def packed_causal_attention(
    q: jax.Array,  # [T, N, H]
    k: jax.Array,  # [T, K, H]
    v: jax.Array,  # [T, K, H]
    cu_q_lens: jax.Array,  # i32[B+1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    impl: str = "auto",
) -> jax.Array:  # [T, N, H] in q.dtype
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    T, N, H = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != H or N % k.shape[1]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: want [T,N,H], [T,K,H] with K | N")
    if impl == "auto":
        impl = "cudnn" if cudnn_supported(H, q.dtype) else "reference"
    out = _cudnn(q, k, v, cu_q_lens, num_seqs, sm_scale) if impl == "cudnn" else None
    if out is None:
        out = _reference(q, k, v, cu_q_lens, num_seqs, sm_scale)
    return jnp.where(_token_valid(T, cu_q_lens, num_seqs)[:, None, None], out, 0).astype(q.dtype)


def _reference(q, k, v, cu_q_lens, num_seqs, sm_scale):
    T, N, H = q.shape
    K = k.shape[1]
    pos = jnp.arange(T)
    seg = jnp.searchsorted(cu_q_lens, pos, side="right") - 1  # i32[T]: the token's sequence
    valid = _token_valid(T, cu_q_lens, num_seqs)
    mask = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None]) & valid[None, :]
    qg = q.reshape(T, K, N // K, H).astype(jnp.float32)
    s = jnp.einsum("TKGH,SKH->KGTS", qg, k.astype(jnp.float32)) * sm_scale
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask, p, 0.0)  # rows with no key (padding tokens) give zeros, not NaN
    o = jnp.einsum("KGTS,SKH->TKGH", p, v.astype(jnp.float32))
    return o.reshape(T, N, H)


def _cudnn(q, k, v, cu_q_lens, num_seqs, sm_scale):
    # jax's cuDNN binding with the packed (offsets) layout; jax.nn.dot_product_attention does not
    # expose offsets in 0.11.2.
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    B = cu_q_lens.shape[0] - 1
    n = num_seqs[0]
    lens = jnp.where(jnp.arange(B) < n, cu_q_lens[1:] - cu_q_lens[:-1], -1)[None]  # i32[1, B]
    offsets = jnp.where(jnp.arange(B + 1) <= n, cu_q_lens, -1)[None]  # i32[1, B+1]
    out = dot_product_attention(
        q[None],
        k[None],
        v[None],
        None,
        None,
        lens,
        lens,
        offsets,
        offsets,
        scale=sm_scale,
        mask_type=MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH",
    )
    return out[0]
