"""Prefill chunks over a cached prefix through cuDNN: two flash-attention calls merged by their LSE.

A chunk of sequence b holds q_len_b new tokens whose keys and values were written to the pages after
ctx_b = kv_lens[b] - q_len_b cached ones. Its queries see the whole prefix and, causally, the chunk.
jax's cuDNN binding has no bottom-right causal mask (T < S), so the attention is split in two:
  A. the chunk's queries against the cached prefix only, no causal mask (PADDING with per-sequence
     lengths); the prefix keys/values are gathered from the pages into one packed buffer of a static
     `max_prefix_tokens` rows (`gather_prefix`), sequence after sequence;
  B. the chunk's queries against the chunk's own keys/values, causal: exactly packed_prefill's call.
and merged by the log-sum-exp of each part (`merge_attention`):
  o = (o_a·e^(lse_a−m) + o_b·e^(lse_b−m)) / (e^(lse_a−m) + e^(lse_b−m)),  m = max(lse_a, lse_b).
A sequence with ctx_b = 0 takes lse_a = −inf, so its rows are call B's output exactly (cuDNN's
output for a zero-length kv segment is never read: it is masked before the merge).

Facts relied on, from jax 0.11.2's jax/_src/cudnn/fused_attention_stablehlo.py and XLA's
GetCudnnFlashAttentionOperationGraph (stream_executor/cuda/cuda_dnn.cc):
- `dot_product_attention(..., return_residual=True)` returns (out, stats) and sets is_training, so
  cuDNN writes its softmax statistics: the FlashAttention-2 logsumexp, natural log, of the SCALED
  scores (lse = log Σ_j exp(scale·q·k_j)), float32.
- With the packed layout (q_offsets of shape [1, M+1], M > 1) the stats have shape (B·M, N, T) =
  (M, N, T) here: XLA multiplies the batch dim by M (each segment is a cuDNN "batch") and gives
  the stats tensor NO ragged offset, so stats[m, n, i] is query i *within* segment m (i <
  q_seqlen[m]); nothing is promised past a segment's length. With M = 1 (one sequence row) the
  offsets are dropped and the call is plain padded attention over [1, T]: the same indexing holds.
- Checked on an H100 (cuDNN through jax 0.11.2 + CUDA 13 plugin): stats of a packed PADDING call
  equal the float64 natural-log LSE of the scaled scores to 6.4e-7 (log2 would be off by 3.8);
  a segment with kv length 0 gave stats -inf and zero outputs (masked here all the same).
- Lengths [1, M] and offsets [1, M+1] use −1 for unused rows; jax shifts the non-negative entries
  left, so live rows must be a prefix (they are: rows b < num_seqs) and a live row with length 0
  stays aligned with its offsets.
So per token t (sequence b, i = t − cu_q_lens[b]) lse[t, n] = stats[b, n, i]: one small gather.
The stats buffer is B·N·T float32 per call (B = page_indices rows): keep B to the prefill bucket.

Contract on max_prefix_tokens (static): the caller buckets Σ_b ctx_b and guarantees it fits.
Lengths are traced, so a violation cannot raise. What happens then: the buffer is filled in
sequence order and the offsets are clipped to it (no read past the buffer on any path); every
sequence whose prefix does not fit whole comes out as NaN on all its rows (loud, not a silently
shorter context). Sequences with ctx_b = 0 and those that fit are unaffected. max_prefix_tokens = 0
skips part A statically (for steps with no cached prefix at all: a fresh prefill).

Paths: "cudnn" (GPU; bf16/f16, head_dim 64/128), "xla" (the same gather / two parts with LSE /
merge, dense masked softmax in float32 jnp: the CPU check of this file's logic; memory T·S·N),
"reference" (write the chunk into a copy of the pages, then ragged_paged_attention's dense
float32 reference over prefix + chunk: the oracle) and "auto" (cudnn where supported, else xla).
Bucket-padding tokens (t >= cu_q_lens[num_seqs]) come out as zeros on every path.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from rtpjax.kernels import ragged_paged_attention as rpa
from rtpjax.kernels.kv_write import write_kv
from rtpjax.kernels.packed_prefill import cudnn_supported

__all__ = ["IMPLS", "gather_prefix", "merge_attention", "prefix_prefill_attention"]

IMPLS = ("auto", "cudnn", "xla", "reference")
_HI = lax.Precision.HIGHEST


def _prefix_lens(
    cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(live bool[B], q_len i32[B], ctx i32[B]): padding rows (b >= num_seqs) have 0 and 0."""
    B = kv_lens.shape[0]
    live = jnp.arange(B, dtype=jnp.int32) < num_seqs[0]
    q_len = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    ctx = jnp.where(live, jnp.maximum(kv_lens - q_len, 0), 0)
    return live, q_len, ctx


