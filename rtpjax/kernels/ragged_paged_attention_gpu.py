"""Ragged paged attention on NVIDIA GPUs: one Pallas kernel (Triton lowering), decode and prefill.

Work split: the queries of every sequence are cut into blocks of BQ tokens that never straddle
sequences; a program owns (query block, kv head, kv split) and packs the block's BQ tokens x G query
heads of that kv head into BLOCK_M = BQ*G rows (rounded up to a power of two, at least 16 for
tl.dot), so each K/V tile is read once for all G heads. It walks its kv range in tiles of BLOCK_S
tokens, gathering token rows through the page table (any page size; chunk boundaries anywhere), with
an online softmax in base 2: first the tiles wholly before the block's first query position
(no mask), then the rest under the causal/window mask. Keys past kv_len are never loaded.

Decode (few rows per sequence) with few programs splits each sequence's kv range into NUM_SPLITS
parts (flash-decoding); the parts' (acc, m, l) are merged by a second small kernel, one program
per output row (XLA's merge was three reductions and a select: 4-6 µs per call at 64 splits).

The block -> sequence map is computed on device from cu_q_lens (O(NB*B) compares in one fusion),
so the engine needs no host-prepared metadata.

The kernel runs in Pallas interpret mode on CPU (the tests do that); the lowering choice and the
measured figures are in docs/kernels/attention.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from rtpjax.kernels import ragged_paged_attention as rpa

__all__ = ["GpuConfig", "choose_config", "gpu_ragged_paged_attention", "supports"]

LOG2E = math.log2(math.e)
HEAD_DIMS = (64, 128)
_MASK = rpa.MASK_VALUE
# Chosen by measurement (docs/kernels/attention.md).
DECODE_PREFETCH = 0
PREFILL_PREFETCH = 1
DECODE_WAVES = 2
ONE_TILE_MAX_KEYS = 128  # short decode ranges: one tile of up to this many keys per split
# Mid-length decode ranges over few programs: one program per multiprocessor, tiles of 64 keys
# in a ring this deep, where each split then holds this many keys (eleventh session).
DEEP_RING_BLOCK_S = 64
DEEP_RING_STAGES = 5
DEEP_RING_SPLIT_KEYS = (512, 2048)
_SMEM_HEADROOM = 27 * 1024  # shared memory kept for the kernel's other scratch
MAX_SPLITS = 64
# The merge kernel: one warp per output row up to this many splits (its reduction stays in
# the warp), four past it (measured, docs/kernels/attention.md, tenth session).
MERGE_ONE_WARP_MAX_SPLITS = 16


def supports(head_dim: int, dtype: jnp.dtype) -> bool:
    """Whether the kernel covers this head_dim and dtype (else "auto" takes the xla path)."""
    return head_dim in HEAD_DIMS and jnp.dtype(dtype) in rpa._DTYPES


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Static kernel shape. block_m: rows (query tokens x heads of one kv head) per program;
    block_s: kv tokens per tile; num_splits: kv splits per (query block, kv head); prefetch: how
    far ahead the loop issues loads (see _kernel); merge_kernel: how the splits are merged."""

    block_m: int
    block_s: int
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    prefetch: int = 0
    merge_kernel: bool = True  # splits merged by _merge_kernel (one launch) rather than XLA

    def __post_init__(self) -> None:
        if self.prefetch not in (0, 1, 2):
            raise ValueError(f"GpuConfig.prefetch={self.prefetch} must be 0, 1 or 2")
        for name in ("block_m", "block_s"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"GpuConfig.{name}={val} must be a power of two >= 16")
        if self.num_splits < 1:
            raise ValueError(f"GpuConfig.num_splits={self.num_splits} must be >= 1")


def _sm_count() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except RuntimeError:
        return 132


def _smem_per_block() -> int:
    """Opt-in shared memory per block (CUDA guide, by compute capability): 227 KB on 9.x and
    10.x, 163 KB on 8.0 and 8.7, 99 KB on the rest; as the H100 where there is no CUDA device
    (interpret mode), so configurations match the GPU's."""
    cc = str(getattr(jax.devices()[0], "compute_capability", "") or "9.0")
    major, _, minor = cc.partition(".")
    if major in ("9", "10"):
        return 227 * 1024
    return (163 if (major, minor) in (("8", "0"), ("8", "7")) else 99) * 1024


