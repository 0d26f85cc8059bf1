"""Ragged paged attention: one call for a flattened step of decodes and prefill chunks.

Layout (jax's TPU kernel's, so TPU needs no adaptation), per layer:
  kv_pages  [P, page_size, 2K, H]  keys and values interleaved on axis 2 (k0, v0, k1, v1, ...);
                                   page 0 is a null page the engine never hands out.
  q         [T, N, H]              all query tokens of all sequences, sequence b owning rows
                                   cu_q_lens[b] .. cu_q_lens[b+1]-1; N = K*G, query head n
                                   reads kv head n // G.
  kv_lens   i32[B]                 kv length of each sequence INCLUDING this step's tokens.
  page_indices i32[B, pages_per_seq]
  cu_q_lens i32[B+1]; num_seqs i32[1]: rows b >= num_seqs are padding (q_len 0).
Query token i of sequence b sits at position kv_len-q_len+i: it sees keys j <= its position (causal
inside the chunk, everything cached before it), and with a sliding window only
position-sliding_window < j. Output rows of tokens at or beyond cu_q_lens[num_seqs] are zeros on
every path here (the TPU kernel's padding rows are zeroed after the call).

Paths (`impl`): "reference" (dense masked softmax in float32, the oracle), "xla" (online softmax
over blocks of pages in plain jnp: the CPU engine's path and the GPU fallback), "triton" (a Pallas
kernel with the Triton lowering, ragged_paged_attention_gpu.py: decode and any NVIDIA GPU),
"mgpu" (a Pallas Mosaic GPU kernel for Hopper, ragged_paged_attention_mgpu.py: TMA, wgmma,
warp-specialized; prefill), "gpu" ("mgpu" for prefill-like steps on Hopper where it covers the
shapes, else "triton"), "tpu" (jax's Pallas TPU kernel, called with the same arguments) and
"auto" (by jax.default_backend()).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from rtpjax.kernels.kv_write import write_kv

__all__ = [
    "IMPLS",
    "ragged_paged_attention",
    "ref_ragged_paged_attention",
    "validate_inputs",
    "write_kv",
    "xla_ragged_paged_attention",
]

Impl = Literal["auto", "reference", "xla", "gpu", "triton", "mgpu", "tpu"]
IMPLS = ("auto", "reference", "xla", "gpu", "triton", "mgpu", "tpu")
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# Finite, so that a block where a row sees nothing gives exp(MASK - MASK) = 1 under a where, never
# inf - inf = NaN.
MASK_VALUE = -1e30
# kv tokens per step of the xla path's scan: the scores it holds are T x this.
_XLA_KV_BLOCK = 128


def validate_inputs(
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> None:
    """Raise ValueError naming the argument, its value and what is allowed (static checks)."""
    if q.ndim != 3:
        raise ValueError(f"q.shape={tuple(q.shape)} must be [T, N, H]")
    if kv_pages.ndim != 4:
        raise ValueError(f"kv_pages.shape={tuple(kv_pages.shape)} must be [P, page_size, 2K, H]")
    T, N, H = q.shape
    _, page_size, K2, Hk = kv_pages.shape
    if K2 == 0 or K2 % 2:
        raise ValueError(
            f"kv_pages.shape[2]={K2} must be 2*K (keys and values interleaved): a positive even "
            "number"
        )
    if Hk != H:
        raise ValueError(f"kv_pages head_dim {Hk} must equal q head_dim {H} (q.shape={q.shape})")
    if H < 1:
        raise ValueError(f"head_dim={H} must be positive")
    K = K2 // 2
    if N % K:
        raise ValueError(f"q heads N={N} must be a multiple of kv heads K={K} (N % K == 0)")
    if page_size < 1 or page_size & (page_size - 1) or page_size > 1024:
        raise ValueError(
            f"page_size={page_size} (kv_pages.shape[1]) must be a power of two <= 1024"
        )
    if jnp.dtype(q.dtype) not in _DTYPES:
        raise ValueError(f"q.dtype={q.dtype} must be one of bfloat16, float16, float32")
    if kv_pages.dtype != q.dtype:
        raise ValueError(f"kv_pages.dtype={kv_pages.dtype} must equal q.dtype={q.dtype}")
    if page_indices.ndim != 2:
        raise ValueError(f"page_indices.shape={page_indices.shape} must be [B, pages_per_seq]")
    B = page_indices.shape[0]
    for name, arr, shape in (
        ("kv_lens", kv_lens, (B,)),
        ("page_indices", page_indices, page_indices.shape),
        ("cu_q_lens", cu_q_lens, (B + 1,)),
        ("num_seqs", num_seqs, (1,)),
    ):
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name}.shape={tuple(arr.shape)} must be {shape} (B={B})")
        if arr.dtype != jnp.int32:
            raise ValueError(f"{name}.dtype={arr.dtype} must be int32")
    if not (isinstance(sm_scale, numbers.Real) and math.isfinite(sm_scale)):
        raise ValueError(f"sm_scale={sm_scale!r} must be a finite real number (static)")
    if sliding_window is not None and (
        not isinstance(sliding_window, numbers.Integral) or sliding_window < 1
    ):
        raise ValueError(f"sliding_window={sliding_window!r} must be None or a positive int")
    if soft_cap is not None and not (isinstance(soft_cap, numbers.Real) and soft_cap > 0):
        raise ValueError(f"soft_cap={soft_cap!r} must be None or a positive float")
    del T


def token_positions(
    cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, num_tokens: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per query token: its sequence, its kv position, and whether it is a real token.

    O(T*B) compares, no sort: fine for the step sizes the engine buckets to.
    Returns (seq i32[T] clipped to [0, B), pos i32[T], valid bool[T]).
    """
    B = kv_lens.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)  # i32[T]
    live = jnp.arange(B, dtype=jnp.int32) < num_seqs[0]  # bool[B]
    # Sequence of token t = how many live sequences end at or before t.
    seq = jnp.sum((cu_q_lens[1:][None, :] <= t[:, None]) & live[None, :], axis=1, dtype=jnp.int32)
    seq = jnp.minimum(seq, B - 1)  # i32[T]
    valid = t < cu_q_lens[num_seqs[0]]  # bool[T]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (t - cu_q_lens[seq])  # i32[T]
    return seq, pos, valid