def _cumsum0(x: jax.Array) -> jax.Array:  # i32[B] -> i32[B+1], starting at 0
    return jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(x, dtype=jnp.int32)])


def gather_prefix(
    kv_pages: jax.Array,  # [P, page_size, 2K, H], K/V interleaved on axis 2 (write_kv's layout)
    page_indices: jax.Array,  # i32[B, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[B+1]
    kv_lens: jax.Array,  # i32[B], including this step's tokens
    num_seqs: jax.Array,  # i32[1]
    max_prefix_tokens: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Every live sequence's cached prefix (positions < kv_len - q_len), packed end to end.

    Returns (k_prefix [S, K, H], v_prefix [S, K, H], cu_prefix i32[B+1]) with S = max_prefix_tokens;
    sequence b owns rows cu_prefix[b] .. cu_prefix[b+1]-1, rows past cu_prefix[B] are zeros. If the
    prefixes overflow S, cu_prefix is clipped to S (the overflowing sequences are cut short; see
    the module docstring for what prefix_prefill_attention does with them).
    """
    P, page_size, K2, H = kv_pages.shape
    S = max_prefix_tokens
    _, _, ctx = _prefix_lens(cu_q_lens, kv_lens, num_seqs)
    cu_prefix = jnp.minimum(_cumsum0(ctx), S)  # i32[B+1]
    row = jnp.arange(S, dtype=jnp.int32)  # i32[S]
    # Sequence of row s = how many sequences end at or before s (O(S*B) compares, no sort).
    seq = jnp.sum(cu_prefix[1:][None, :] <= row[:, None], axis=1, dtype=jnp.int32)
    valid = row < cu_prefix[-1]  # bool[S]
    seq = jnp.minimum(seq, kv_lens.shape[0] - 1)
    j = row - cu_prefix[seq]  # i32[S]: position within its sequence
    page = page_indices[seq, jnp.clip(j // page_size, 0, page_indices.shape[1] - 1)]
    slot = jnp.where(valid, page * page_size + j % page_size, 0)
    rows = kv_pages.reshape(P * page_size, K2, H)[slot]  # [S, 2K, H]
    rows = jnp.where(valid[:, None, None], rows, jnp.zeros((), rows.dtype))  # unused: 0, not NaN
    kv = rows.reshape(S, K2 // 2, 2, H)
    return kv[:, :, 0], kv[:, :, 1], cu_prefix


def merge_attention(
    o_a: jax.Array,  # [T, N, H], attention over part A's keys (any float dtype)
    lse_a: jax.Array,  # f32[T, N]: natural-log LSE of part A's scaled scores; -inf: no keys
    o_b: jax.Array,  # [T, N, H]
    lse_b: jax.Array,  # f32[T, N]
) -> jax.Array:  # f32[T, N, H]
    """Softmax over the union of two disjoint key sets from each part's output and LSE.

    A part whose lse is -inf contributes nothing, whatever its o holds (NaN included), so a row
    with only part B is o_b exactly; a row with neither is 0.
    """
    m = jnp.maximum(lse_a, lse_b)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # both -inf: avoid inf - inf
    has_a, has_b = lse_a > -jnp.inf, lse_b > -jnp.inf
    w_a = jnp.where(has_a, jnp.exp(lse_a - m), 0.0)  # f32[T, N]
    w_b = jnp.where(has_b, jnp.exp(lse_b - m), 0.0)
    num = jnp.where(has_a[..., None], o_a.astype(jnp.float32) * w_a[..., None], 0.0) + jnp.where(
        has_b[..., None], o_b.astype(jnp.float32) * w_b[..., None], 0.0
    )
    den = w_a + w_b
    return num / jnp.where(den > 0, den, 1.0)[..., None]


def _validate(q, k, v, kv_pages, page_indices, cu_q_lens, kv_lens, num_seqs, sm_scale, S, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    if isinstance(S, bool) or not isinstance(S, numbers.Integral) or S < 0:
        raise ValueError(f"max_prefix_tokens={S!r} must be a static int >= 0")
    rpa.validate_inputs(
        q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale
    )  # q [T,N,H], pages [P,ps,2K,H] with K | N, int32 metadata, dtypes
    T, _, H = q.shape
    want = (T, kv_pages.shape[2] // 2, H)
    for name, arr in (("k", k), ("v", v)):
        if tuple(arr.shape) != want or arr.dtype != q.dtype:
            raise ValueError(
                f"{name} (shape {tuple(arr.shape)}, dtype {arr.dtype}) must be [T, K, H] = {want} "
                f"in q.dtype={q.dtype} (K from kv_pages.shape={tuple(kv_pages.shape)})"
            )


@functools.partial(jax.jit, static_argnames=("sm_scale", "max_prefix_tokens", "impl"))
def prefix_prefill_attention(
    q: jax.Array,  # [T, N, H]
    k: jax.Array,  # [T, K, H]: this step's keys (also written to the pages; not read from there)
    v: jax.Array,  # [T, K, H]
    kv_pages: jax.Array,  # [P, page_size, 2K, H]
    page_indices: jax.Array,  # i32[B, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[B+1]
    kv_lens: jax.Array,  # i32[B]: KV length after this step (prefix + chunk)
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    max_prefix_tokens: int,
    impl: str = "auto",
) -> jax.Array:  # [T, N, H] in q.dtype
    """Causal attention of prefill chunks over their cached prefixes (see the module docstring).

    Contract: Σ_b (kv_lens[b] - q_len_b) <= max_prefix_tokens (static; bucket it). Sequences
    whose prefix does not fit come out as NaN; padding tokens as zeros.
    """
    _validate(
        q, k, v, kv_pages, page_indices, cu_q_lens, kv_lens, num_seqs, sm_scale,
        max_prefix_tokens, impl,
    )  # fmt: skip
    if impl == "auto":
        impl = "cudnn" if cudnn_supported(q.shape[2], q.dtype) else "xla"
    if impl == "reference":
        return ref_prefix_prefill_attention(
            q, k, v, kv_pages, page_indices, cu_q_lens, kv_lens, num_seqs, sm_scale=sm_scale
        )
    T = q.shape[0]
    S = max_prefix_tokens
    seq, _, valid = rpa.token_positions(cu_q_lens, kv_lens, num_seqs, T)  # i32[T], bool[T]
    _, _, ctx = _prefix_lens(cu_q_lens, kv_lens, num_seqs)
    parts = _cudnn_parts if impl == "cudnn" else _xla_parts
    o_a, lse_a, o_b, lse_b = parts(
        q, k, v, kv_pages, page_indices, cu_q_lens, kv_lens, num_seqs, seq, valid, sm_scale, S
    )
    # Part A only where the sequence has a prefix: cuDNN's result for a zero-length kv segment
    # is undefined, and the xla path's is -inf anyway.
    lse_a = jnp.where((ctx[seq] > 0)[:, None], lse_a, -jnp.inf)
    out = merge_attention(o_a, lse_a, o_b, lse_b)  # f32[T, N, H]
    fits = (ctx == 0) | (_cumsum0(ctx)[1:] <= S)  # bool[B]
    out = jnp.where(fits[seq][:, None, None], out, jnp.nan)
    return jnp.where(valid[:, None, None], out, 0.0).astype(q.dtype)


# ----------------------------------------------------------------------------- xla path


def _attend_with_lse(q, k, v, mask, sm_scale):
    """Dense masked softmax in float32: (o f32[T, N, H], lse f32[T, N]; -inf where no key)."""
    T, N, H = q.shape
    K = k.shape[1]
    qg = q.astype(jnp.float32).reshape(T, K, N // K, H)
    s = jnp.einsum("TKGH,SKH->KGTS", qg, k.astype(jnp.float32), precision=_HI) * sm_scale
    s = jnp.where(mask, s, -jnp.inf)  # f32[K, G, T, S]
    m = jnp.max(s, axis=-1, initial=-jnp.inf)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m[..., None])  # masked: exp(-inf) = 0
    l = jnp.sum(p, axis=-1)  # f32[K, G, T]
    o = jnp.einsum("KGTS,SKH->TKGH", p, v.astype(jnp.float32), precision=_HI)
    o = o / jnp.where(l > 0, l, 1.0).transpose(2, 0, 1)[..., None]
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return o.reshape(T, N, H), lse.transpose(2, 0, 1).reshape(T, N)


def _xla_parts(q, k, v, kv_pages, page_indices, cu_q_lens, kv_lens, num_seqs, seq, valid, scale,
               S):  # fmt: skip
    T = q.shape[0]
    t = jnp.arange(T, dtype=jnp.int32)
    own = (seq[:, None] == seq[None, :]) & valid[:, None] & valid[None, :]
    o_b, lse_b = _attend_with_lse(q, k, v, own & (t[None, :] <= t[:, None]), scale)
    if S == 0:
        return o_b, jnp.full_like(lse_b, -jnp.inf), o_b, lse_b
    k_p, v_p, cu_p = gather_prefix(kv_pages, page_indices, cu_q_lens, kv_lens, num_seqs, S)
    r = jnp.arange(S, dtype=jnp.int32)
    # Row r belongs to sequence b iff cu_p[b] <= r < cu_p[b+1]: compare with the query's own b.
    vis = (cu_p[seq][:, None] <= r[None, :]) & (r[None, :] < cu_p[seq + 1][:, None])
    o_a, lse_a = _attend_with_lse(q, k_p, v_p, vis & valid[:, None], scale)
    return o_a, lse_a, o_b, lse_b


# ----------------------------------------------------------------------------- cudnn path


def _cudnn_sdpa():
    """jax's cuDNN binding (a function so tests can stand in a CPU model of it)."""
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention

    return dot_product_attention


def _cudnn_packed(q, k, v, q_lens, kv_lens, q_offsets, kv_offsets, causal, scale):
    """One cuDNN call over packed segments: (out [T, N, H], stats f32[M, N, T])."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType

    out, stats = _cudnn_sdpa()(
        q[None], k[None], v[None], None, None, q_lens, kv_lens, q_offsets, kv_offsets,
        scale=scale, mask_type=MaskType.PADDING_CAUSAL if causal else MaskType.PADDING,
        qkv_layout="BTNH", return_residual=True,
    )  # fmt: skip
    return out[0], stats


def _cudnn_parts(q, k, v, kv_pages, page_indices, cu_q_lens, kv_lens, num_seqs, seq, valid,
                 scale, S):  # fmt: skip
    B = kv_lens.shape[0]
    T = q.shape[0]
    n = num_seqs[0]
    live, q_len, _ = _prefix_lens(cu_q_lens, kv_lens, num_seqs)
    q_lens = jnp.where(live, q_len, -1)[None]  # i32[1, B]
    q_offsets = jnp.where(jnp.arange(B + 1) <= n, cu_q_lens, -1)[None]  # i32[1, B+1]
    rel = jnp.arange(T, dtype=jnp.int32) - cu_q_lens[seq]  # i32[T]: index within the segment
    rel = jnp.where(valid, rel, 0)

    def per_token(stats):  # f32[B, N, T] -> f32[T, N]
        return stats.transpose(0, 2, 1)[seq, rel]

    o_b, st_b = _cudnn_packed(q, k, v, q_lens, q_lens, q_offsets, q_offsets, True, scale)
    lse_b = per_token(st_b)
    if S == 0:
        return o_b, jnp.full_like(lse_b, -jnp.inf), o_b, lse_b
    k_p, v_p, cu_p = gather_prefix(kv_pages, page_indices, cu_q_lens, kv_lens, num_seqs, S)
    p_lens = jnp.where(live, cu_p[1:] - cu_p[:-1], -1)[None]  # i32[1, B]: clipped to the buffer
    p_offsets = jnp.where(jnp.arange(B + 1) <= n, cu_p, -1)[None]  # i32[1, B+1]
    o_a, st_a = _cudnn_packed(q, k_p, v_p, q_lens, p_lens, q_offsets, p_offsets, False, scale)
    return o_a, per_token(st_a), o_b, lse_b


# ----------------------------------------------------------------------------- reference


def ref_prefix_prefill_attention(
    q: jax.Array,  # [T, N, H]
    k: jax.Array,  # [T, K, H]
    v: jax.Array,  # [T, K, H]
    kv_pages: jax.Array,  # [P, page_size, 2K, H]
    page_indices: jax.Array,  # i32[B, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[B+1]
    kv_lens: jax.Array,  # i32[B]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
) -> jax.Array:  # [T, N, H] in q.dtype
    """The oracle: write k/v at their positions in a copy of the pages, then
    ragged_paged_attention's dense float32 reference over prefix + chunk. No max_prefix_tokens."""
    P, page_size, _, _ = kv_pages.shape
    seq, pos, valid = rpa.token_positions(cu_q_lens, kv_lens, num_seqs, q.shape[0])
    col = jnp.clip(pos // page_size, 0, page_indices.shape[1] - 1)
    slot = page_indices[seq, col] * page_size + pos % page_size
    slot = jnp.where(valid, slot, P * page_size)  # padding tokens: past the pool, dropped
    pages = write_kv(kv_pages, k, v, slot.astype(jnp.int32))
    return rpa.ref_ragged_paged_attention(
        q, pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale
    )