def num_splits(
    programs: int,
    max_kv_len: int,
    block_s: int,
    tokens_x_heads_x_dim: int,
    num_sms: int | None = None,
    waves: int = DECODE_WAVES,
) -> int:
    """kv splits so that about `waves` programs per multiprocessor exist, each with >= 2 tiles."""
    target = waves * (num_sms or _sm_count())
    splits = max(1, min(pl.cdiv(target, programs), pl.cdiv(max_kv_len, 2 * block_s), MAX_SPLITS))
    # Partials are splits x T x N x H floats: keep them small against the KV read.
    while splits > 1 and splits * tokens_x_heads_x_dim * 4 > (64 << 20):
        splits //= 2
    return splits


def choose_config(
    num_tokens: int,
    max_seqs: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_kv_len: int,
    max_q_len: int | None = None,
    num_sms: int | None = None,
    itemsize: int = 2,
    smem_bytes: int | None = None,
) -> GpuConfig:
    """Block shapes from static shapes only (one compile per bucket); itemsize: the KV's;
    smem_bytes: shared memory per block (default: the device's)."""
    G = num_q_heads // num_kv_heads
    q_hint = max_q_len if max_q_len is not None else (1 if num_tokens <= max_seqs else num_tokens)
    q_hint = max(1, min(q_hint, num_tokens))
    if q_hint * G <= 64:  # decode-like: rows are scarce, bandwidth is everything
        block_m = max(16, rpa._pow2_at_least(q_hint * G))
        bq = max(1, block_m // G)
        programs = rpa.num_q_blocks(num_tokens, max_seqs, bq) * num_kv_heads
        txh = num_tokens * num_q_heads * head_dim
        # Measured on the H100 (docs/kernels/attention.md, seventh, tenth and eleventh
        # sessions): with fewer programs than multiprocessors and a short kv range, one tile
        # per split and about one program per multiprocessor (the chain of dependent loads is
        # shortest); with 512-2,048 keys per split at one program per multiprocessor, that
        # grid with tiles of 64 keys in a 5-deep ring; with longer ranges, tiles of 32 keys
        # and 4 waves of splits; with the grid full and no split, 2 stages beat 3.
        sms = num_sms or _sm_count()
        few = programs < sms
        if few:
            splits_per_sm = pl.cdiv(sms, programs)  # splits for about one program per SM
            tile = max(32, rpa._pow2_at_least(pl.cdiv(max_kv_len, splits_per_sm)))
            splits = pl.cdiv(max_kv_len, tile)
            if tile <= ONE_TILE_MAX_KEYS and splits <= MAX_SPLITS:
                return GpuConfig(block_m, tile, splits, 4, 2, DECODE_PREFETCH)
            splits = min(sms // programs, MAX_SPLITS)  # whole multiprocessors: no second wave
            lo_keys, hi_keys = DEEP_RING_SPLIT_KEYS
            bs, stages = DEEP_RING_BLOCK_S, DEEP_RING_STAGES
            ring = stages * 2 * bs * head_dim * itemsize  # K and V tiles in flight
            ring_fits = ring + _SMEM_HEADROOM <= (smem_bytes or _smem_per_block())
            if ring_fits and splits >= 2 and lo_keys <= pl.cdiv(max_kv_len, splits) <= hi_keys:
                return GpuConfig(block_m, bs, splits, 4, stages, DECODE_PREFETCH)
        block_s = 32 if few else 64
        splits = num_splits(programs, max_kv_len, block_s, txh, num_sms, waves=4 if few else 2)
        stages = 2 if splits == 1 else 3
        return GpuConfig(block_m, block_s, splits, 4, stages, DECODE_PREFETCH)
    block_m = max(128, rpa._pow2_at_least(G))
    return GpuConfig(block_m, 64, 1, num_warps=8, num_stages=3, prefetch=PREFILL_PREFETCH)


def _kernel(
    blk_seq_ref,  # i32[NB]
    blk_q0_ref,  # i32[NB]
    kv_lens_ref,  # i32[B]
    cu_ref,  # i32[B+1]
    pages_ref,  # i32[B*pps]
    q_ref,  # [T*N, H]
    kv_ref,  # [P*page_size*2K, H]
    *out_refs,  # S == 1: o [T*N, H]; else acc f32[S*T*N, H], m f32[S*T*N], l f32[S*T*N]
    G: int,
    K: int,
    N: int,
    T: int,
    page_size: int,
    pps: int,
    cfg: GpuConfig,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    exact_f32: bool,
    direct: bool,
):
    BM, BS, S = cfg.block_m, cfg.block_s, cfg.num_splits
    BQ = BM // G
    ib, kh, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    if direct:  # decode-only step: block ib is sequence ib's one token (blk_seq_ref: num_seqs)
        seq = ib
        live = ib < blk_seq_ref[0]
    else:
        seq = blk_seq_ref[ib]
        live = seq >= 0

    @pl.when(live)
    def _():
        q0 = jnp.int32(0) if direct else blk_q0_ref[ib]
        kv_len = kv_lens_ref[seq]
        q_start = cu_ref[seq]
        q_len = cu_ref[seq + 1] - q_start
        r = lax.broadcasted_iota(jnp.int32, (BM,), 0)
        tok = q0 + r // G  # i32[BM]: query index within the sequence
        row_ok = (r < BQ * G) & (tok < q_len)
        # Masked-off rows point past the array: never dereferenced on the GPU, and dropped by
        # interpret mode's scatter (an in-range dummy row could race a real row's store there).
        qrow = jnp.where(row_ok, (q_start + tok) * N + kh * G + r % G, T * N)[:, None]  # [BM, 1]
        h = lax.broadcasted_iota(jnp.int32, (1, q_ref.shape[1]), 1)  # i32[1, H]
        # Every index an int array (no slices): the form both the Triton lowering and the
        # interpret-mode discharge accept.
        q = plgpu.load(q_ref.at[jnp.minimum(qrow, T * N - 1), h], mask=row_ok[:, None], other=0.0)
        ctx = kv_len - q_len  # position of the sequence's first new token
        qpos = ctx + tok  # i32[BM]
        pos_first = ctx + q0
        hi = ctx + jnp.minimum(q0 + BQ, q_len)  # keys [lo, hi) matter to this block
        if sliding_window is None:
            lo = jnp.int32(0)
            n_free = (pos_first + 1) // BS  # tiles wholly at or before the first query
        else:
            lo = (jnp.maximum(0, pos_first - sliding_window + 1) // BS) * BS
            n_free = jnp.int32(0)
        n_tiles = (hi - lo + BS - 1) // BS
        if direct:  # a live sequence with no token in this step reads nothing
            n_tiles = jnp.where(q_len > 0, n_tiles, 0)
        per_split = (n_tiles + S - 1) // S
        t_begin = sp * per_split
        t_end = jnp.minimum(n_tiles, t_begin + per_split)
        s_arange = lax.broadcasted_iota(jnp.int32, (BS,), 0)
        kv_base = kh * 2
        dot = functools.partial(plgpu.dot, allow_tf32=False) if exact_f32 else plgpu.dot

        def tile_rows(i):
            """Cache rows of tile i's keys (values are the next row) and which are in range."""
            j = lo + i * BS + s_arange  # i32[BS] kv positions
            j_ok = (j < hi) & (i < t_end)  # past t_end belongs to the next split
            pid = plgpu.load(
                pages_ref.at[jnp.where(j_ok, seq * pps + j // page_size, 0)], mask=j_ok, other=0
            )
            row = ((pid * page_size + j % page_size) * (2 * K) + kv_base)[:, None]  # i32[BS, 1]
            return row, j_ok

        def tile_kv(row, j_ok):
            k = plgpu.load(kv_ref.at[row, h], mask=j_ok[:, None], other=0.0)  # [BS, H]
            v = plgpu.load(kv_ref.at[row + 1, h], mask=j_ok[:, None], other=0.0)
            return k, v

        def update(i, k, v, m, l, acc, masked: bool):
            s = dot(q, k, trans_b=True)  # f32[BM, BS]
            if soft_cap is None:
                s = s * (sm_scale * LOG2E)
            else:
                s = (soft_cap * LOG2E) * jnp.tanh(s * (sm_scale / soft_cap))
            if masked:
                j = lo + i * BS + s_arange
                vis = (j[None, :] < hi) & (j[None, :] <= qpos[:, None])
                if sliding_window is not None:
                    vis &= j[None, :] > qpos[:, None] - sliding_window
                s = jnp.where(vis, s, _MASK)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.exp2(s - m_new[:, None])
            if masked:
                p = jnp.where(vis, p, 0.0)
            alpha = jnp.exp2(m - m_new)
            l = l * alpha + jnp.sum(p, axis=1)
            acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
            return m_new, l, acc

        # prefetch 0: each tile loads its page ids, then its K/V (two dependent memory trips).
        # prefetch 1: the page ids of tile i+1 are loaded while tile i's K/V are in flight.
        # prefetch 2: tile i+1's K/V (and tile i+2's page ids) are loaded before tile i is used,
        # a register double buffer: memory latency overlaps the math even when the compiler's
        # own software pipelining does not happen.
        def body(i, carry, masked: bool):
            if cfg.prefetch == 0:
                m, l, acc = carry
                k, v = tile_kv(*tile_rows(i))
                return update(i, k, v, m, l, acc, masked)
            if cfg.prefetch == 1:
                m, l, acc, row, j_ok = carry
                k, v = tile_kv(row, j_ok)
                nxt = tile_rows(i + 1)
                return (*update(i, k, v, m, l, acc, masked), *nxt)
            m, l, acc, k, v, row, j_ok = carry
            k_n, v_n = tile_kv(row, j_ok)
            nxt = tile_rows(i + 2)
            return (*update(i, k, v, m, l, acc, masked), k_n, v_n, *nxt)

        H = q_ref.shape[1]
        carry = (
            jnp.full((BM,), _MASK, jnp.float32),
            jnp.zeros((BM,), jnp.float32),
            jnp.zeros((BM, H), jnp.float32),
        )
        if cfg.prefetch == 1:
            carry = (*carry, *tile_rows(t_begin))
        elif cfg.prefetch == 2:
            carry = (*carry, *tile_kv(*tile_rows(t_begin)), *tile_rows(t_begin + 1))
        mid = jnp.maximum(t_begin, jnp.minimum(t_end, n_free))
        carry = lax.fori_loop(t_begin, mid, functools.partial(body, masked=False), carry)
        carry = lax.fori_loop(mid, t_end, functools.partial(body, masked=True), carry)
        m, l, acc = carry[:3]
        if S == 1:
            (o_ref,) = out_refs
            out = acc / jnp.where(l > 0, l, 1.0)[:, None]
            plgpu.store(o_ref.at[qrow, h], out.astype(o_ref.dtype), mask=row_ok[:, None])
        else:
            acc_ref, m_ref, l_ref = out_refs
            prow = jnp.where(row_ok[:, None], sp * (T * N) + qrow, S * T * N)  # i32[BM, 1]
            plgpu.store(acc_ref.at[prow, h], acc, mask=row_ok[:, None])
            plgpu.store(m_ref.at[prow[:, 0]], m, mask=row_ok)
            plgpu.store(l_ref.at[prow[:, 0]], l, mask=row_ok)


def _merge_kernel(ns_ref, cu_ref, acc_ref, m_ref, l_ref, o_ref, *, S: int, TN: int, N: int):
    """One output row from its S splits' (acc, m, l): weights exp2(m_s - max m), all S partial
    rows loaded at once. Rows past the step's tokens (whose partials were never written) get 0."""
    i = pl.program_id(0)
    SP = max(2, rpa._pow2_at_least(S))
    s = lax.broadcasted_iota(jnp.int32, (SP,), 0)
    ok = s < S
    prow = jnp.where(ok, s * TN + i, 0)
    m = plgpu.load(m_ref.at[prow], mask=ok, other=_MASK)  # f32[SP]
    l = plgpu.load(l_ref.at[prow], mask=ok, other=0.0)
    h = lax.broadcasted_iota(jnp.int32, (1, acc_ref.shape[1]), 1)
    acc = plgpu.load(acc_ref.at[prow[:, None], h], mask=ok[:, None], other=0.0)  # f32[SP, H]
    w = jnp.where(ok, jnp.exp2(m - jnp.max(m)), 0.0)
    den = jnp.sum(w * l)
    out = jnp.sum(w[:, None] * acc, axis=0, keepdims=True) / jnp.where(den > 0, den, 1.0)
    valid = i < cu_ref[ns_ref[0]] * N
    out = jnp.where(valid, out, 0.0)
    plgpu.store(o_ref.at[jnp.full((1, 1), i, jnp.int32), h], out.astype(o_ref.dtype))


def _merge(acc, m, l, num_seqs, cu_q_lens, S: int, T: int, N: int, dtype, interpret: bool):
    """[T*N, H] in dtype: the splits' partials merged by one Pallas kernel (one launch, where
    XLA's merge took three reductions and a select)."""
    TN, H = T * N, acc.shape[1]
    return pl.pallas_call(
        functools.partial(_merge_kernel, S=S, TN=TN, N=N),
        out_shape=jax.ShapeDtypeStruct((TN, H), dtype),
        grid=(TN,),
        compiler_params=plgpu.CompilerParams(
            num_warps=1 if S <= MERGE_ONE_WARP_MAX_SPLITS else 4, num_stages=1
        ),
        interpret=interpret,
        name=f"ragged_paged_attention_merge_x{S}",
    )(num_seqs.astype(jnp.int32), cu_q_lens, acc, m, l)


def gpu_ragged_paged_attention(
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
    config: GpuConfig | None = None,
    interpret: bool = False,
) -> jax.Array:  # [T, N, H] in q.dtype; padding tokens zero
    """The Pallas (Triton lowering) kernel; inputs as validated by ragged_paged_attention."""
    T, N, H = q.shape
    P, page_size, K2, _ = kv_pages.shape
    K = K2 // 2
    G = N // K
    B, pps = page_indices.shape
    if H not in HEAD_DIMS:
        raise ValueError(f"head_dim={H} is not supported by the GPU kernel: use one of {HEAD_DIMS}")
    cfg = config or choose_config(
        T, B, N, K, H, pps * page_size, max_q_len, itemsize=jnp.dtype(kv_pages.dtype).itemsize
    )
    if cfg.block_m < G:
        raise ValueError(
            f"GpuConfig.block_m={cfg.block_m} must be >= G={G} query heads per kv head"
        )
    BQ = cfg.block_m // G
    S = cfg.num_splits
    # Decode-only steps (every sequence at most one query token) need no block map: block i is
    # sequence i. That drops the map's XLA fusion and a dependent load at each program's start.
    direct = max_q_len == 1
    if direct:
        NB = B
        blk_seq = blk_q0 = num_seqs.astype(jnp.int32)
    else:
        NB = rpa.num_q_blocks(T, B, BQ)
        blk_seq, blk_q0, _ = rpa.q_block_map(cu_q_lens, num_seqs, BQ, NB)

    kernel = functools.partial(
        _kernel, G=G, K=K, N=N, T=T, page_size=page_size, pps=pps, cfg=cfg, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap,
        exact_f32=jnp.dtype(q.dtype) == jnp.float32, direct=direct,
    )  # fmt: skip
    if S == 1:
        out_shape = jax.ShapeDtypeStruct((T * N, H), q.dtype)
    else:
        out_shape = (
            jax.ShapeDtypeStruct((S * T * N, H), jnp.float32),
            jax.ShapeDtypeStruct((S * T * N,), jnp.float32),
            jax.ShapeDtypeStruct((S * T * N,), jnp.float32),
        )
    res = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(NB, K, S),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_m{cfg.block_m}_s{cfg.block_s}_x{S}",
    )(
        blk_seq, blk_q0, kv_lens, cu_q_lens, page_indices.reshape(B * pps),
        q.reshape(T * N, H), kv_pages.reshape(P * page_size * K2, H),
    )  # fmt: skip
    if S > 1 and cfg.merge_kernel:
        return _merge(*res, num_seqs, cu_q_lens, S, T, N, q.dtype, interpret).reshape(T, N, H)
    if S == 1:
        out = res.reshape(T, N, H)
    else:  # XLA's merge (GpuConfig.merge_kernel=False)
        acc, m, l = (x.reshape(S, T * N, *x.shape[1:]) for x in res)
        m_all = jnp.max(m, axis=0)  # f32[T*N]
        w = jnp.exp2(m - m_all)  # f32[S, T*N]
        den = jnp.sum(w * l, axis=0)
        num = jnp.sum(w[..., None] * acc, axis=0)  # f32[T*N, H]
        out = (num / jnp.where(den > 0, den, 1.0)[:, None]).reshape(T, N, H)
    # Rows of padding tokens were never written (S == 1) or merge garbage (S > 1).
    valid = jnp.arange(T) < cu_q_lens[num_seqs[0]]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
