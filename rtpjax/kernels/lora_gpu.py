"""Batched multi-LoRA on NVIDIA GPUs: Pallas kernels (Triton lowering) for lora.py's operator.

Rows are sorted by adapter slot. The row axis is cut into tiles of block_t rows; a tile that
straddles slots is visited once per slot it touches, each visit loading and storing only its own
slot's rows (the SGMV idea of Punica/S-LoRA). Rows past the slots form one extra "tail" slot whose
visits store zeros, so every output row is written exactly once and nothing needs a memset. The
visit list is a static-length array (ceil(T / block_t) + G entries, the tail counted) built on
device from group_sizes; surplus visits do nothing.

Kernels:
- gmm: row t times its slot's matrix, [T, K] x [G, K, N] (or [G, N, K] read transposed) -> [T, N].
  The forward is two of them (DEFAULT_CONFIG): shrink s = x · A_g (a K loop, split over programs
  with float32 partials) and expand delta = (scale_g · s) · B_g (blocks of O; with a base it adds
  into the base in place). The backward: u = dy · B_g^T (like the shrink) and dx = du · A_g^T.
- fused forward (FUSED_CONFIG): per visit, the shrink then the expand in one program: x read once
  and no launch between, but only one program per row tile; it measured slower.
- tgmm: per slot, sum over its rows of lhs^T rhs -> [G, K, N]: grads of A and B. With few
  programs the slot's rows are split over `splits` programs whose float32 partials XLA sums.
- gmm_tgmm (lora_gpu_udb.py, on this module's helpers): the backward's u = dy · B_g^T and dB
  in one pass over dy (both read it).

All kernels run in Pallas interpret mode on CPU (the tests do that). The choices and measured
figures are in docs/kernels/lora.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from rtpjax.kernels import lora

__all__ = [
    "DEFAULT_CONFIG",
    "FUSED_CONFIG",
    "GpuBackend",
    "KernelConfig",
    "LoraGpuConfig",
    "gmm",
    "gpu_lora_delta",
    "supports",
    "tgmm",
    "visit_map",
]

MAX_RANK = 128  # s, u and the rank-sized accumulators live in registers


def supports(rank: int, dtype: jnp.dtype) -> bool:
    """Whether the kernels cover this r_max (else "auto" takes the xla path)."""
    return 1 <= rank <= MAX_RANK and jnp.dtype(dtype) in lora._DTYPES


def _pow2(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static shape of one kernel. block_t: rows per tile; block_k: reduction chunk; block_n:
    output columns per program; splits: programs sharing one reduction (tgmm: a slot's rows;
    gmm with a float32 output: the K axis), their float32 partials summed by XLA."""

    block_t: int = 32
    block_k: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3
    splits: int = 0  # 0 = choose from the shapes

    def __post_init__(self) -> None:
        for name in ("block_t", "block_k", "block_n"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"KernelConfig.{name}={val} must be a power of two >= 16")
        if self.splits < 0:
            raise ValueError(f"KernelConfig.splits={self.splits} must be >= 0 (0 = automatic)")

    def params(self) -> plgpu.CompilerParams:
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


@dataclasses.dataclass(frozen=True)
class LoraGpuConfig:
    """Per-kernel shapes: fwd (fused forward, or the shrink when fused_fwd is False), expand (the
    unfused forward's second launch and dx), shrink_t (u = dy · B^T), tgmm (grads of A and B),
    udb (u and the grad of B in one pass over dy, used when fused_udb; else shrink_t and tgmm).
    The defaults are the fastest of the H100 sweeps in docs/kernels/lora.md."""

    fwd: KernelConfig = KernelConfig(block_t=32, block_k=128)
    expand: KernelConfig = KernelConfig(block_t=32, block_k=16, block_n=128)
    shrink_t: KernelConfig = KernelConfig(block_t=32, block_k=128)
    tgmm: KernelConfig = KernelConfig(block_t=64, block_k=64, block_n=64)
    fused_fwd: bool = False
    # The backward's u and dB from one pass over dy (gmm_tgmm) instead of shrink_t + tgmm.
    # bench_lora.py --udb-sweep on the H100: the fastest of 8 shapes at G = 1, 8 and 64.
    udb: KernelConfig = KernelConfig(block_t=64, block_k=16, block_n=256, num_warps=4, num_stages=4)
    fused_udb: bool = True