def ref_ragged_paged_attention(
    q: jax.Array,  # [T, N, H]
    kv_pages: jax.Array,  # [P, page_size, 2K, H]
    kv_lens: jax.Array,  # i32[B]
    page_indices: jax.Array,  # i32[B, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[B+1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    impl: Impl = "reference",
) -> jax.Array:  # [T, N, H] in q.dtype
    """The oracle: per token, a dense masked softmax over its whole sequence, in float32.

    Memory T x pages_per_seq*page_size (in batches of 16 tokens); meant for tests, not serving.
    Jit-able with traced num_seqs.
    """
    validate_inputs(
        q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
    )  # fmt: skip
    del impl
    T, N, H = q.shape
    _, page_size, K2, _ = kv_pages.shape
    K, S = K2 // 2, page_indices.shape[1] * page_size
    G = N // K
    seq, pos, valid = token_positions(cu_q_lens, kv_lens, num_seqs, T)
    hi = lax.Precision.HIGHEST

    def one_token(args: tuple[jax.Array, ...]) -> jax.Array:
        q_t, seq_t, pos_t, valid_t = args  # [N, H], scalars
        kv = kv_pages[page_indices[seq_t]].reshape(S, K, 2, H).astype(jnp.float32)
        s_idx = jnp.arange(S)  # i32[S]
        cached = s_idx < kv_lens[seq_t]
        kv = jnp.where(cached[:, None, None, None], kv, 0.0)  # unwritten slots may hold NaN
        k, v = kv[:, :, 0], kv[:, :, 1]  # f32[S, K, H]
        qg = q_t.astype(jnp.float32).reshape(K, G, H)
        s = jnp.einsum("KGH,SKH->KGS", qg, k, precision=hi) * sm_scale  # f32[K, G, S]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        visible = cached & (s_idx <= pos_t)
        if sliding_window is not None:
            visible &= s_idx > pos_t - sliding_window
        s = jnp.where(visible, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)  # NaN only for padding tokens, dropped below
        out = jnp.einsum("KGS,SKH->KGH", p, v, precision=hi).reshape(N, H)
        return jnp.where(valid_t, out, 0.0)

    out = lax.map(one_token, (q, seq, pos, valid), batch_size=16)  # f32[T, N, H]
    return out.astype(q.dtype)


