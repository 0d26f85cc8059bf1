"""The backward's u = dy · B_g^T and dB_g = Σ spᵀ · dy from one pass over dy (`gmm_tgmm`), on
lora_gpu.py's helpers (spans, masked loads, visit bounds). lora_gpu re-exports it; the measured
choice (one kernel against gmm + tgmm) is in docs/kernels/lora.md."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from rtpjax.kernels import lora
from rtpjax.kernels.lora_gpu import (
    KernelConfig,
    _bounds,
    _cdiv,
    _dot,
    _iota,
    _load,
    _mask,
    _pow2,
    _span,
    _store,
    _store_slot_block,
)

__all__ = ["gmm_tgmm"]


def _udb_kernel(
    bounds_ref,  # i32[2*(G+1)]: starts then ends (the tail's last in each)
    rank_ref,  # i32[G]
    dy_ref,  # [T, O]
    b_ref,  # [G*R, O]
    sp_ref,  # [T, R]
    u_ref,  # f32[NN*T, R]: column block j's share of u in rows j*T ..
    db_ref,  # [S*G*R, O]: the output dtype when S == 1, else f32 partials
    *,
    G: int,
    S: int,
    cfg: KernelConfig,
):
    T, O = dy_ref.shape
    R = sp_ref.shape[1]
    BT, BN, RP = cfg.block_t, cfg.block_n, _pow2(R)
    NN = _cdiv(O, BN)
    g, j, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = bounds_ref[g], bounds_ref[G + 1 + g]
    per = (((end - start + S - 1) // S + BT - 1) // BT) * BT  # rows per split, whole tiles
    lo = start + sp * per
    hi = jnp.minimum(end, lo + per)
    cols = _span(j * BN, BN, O)
    r_all = _span(0, RP, R)
    # b's rows and sp's columns past the slot's rank are never read (b may hold anything
    # there); zeros in their place keep u's columns and dB's rows past the rank exactly 0.
    r_live = _span(0, RP, R, limit=rank_ref[g])
    bt = _load(b_ref, g * R + r_live.load, cols.load, _mask(r_live.ok, cols.ok))  # [RP, BN]
    bt = bt.astype(dy_ref.dtype)

    def body(i, acc):
        rows = lo + i * BT + _iota(BT)
        ok = rows < hi
        rc = jnp.minimum(rows, T - 1)
        dyt = _load(dy_ref, rc, cols.load, _mask(ok, cols.ok))  # [BT, BN], read once for both
        spt = _load(sp_ref, rc, r_live.load, _mask(ok, r_live.ok)).astype(dyt.dtype)  # [BT, RP]
        u = _dot(dyt, bt, trans_b=True)  # f32[BT, RP]
        _store(u_ref, jnp.where(ok, j * T + rc, NN * T), r_all.store, u, _mask(ok, r_all.ok))
        return acc + _dot(spt, dyt, trans_a=True)  # f32[RP, BN]

    steps = (jnp.maximum(hi - lo, 0) + BT - 1) // BT
    acc = lax.fori_loop(0, steps, body, jnp.zeros((RP, BN), jnp.float32))
    _store_slot_block(db_ref, acc, sp * G + g, R, S * G * R, r_all, cols)


def gmm_tgmm(
    dy: jax.Array,  # [T, O]
    b: jax.Array,  # [G, R, O]
    sp: jax.Array,  # [T, R]: the forward's s times each row's scale
    m: lora.GroupMeta,
    out_dtype: jnp.dtype,
    *,
    cfg: KernelConfig,
    interpret: bool = False,
    num_sms: int = 132,
    bounds: jax.Array | None = None,  # i32[2*(G+1)]: visit_map's bounds, flattened
) -> tuple[jax.Array, jax.Array]:  # (u f32[T, R], db [G, R, O] in out_dtype)
    """The backward's u = dy · B_g^T and dB_g = sum over the slot's rows of sp^T dy, from one
    pass over dy (gmm(dy, b, trans=True) and tgmm(sp, dy) read it once each).

    u is zero past each slot's rank and past the groups; dB is zero past each slot's rank and
    for empty slots (float32 accumulation). Grid (G, O / block_n, S): program (g, j, s) walks
    split s of slot g's rows in tiles of block_t rows, adding sp^T dy into its dB block in
    registers and writing dy · B_g[:, j-block]^T as column block j's float32 partial of u
    ([O / block_n, T, R], 4 MB at T = 4096, R = 16, block_n = 256), which XLA sums with the
    mask. cfg.splits (0 = automatic: more when G · O / block_n is under 2 programs per SM)
    splits each slot's rows; dB then comes from float32 partials summed by XLA, as in tgmm.
    cfg.block_k is not used; `bounds` as in tgmm."""
    T, O = dy.shape
    G, R = b.shape[0], b.shape[1]
    if b.shape != (G, R, O) or sp.shape != (T, R) or m.starts.shape != (G,):
        raise ValueError(
            f"gmm_tgmm: dy {dy.shape}, b {b.shape}, sp {sp.shape}, {m.starts.shape[0]} slots "
            "must be [T, O], [G, R, O], [T, R] and G slots"
        )
    bn = min(cfg.block_n, _pow2(O))
    cfg = dataclasses.replace(cfg, block_n=bn)
    nn = _cdiv(O, bn)
    S = cfg.splits or max(1, min(16, (2 * num_sms) // (G * nn)))
    if bounds is None:
        bounds = _bounds(m, T)
    u_parts, db = pl.pallas_call(
        functools.partial(_udb_kernel, G=G, S=S, cfg=cfg),
        out_shape=(
            jax.ShapeDtypeStruct((nn * T, R), jnp.float32),
            jax.ShapeDtypeStruct((S * G * R, O), out_dtype if S == 1 else jnp.float32),
        ),
        grid=(G, nn, S),
        compiler_params=cfg.params(),
        interpret=interpret,
        name=f"lora_udb_t{cfg.block_t}_n{bn}_s{S}",
    )(bounds, m.rank, dy, b.reshape(G * R, O), sp)
    # Rows past the groups are written by no program (whatever memory held): the select drops
    # them, as it drops nothing else (columns past a rank are already 0).
    u = u_parts if nn == 1 else jnp.sum(u_parts.reshape(nn, T, R), axis=0)
    u = jnp.where(lora.live_mask(m, R), u, 0.0)  # f32[T, R]
    db = db.reshape(S, G, R, O)
    return u, (db[0] if S == 1 else jnp.sum(db, axis=0)).astype(out_dtype)