# The fused forward's best shape in the same sweep (x read once, but fewer programs in flight).
FUSED_CONFIG = LoraGpuConfig(
    fwd=KernelConfig(block_t=32, block_k=128, block_n=256, num_warps=8), fused_fwd=True
)
DEFAULT_CONFIG = LoraGpuConfig()


# --------------------------------------------------------------------------------- visit map


def _bounds(m: lora.GroupMeta, T: int) -> jax.Array:
    """i32[2*(G+1)]: each slot's first rows, the tail's (rows past the groups) last, then each
    one's end."""
    starts = jnp.concatenate([m.starts, m.ends[-1:]])  # i32[G+1]
    ends = jnp.concatenate([m.ends, jnp.full((1,), T, jnp.int32)])  # i32[G+1]
    return jnp.concatenate([starts, ends]).astype(jnp.int32)


def visit_map(m: lora.GroupMeta, T: int, block_t: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(visit_slot i32[NV], visit_tile i32[NV], bounds i32[2, G+1]) with NV = ceil(T/bt) + G.

    Slot G is the tail (rows past the groups); visit_slot G+1 marks a surplus visit. bounds holds
    each slot's [start, end) rows, the tail's included.
    """
    G = m.starts.shape[0]
    starts, ends = _bounds(m, T).reshape(2, G + 1)
    first = starts // block_t
    n_tiles = jnp.where(ends > starts, (ends - 1) // block_t - first + 1, 0)  # i32[G+1]
    cum = jnp.cumsum(n_tiles)
    NV = _cdiv(T, block_t) + G
    v = jnp.arange(NV, dtype=jnp.int32)
    vslot = jnp.sum(cum[None, :] <= v[:, None], axis=1, dtype=jnp.int32)  # i32[NV] in [0, G+1]
    sl = jnp.minimum(vslot, G)
    vtile = first[sl] + v - (cum[sl] - n_tiles[sl])
    return vslot, vtile.astype(jnp.int32), jnp.stack([starts, ends]).astype(jnp.int32)


def _dot(a: jax.Array, b: jax.Array, **kw) -> jax.Array:
    if a.dtype == jnp.float32:
        kw["allow_tf32"] = False  # float32 LoRA asks for float32 products, as the reference
    return plgpu.dot(a, b, **kw)


def _iota(n: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


class _Span(NamedTuple):
    """Indices of one block along an axis of `size` entries."""

    load: jax.Array  # i32[n]: clamped into range (always safe to form an address)
    store: jax.Array  # i32[n]: past the end where out of range
    ok: jax.Array | None  # bool[n]; None when the block never runs past the end (no mask, so
    # Triton keeps the axis provably contiguous and vectorises its loads)


def _span(start: jax.Array | int, n: int, size: int, limit: jax.Array | None = None) -> _Span:
    """start must be a multiple of n; limit (traced) narrows the valid range below size."""
    idx = start + _iota(n)
    if size % n == 0 and limit is None:
        return _Span(idx, idx, None)
    ok = idx < (size if limit is None else jnp.minimum(limit, size))
    return _Span(jnp.minimum(idx, size - 1), jnp.where(ok, idx, size), ok)


def _mask(rows: jax.Array | None, cols: jax.Array | None) -> jax.Array | None:
    """2-D mask from per-row and per-column masks (None = all true)."""
    if rows is None and cols is None:
        return None
    if rows is None:
        return jnp.broadcast_to(cols[None, :], (1, cols.shape[0]))
    if cols is None:
        return rows[:, None]
    return rows[:, None] & cols[None, :]


def _load(ref, rows: jax.Array, cols: jax.Array, mask: jax.Array | None) -> jax.Array:
    shape = (rows.shape[0], cols.shape[0])
    if mask is None:
        return plgpu.load(ref.at[rows[:, None], cols[None, :]])
    return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=jnp.broadcast_to(mask, shape),
                      other=0.0)  # fmt: skip


def _store(ref, rows: jax.Array, cols: jax.Array, val: jax.Array, mask: jax.Array | None):
    if mask is None:
        plgpu.store(ref.at[rows[:, None], cols[None, :]], val)
    else:
        plgpu.store(ref.at[rows[:, None], cols[None, :]], val,
                    mask=jnp.broadcast_to(mask, val.shape))  # fmt: skip


def _visit(vslot_ref, vtile_ref, bounds_ref, G: int, BT: int, T: int):
    """(slot, row span) of this program's visit; rows outside the slot are masked off. Masked
    rows point past the array: never dereferenced on the GPU, and dropped by interpret mode's
    scatter (an in-range dummy row could race a real row's store there)."""
    g = vslot_ref[pl.program_id(0)]
    gi = jnp.minimum(g, G)
    rows = vtile_ref[pl.program_id(0)] * BT + _iota(BT)  # i32[BT]
    ok = (rows >= bounds_ref[gi]) & (rows < bounds_ref[G + 1 + gi])  # bool[BT]
    return g, _Span(jnp.minimum(rows, T - 1), jnp.where(ok, rows, T), ok)


# ---------------------------------------------------------------------------- forward kernels


def _fwd_kernel(
    vslot_ref,  # i32[NV]
    vtile_ref,  # i32[NV]
    bounds_ref,  # i32[2*(G+1)]: starts then ends
    scale_ref,  # f32[G]
    rank_ref,  # i32[G]
    x_ref,  # [T, I]
    a_ref,  # [G*I, R]
    b_ref,  # [G*R, O]
    *rest,  # [base [T, O] (aliased to d)], s f32[T, R] (s masked to the rank, unscaled),
    # [d [T, O]] (fused only)
    G: int,
    cfg: KernelConfig,
    fused: bool,
    has_base: bool,
):
    if has_base:
        base_ref, s_ref, d_ref = rest
    else:
        base_ref, s_ref, d_ref = None, rest[0], (rest[1] if fused else None)
    T, I = x_ref.shape
    R = a_ref.shape[1]
    BT, BK, BN, RP = cfg.block_t, cfg.block_k, cfg.block_n, _pow2(R)
    g, rows = _visit(vslot_ref, vtile_ref, bounds_ref, G, BT, T)
    r = _span(0, RP, R)
    s_mask = _mask(rows.ok, r.ok)

    def store_d(sp):  # sp: [BT, RP] in b's dtype, or None for zeros
        O = d_ref.shape[1]

        def body(j, carry):
            cols = _span(j * BN, BN, O)
            mask = _mask(rows.ok, cols.ok)
            if sp is None:
                d = jnp.zeros((BT, BN), d_ref.dtype)
            else:
                # B's rows past the slot's rank are never read (they may hold anything).
                r_live = _span(0, RP, R, limit=rank_ref[g])
                bt = _load(b_ref, g * R + r_live.load, cols.load, _mask(r_live.ok, cols.ok))
                d = _dot(sp, bt)  # f32[BT, BN]
                if base_ref is not None:
                    d += _load(base_ref, rows.load, cols.load, mask).astype(jnp.float32)
                d = d.astype(d_ref.dtype)
            _store(d_ref, rows.store, cols.store, d, mask)
            return carry

        lax.fori_loop(0, _cdiv(O, BN), body, 0)

    @pl.when(g == G)
    def _tail():
        _store(s_ref, rows.store, r.store, jnp.zeros((BT, RP), jnp.float32), s_mask)
        if d_ref is not None and base_ref is None:  # with a base, its rows already hold it
            store_d(None)

    @pl.when(g < G)
    def _live():
        def body(k, acc):
            kk = _span(k * BK, BK, I)
            xt = _load(x_ref, rows.load, kk.load, _mask(rows.ok, kk.ok))  # [BT, BK]
            at = _load(a_ref, g * I + kk.load, r.load, _mask(kk.ok, r.ok))  # [BK, RP]
            return acc + _dot(xt, at.astype(xt.dtype))

        acc = lax.fori_loop(0, _cdiv(I, BK), body, jnp.zeros((BT, RP), jnp.float32))
        s = jnp.where((_iota(RP) < rank_ref[g])[None, :], acc, 0.0)  # f32[BT, RP]
        _store(s_ref, rows.store, r.store, s, s_mask)
        if d_ref is not None:
            store_d((s * scale_ref[g]).astype(b_ref.dtype))


def _fwd(x, a, b, m, vm, cfg: KernelConfig, fused: bool, interpret: bool, base=None):
    """(s f32[T, R], delta (or base + delta) [T, O], or None when not fused)."""
    T, I = x.shape
    G, _, R = a.shape
    O = b.shape[2]
    vslot, vtile, bounds = vm
    has_base = fused and base is not None
    out_shape = [jax.ShapeDtypeStruct((T, R), jnp.float32)]
    if fused:
        out_shape.append(jax.ShapeDtypeStruct((T, O), x.dtype))
    args = [vslot, vtile, bounds.reshape(-1), m.scale, m.rank, x, a.reshape(G * I, R),
            b.reshape(G * R, O)]  # fmt: skip
    if has_base:
        args.append(base)
    res = pl.pallas_call(
        functools.partial(_fwd_kernel, G=G, cfg=cfg, fused=fused, has_base=has_base),
        out_shape=tuple(out_shape),
        grid=(vslot.shape[0],),
        input_output_aliases={len(args) - 1: 1} if has_base else {},
        compiler_params=cfg.params(),
        interpret=interpret,
        name=f"lora_{'fwd' if fused else 'shrink'}_t{cfg.block_t}_k{cfg.block_k}_n{cfg.block_n}",
    )(*args)
    return (res[0], res[1]) if fused else (res[0], None)


# ------------------------------------------------------------------------------- gmm and tgmm


def _gmm_kernel(
    vslot_ref,  # i32[NV]
    vtile_ref,  # i32[NV]
    bounds_ref,  # i32[2*(G+1)]
    rank_ref,  # i32[G]
    lhs_ref,  # [T, K]
    w_ref,  # [G*K, N], or [G*N, K] when trans
    *rest,  # [base [T, N] (aliased to out)], out [S*T, N] (S = splits: partial sums over K)
    G: int,
    trans: bool,
    k_is_rank: bool,
    splits: int,
    cfg: KernelConfig,
):
    base_ref, out_ref = rest if len(rest) == 2 else (None, rest[0])
    T, K = lhs_ref.shape
    N = out_ref.shape[1]
    BT, BK, BN = cfg.block_t, cfg.block_k, cfg.block_n
    g, rows = _visit(vslot_ref, vtile_ref, bounds_ref, G, BT, T)
    cols = _span(pl.program_id(1) * BN, BN, N)
    out_mask = _mask(rows.ok, cols.ok)
    nk = _cdiv(K, BK)
    k_lo, k_hi = 0, nk
    if splits > 1:  # this program sums K blocks [k_lo, k_hi) into its own partial's rows
        per = _cdiv(nk, splits)
        sp = pl.program_id(2)
        k_lo, k_hi = sp * per, jnp.minimum(nk, (sp + 1) * per)
        rows = rows._replace(store=jnp.where(rows.ok, sp * T + rows.load, splits * T))

    if base_ref is None:  # with a base, the tail's rows already hold it

        @pl.when(g == G)
        def _tail():
            _store(out_ref, rows.store, cols.store, jnp.zeros((BT, BN), out_ref.dtype), out_mask)

    @pl.when(g < G)
    def _live():
        def body(k, acc):
            # Reducing over the rank: w's entries past the slot's rank are never read (they may
            # hold anything, e.g. a larger adapter's leftovers).
            kk = _span(k * BK, BK, K, limit=rank_ref[g] if k_is_rank else None)
            lt = _load(lhs_ref, rows.load, kk.load, _mask(rows.ok, kk.ok))  # [BT, BK]
            if trans:
                wt = _load(w_ref, g * N + cols.load, kk.load, _mask(cols.ok, kk.ok))  # [BN, BK]
                return acc + _dot(lt, wt.astype(lt.dtype), trans_b=True)
            wt = _load(w_ref, g * K + kk.load, cols.load, _mask(kk.ok, cols.ok))  # [BK, BN]
            return acc + _dot(lt, wt.astype(lt.dtype))

        acc = lax.fori_loop(k_lo, k_hi, body, jnp.zeros((BT, BN), jnp.float32))
        if base_ref is not None:
            acc += _load(base_ref, rows.load, cols.load, out_mask).astype(jnp.float32)
        _store(out_ref, rows.store, cols.store, acc.astype(out_ref.dtype), out_mask)


def gmm(
    lhs: jax.Array,  # [T, K]
    w: jax.Array,  # [G, K, N], or [G, N, K] when trans
    m: lora.GroupMeta,
    trans: bool,
    out_dtype: jnp.dtype,
    *,
    cfg: KernelConfig,
    k_is_rank: bool = False,
    vm: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    base: jax.Array | None = None,
    interpret: bool = False,
    num_sms: int = 132,
) -> jax.Array:  # [T, N] in out_dtype; rows past the groups 0 (or base's)
    """Row t of lhs times its slot's matrix (plus base[t], added in place, when given).
    k_is_rank: K is the rank axis, read only up to each slot's rank. cfg.splits > 1 (or 0 =
    automatic, for float32 outputs without a base) splits K over that many programs per tile,
    whose float32 partials XLA sums: more loads in flight when a long K meets few row tiles."""
    T, K = lhs.shape
    G = w.shape[0]
    N = w.shape[1] if trans else w.shape[2]
    # The small side (a rank) fits one block: one K step, or one column block.
    bk = min(cfg.block_k, _pow2(K))
    bn = min(cfg.block_n, _pow2(N))
    cfg = dataclasses.replace(cfg, block_k=bk, block_n=bn)
    vslot, vtile, bounds = vm if vm is not None else visit_map(m, T, cfg.block_t)
    nv, nn, nk = vslot.shape[0], _cdiv(N, bn), _cdiv(K, bk)
    S = 1
    if base is None and jnp.dtype(out_dtype) == jnp.float32:
        S = cfg.splits or max(1, min(8, nk // 4, (4 * num_sms) // (nv * nn)))
        S = max(1, min(S, nk))
    args = [vslot, vtile, bounds.reshape(-1), m.rank, lhs, w.reshape(G * w.shape[1], w.shape[2])]
    if base is not None:
        args.append(base.astype(out_dtype))
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, G=G, trans=trans, k_is_rank=k_is_rank, splits=S, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct((S * T, N), out_dtype),
        grid=(nv, nn, S) if S > 1 else (nv, nn),
        input_output_aliases={len(args) - 1: 0} if base is not None else {},
        compiler_params=cfg.params(),
        interpret=interpret,
        name=f"lora_gmm{'_t' if trans else ''}_t{cfg.block_t}_k{bk}_n{bn}_s{S}",
    )(*args)
    return out if S == 1 else jnp.sum(out.reshape(S, T, N), axis=0)


def _tgmm_kernel(
    bounds_ref,  # i32[2*(G+1)]
    lhs_ref,  # [T, K]
    rhs_ref,  # [T, N]
    out_ref,  # [S*G*K, N]: out_dtype when S == 1, else f32 partials
    *,
    G: int,
    S: int,
    cfg: KernelConfig,
):
    T, K = lhs_ref.shape
    N = rhs_ref.shape[1]
    BT, BK, BN = cfg.block_t, cfg.block_k, cfg.block_n
    g, sp = pl.program_id(0), pl.program_id(3)
    start, end = bounds_ref[g], bounds_ref[G + 1 + g]
    per = (((end - start + S - 1) // S + BT - 1) // BT) * BT  # rows per split, whole tiles
    lo = start + sp * per
    hi = jnp.minimum(end, lo + per)
    kk = _span(pl.program_id(1) * BK, BK, K)
    cols = _span(pl.program_id(2) * BN, BN, N)

    def body(i, acc):
        rows = lo + i * BT + _iota(BT)
        ok = rows < hi
        rc = jnp.minimum(rows, T - 1)
        lt = _load(lhs_ref, rc, kk.load, _mask(ok, kk.ok))  # [BT, BK]
        rt = _load(rhs_ref, rc, cols.load, _mask(ok, cols.ok))  # [BT, BN]
        return acc + _dot(lt, rt.astype(lt.dtype), trans_a=True)

    steps = (jnp.maximum(hi - lo, 0) + BT - 1) // BT
    acc = lax.fori_loop(0, steps, body, jnp.zeros((BK, BN), jnp.float32))
    _store_slot_block(out_ref, acc, sp * G + g, K, S * G * K, kk, cols)


def _store_slot_block(out_ref, acc, block, K: int, end: int, kk: _Span, cols: _Span) -> None:
    """Store acc [BK, BN] as rows kk of block `block` (K rows each) of out_ref; masked rows point
    at `end` (past the array) and are never written."""
    orow = block * K + kk.store
    if kk.ok is not None:
        orow = jnp.where(kk.ok, orow, end)
    _store(out_ref, orow, cols.store, acc.astype(out_ref.dtype), _mask(kk.ok, cols.ok))


def tgmm(
    lhs: jax.Array,  # [T, K]
    rhs: jax.Array,  # [T, N]
    m: lora.GroupMeta,
    G: int,
    out_dtype: jnp.dtype,
    *,
    cfg: KernelConfig,
    interpret: bool = False,
    num_sms: int = 132,
    bounds: jax.Array | None = None,  # i32[2*(G+1)]: visit_map's bounds, flattened
) -> jax.Array:  # [G, K, N] in out_dtype; empty slots 0
    """Per slot, the sum over its rows of lhs^T rhs (float32 accumulation). `bounds` (each
    slot's and the tail's [start, end) rows, as visit_map gives them) saves building them here:
    a step that shares one row grouping across projections builds them once."""
    T, K = lhs.shape
    N = rhs.shape[1]
    bk = min(cfg.block_k, _pow2(K))
    bn = min(cfg.block_n, _pow2(N))
    cfg = dataclasses.replace(cfg, block_k=bk, block_n=bn)
    programs = G * _cdiv(K, bk) * _cdiv(N, bn)
    S = cfg.splits or max(1, min(8, (2 * num_sms) // programs))
    if bounds is None:
        bounds = _bounds(m, T)
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, G=G, S=S, cfg=cfg),
        # One split writes the result in its dtype; several write float32 partials to sum.
        out_shape=jax.ShapeDtypeStruct((S * G * K, N), out_dtype if S == 1 else jnp.float32),
        grid=(G, _cdiv(K, bk), _cdiv(N, bn), S),
        compiler_params=cfg.params(),
        interpret=interpret,
        name=f"lora_tgmm_t{cfg.block_t}_k{bk}_n{bn}_s{S}",
    )(bounds, lhs, rhs)
    out = out.reshape(S, G, K, N)
    return (out[0] if S == 1 else jnp.sum(out, axis=0)).astype(out_dtype)


# ----------------------------------------------------------------------------------- backend


@dataclasses.dataclass(frozen=True)
class GpuBackend:
    """lora.py's backend contract: fwd -> (delta, s_live); bwd -> (dx, da, db, u_live)."""

    config: LoraGpuConfig = DEFAULT_CONFIG
    interpret: bool = False

    def fwd(self, x, a, b, m, base=None):
        cfg = self.config
        T = x.shape[0]
        vm = visit_map(m, T, cfg.fwd.block_t)
        if cfg.fused_fwd:
            s, delta = _fwd(x, a, b, m, vm, cfg.fwd, True, self.interpret, base)
        else:
            s = gmm(x, a, m, False, jnp.float32, cfg=cfg.fwd, vm=vm, interpret=self.interpret)
            s = jnp.where(lora.live_mask(m, a.shape[2]), s, 0.0)  # f32[T, R]
            sp = (s * lora.row_scale(m)[:, None]).astype(b.dtype)  # [T, R]
            vm_e = vm if cfg.expand.block_t == cfg.fwd.block_t else None
            delta = gmm(sp, b, m, False, x.dtype, cfg=cfg.expand, k_is_rank=True, vm=vm_e,
                        base=base, interpret=self.interpret)  # fmt: skip
        return delta, s

    def bwd(self, x, a, b, m, s, dy):
        cfg = self.config
        G = a.shape[0]
        rs = lora.row_scale(m)[:, None]  # f32[T, 1]
        sp = (s * rs).astype(dy.dtype)  # [T, R]
        if cfg.fused_udb:
            from rtpjax.kernels.lora_gpu_udb import gmm_tgmm  # built on this module

            u, db = gmm_tgmm(dy, b, sp, m, b.dtype, cfg=cfg.udb, interpret=self.interpret)
        else:
            u = gmm(dy, b, m, True, jnp.float32, cfg=cfg.shrink_t, interpret=self.interpret)
            u = jnp.where(lora.live_mask(m, a.shape[2]), u, 0.0)  # f32[T, R]
            db = tgmm(sp, dy, m, G, b.dtype, cfg=cfg.tgmm, interpret=self.interpret)
        du = (u * rs).astype(a.dtype)
        dx = gmm(du, a, m, True, x.dtype, cfg=cfg.expand, k_is_rank=True,
                 interpret=self.interpret)  # fmt: skip
        da = tgmm(x, du.astype(x.dtype), m, G, a.dtype, cfg=cfg.tgmm, interpret=self.interpret)
        return dx, da, db, u


def gpu_lora_delta(
    x: jax.Array,  # [T, I]
    a: jax.Array,  # [G, I, R]
    b: jax.Array,  # [G, R, O]
    group_sizes: jax.Array,  # i32[G]
    scale: jax.Array,  # f32[G]
    *,
    rank: jax.Array | None = None,  # i32[G]
    base: jax.Array | None = None,  # [T, O] in x.dtype
    config: LoraGpuConfig | None = None,
    interpret: bool = False,
) -> jax.Array:  # [T, O] in x.dtype
    """lora.lora_delta through these kernels with an explicit config (benchmarks, tuning)."""
    lora.validate_inputs(x, a, b, group_sizes, scale, rank, "gpu", base)
    backend = GpuBackend(config or DEFAULT_CONFIG, interpret)
    return lora.lora_delta_with(backend, x, a, b, group_sizes, scale, rank=rank, base=base)