def num_q_blocks(num_tokens: int, max_seqs: int, block_q: int) -> int:
    """Static upper bound on sum_b ceil(q_len_b / block_q) given sum_b q_len_b <= num_tokens."""
    live = min(max_seqs, num_tokens)
    return max(1, min(num_tokens, (num_tokens + live * (block_q - 1)) // block_q))


def q_block_map(
    cu_q_lens: jax.Array, num_seqs: jax.Array, block_q: int, num_blocks: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cut every sequence's queries into blocks of block_q tokens that never straddle sequences.

    Returns (blk_seq i32[NB]: the block's sequence or -1 for an unused block slot,
    blk_q0 i32[NB]: its first query index within the sequence,
    first_blk i32[B]: each sequence's first block).
    """
    B = cu_q_lens.shape[0] - 1
    live = jnp.arange(B, dtype=jnp.int32) < num_seqs[0]
    q_len = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)  # i32[B]
    n_blk = (q_len + block_q - 1) // block_q  # i32[B]
    end_blk = jnp.cumsum(n_blk, dtype=jnp.int32)  # i32[B]
    first_blk = end_blk - n_blk
    i = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.sum(end_blk[None, :] <= i[:, None], axis=1, dtype=jnp.int32)  # i32[NB]
    used = i < end_blk[-1]
    seq_c = jnp.minimum(seq, B - 1)
    blk_q0 = (i - first_blk[seq_c]) * block_q
    return jnp.where(used, seq_c, -1), jnp.where(used, blk_q0, 0), first_blk


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def xla_block_q(num_tokens: int, max_seqs: int, max_q_len: int | None) -> int:
    """Query tokens per block of the xla path.

    Work per kv step is about (T + B*BQ) padded query rows plus (T/BQ + B) gathered kv blocks, and
    on CPU a row of SmolLM2-sized math costs about what gathering one block does: BQ near
    sqrt(T/B) balances the two (1 for decode steps), capped by the longest query run and 64.
    """
    q_hint = max_q_len if max_q_len is not None else (1 if num_tokens <= max_seqs else num_tokens)
    balance = _pow2_at_least(int(math.sqrt(num_tokens / max(1, max_seqs))))
    return max(1, min(64, balance, _pow2_at_least(min(q_hint, num_tokens))))


def xla_ragged_paged_attention(
    q: jax.Array,  # [T, N, H]
    kv_pages: jax.Array,  # [P, page_size, 2K, H]
    kv_lens: jax.Array,  # i32[B]
    page_indices: jax.Array,  # i32[B, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[B+1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    max_q_len: int | None = None,
    block_q: int | None = None,
) -> jax.Array:  # [T, N, H]
    """Online softmax in plain jnp: query blocks (never straddling sequences) x kv blocks.

    Each query block gathers its own sequence's pages, _XLA_KV_BLOCK tokens per scan step, so memory
    is about (T + B*block_q) x _XLA_KV_BLOCK scores, never T x S_max. The scan runs as many steps
    as the longest (window-clipped) kv range needs, not pages_per_seq. Math in float32 on CPU;
    elsewhere the operands stay in their dtype with float32 accumulation.
    """
    T, N, H = q.shape
    _, page_size, K2, _ = kv_pages.shape
    K = K2 // 2
    G = N // K
    B, pps = page_indices.shape
    BQ = block_q or xla_block_q(T, B, max_q_len)
    NB = num_q_blocks(T, B, BQ)
    ppb = max(1, min(pps, _XLA_KV_BLOCK // page_size))  # pages per scan step
    BS = ppb * page_size
    cdt = jnp.float32 if jax.default_backend() == "cpu" else q.dtype

    blk_seq, blk_q0, first_blk = q_block_map(cu_q_lens, num_seqs, BQ, NB)
    used = blk_seq >= 0  # bool[NB]
    seq = jnp.maximum(blk_seq, 0)
    q_start = cu_q_lens[seq]
    q_len = jnp.where(used, cu_q_lens[seq + 1] - q_start, 0)  # i32[NB]
    kv_len = kv_lens[seq]
    tok = blk_q0[:, None] + jnp.arange(BQ, dtype=jnp.int32)[None, :]  # i32[NB, BQ]
    row_ok = tok < q_len[:, None]  # bool[NB, BQ]
    qpos = kv_len[:, None] - q_len[:, None] + tok  # i32[NB, BQ]
    # Rows M = BQ*G (token-major) of one kv head: the scan's dots are plain batched matmuls over
    # (block, kv head) with contiguous [M, H] x [H, BS] operands, which XLA:CPU runs several
    # times faster than the same einsum over a [BS, K, H] operand.
    M = BQ * G
    q_blk = q[jnp.where(row_ok, q_start[:, None] + tok, 0)]  # [NB, BQ, N, H]
    q_blk = q_blk.reshape(NB, BQ, K, G, H).transpose(0, 2, 1, 3, 4).reshape(NB, K, M, H)
    q_blk = q_blk.astype(cdt)
    qpos_m = jnp.repeat(qpos, G, axis=1)  # i32[NB, M]

    last = jnp.minimum(blk_q0 + BQ, q_len) - 1
    hi = jnp.where(used, kv_len - q_len + last + 1, 0)  # i32[NB]: keys [lo, hi) matter
    lo = jnp.zeros_like(hi)
    if sliding_window is not None:
        lo = jnp.maximum(0, kv_len - q_len + blk_q0 - sliding_window + 1)
    lo = (lo // BS) * BS
    n_steps = jnp.max(jnp.where(used, (hi - lo + BS - 1) // BS, 0))

    def step(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        m, l, acc = carry  # f32[NB, K, M], f32[NB, K, M], f32[NB, K, M, H]
        start = lo + i * BS  # i32[NB]
        slot = start[:, None] // page_size + jnp.arange(ppb, dtype=jnp.int32)  # i32[NB, ppb]
        pid = page_indices[seq[:, None], jnp.minimum(slot, pps - 1)]  # i32[NB, ppb]
        s_idx = start[:, None] + jnp.arange(BS, dtype=jnp.int32)  # i32[NB, BS]
        in_range = s_idx < hi[:, None]
        kv = kv_pages[pid].reshape(NB, BS, K, 2, H)
        kv = jnp.where(in_range[:, :, None, None, None], kv, 0).astype(cdt)  # NaN-proof
        kv = kv.transpose(0, 2, 3, 1, 4)  # [NB, K, 2, BS, H]
        k, v = kv[:, :, 0], kv[:, :, 1]  # [NB, K, BS, H]
        s = jnp.einsum("bKMH,bKSH->bKMS", q_blk, k, preferred_element_type=jnp.float32)
        s = s * sm_scale  # f32[NB, K, M, BS]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        vis = in_range[:, None, :] & (s_idx[:, None, :] <= qpos_m[:, :, None])  # [NB, M, BS]
        if sliding_window is not None:
            vis &= s_idx[:, None, :] > qpos_m[:, :, None] - sliding_window
        vis = vis[:, None]  # [NB, 1, M, BS]
        s = jnp.where(vis, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = l * alpha + p.sum(axis=-1)
        pv = jnp.einsum("bKMS,bKSH->bKMH", p.astype(cdt), v, preferred_element_type=jnp.float32)
        return m_new, l, acc * alpha[..., None] + pv

    init = (
        jnp.full((NB, K, M), MASK_VALUE, jnp.float32),
        jnp.zeros((NB, K, M), jnp.float32),
        jnp.zeros((NB, K, M, H), jnp.float32),
    )
    _, l, acc = lax.fori_loop(0, n_steps, step, init)
    out_blk = acc / jnp.where(l > 0, l, 1.0)[..., None]  # f32[NB, K, M, H]
    out_blk = out_blk.reshape(NB, K, BQ, G, H).transpose(0, 2, 1, 3, 4).reshape(NB * BQ, N, H)

    tseq, _, valid = token_positions(cu_q_lens, kv_lens, num_seqs, T)
    rel = jnp.arange(T, dtype=jnp.int32) - cu_q_lens[tseq]
    row = (first_blk[tseq] + rel // BQ) * BQ + rel % BQ  # i32[T]
    out = out_blk[jnp.where(valid, row, 0)]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)


def tpu_ragged_paged_attention(
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    kernel: Callable[..., jax.Array] | None = None,
) -> jax.Array:
    """jax's Pallas TPU kernel, called with our arguments unchanged (the layout is its own).

    `kernel` defaults to jax.experimental.pallas.ops.tpu.ragged_paged_attention; tests pass that
    module's ref_ragged_paged_attention (same signature) to check this adaptation on CPU.
    """
    if kernel is None:
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
            ragged_paged_attention as kernel,
        )
    return kernel(
        q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
    )  # fmt: skip


def _zero_padding_tokens(out: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array) -> jax.Array:
    valid = jnp.arange(out.shape[0]) < cu_q_lens[num_seqs[0]]
    return jnp.where(valid[:, None, None], out, jnp.zeros((), out.dtype))


def _is_hopper() -> bool:
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def _mgpu_fits(q, kv_pages, page_indices, max_q_len, *, sm_scale, sliding_window, soft_cap) -> bool:
    """Whether "gpu" takes the Mosaic GPU kernel: a prefill-like step (the engine's
    max_q_len None; else more tokens than sequences) on a Hopper GPU, shapes it covers. Decode
    steps stay on the Triton kernel, whose kv splits suit one query token per sequence (docs/
    kernels/attention.md has both measured)."""
    del sm_scale
    T, B = q.shape[0], page_indices.shape[0]
    prefill_like = (max_q_len is None and T > B) or (max_q_len is not None and max_q_len > 1)
    if not prefill_like or not _is_hopper():
        return False
    from rtpjax.kernels import ragged_paged_attention_mgpu as mgpu

    return mgpu.supports(
        q.shape, kv_pages.shape, q.dtype, sliding_window=sliding_window, soft_cap=soft_cap
    )


def resolve_impl(impl: Impl, head_dim: int, dtype: jnp.dtype) -> str:
    """The concrete path for `impl` on this backend ("auto" falls back to "xla" for shapes the
    GPU kernel does not cover)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "tpu":
        return "tpu"
    if backend in ("gpu", "cuda", "rocm"):
        from rtpjax.kernels import ragged_paged_attention_gpu as gpu

        return "gpu" if gpu.supports(head_dim, dtype) else "xla"
    return "xla"


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "impl", "max_q_len")
)
def ragged_paged_attention(
    q: jax.Array,  # [T, N, H]
    kv_pages: jax.Array,  # [P, page_size, 2K, H]
    kv_lens: jax.Array,  # i32[B]
    page_indices: jax.Array,  # i32[B, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[B+1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    impl: Impl = "auto",
    max_q_len: int | None = None,
) -> jax.Array:  # [T, N, H] in q.dtype
    """Attention of a ragged step over the paged KV cache (this step's K/V already written).

    max_q_len: optional static upper bound on any sequence's query tokens in this step (pass the
    engine's bucket, e.g. 1 for decode-only steps). The caller guarantees it: it picks block
    shapes, and 1 lets the GPU kernel take sequence i as query block i without building the
    block map. Without it a step with T <= B is treated as decode-like and T > B as
    prefill-like.
    """
    validate_inputs(
        q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
    )  # fmt: skip
    args = (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    path = resolve_impl(impl, q.shape[2], q.dtype)
    if path == "reference":
        return ref_ragged_paged_attention(*args, **kw)
    if path == "xla":
        return xla_ragged_paged_attention(*args, **kw, max_q_len=max_q_len)
    if path == "gpu":  # the Mosaic GPU kernel for prefill-like steps on Hopper, else Triton's
        path = "mgpu" if _mgpu_fits(q, kv_pages, page_indices, max_q_len, **kw) else "triton"
    if path == "mgpu":
        from rtpjax.kernels import ragged_paged_attention_mgpu as mgpu

        return mgpu.mgpu_ragged_paged_attention(*args, **kw, max_q_len=max_q_len)
    if path == "triton":
        from rtpjax.kernels import ragged_paged_attention_gpu as gpu

        return gpu.gpu_ragged_paged_attention(*args, **kw, max_q_len=max_q_len)
    return _zero_padding_tokens(tpu_ragged_paged_attention(*args, **kw), cu_q_lens, num_seqs)
