"""Batched multi-LoRA: delta = scale_g · (x · A_g) · B_g for rows grouped by adapter slot g.

One operator for fine-tuning (many adapters trained at once, mLoRA) and multi-LoRA serving.

Layout:
  x            [T, I]     rows sorted by adapter slot: slot g owns rows offsets[g] ..
                          offsets[g]+group_sizes[g]-1 (offsets = exclusive cumsum of group_sizes);
                          rows at or past sum(group_sizes) belong to no adapter and get delta 0.
  a            [G, I, R]  stacked "A" (shrink) matrices, R = the largest rank (r_max).
  b            [G, R, O]  stacked "B" (expand) matrices.
  group_sizes  i32[G]     rows per slot (empty slots allowed); sizes are clipped at T.
  scale        f32[G]     per-slot scale (alpha / rank for plain LoRA).
  rank         i32[G]     per-slot rank <= R (None: every slot uses all R): columns r >= rank[g]
                          of a[g] and rows r >= rank[g] of b[g] are ignored, whatever they hold.

delta[t] = scale[g] · (x[t] @ a[g][:, :rank[g]]) @ b[g][:rank[g]], accumulated in float32 and
returned in x.dtype. With `base=` (the base projection x @ W, [T, O]) it returns base + delta:
on GPU the expand kernel adds in place, which saves the separate add pass of `x @ W + delta` (XLA
0.11 did not fold that add into the GEMM as beta = 1; measured in docs/kernels/lora.md).

Gradients (custom VJP) flow to x, a, b, scale and base; grads of a and b are exactly zero beyond
each slot's rank, and zero for empty slots. Nothing flows to group_sizes, rank or slot.

Paths (`impl`): "reference" (ref_lora_delta: a loop over slots in plain jnp; the test oracle),
"xla" (two masked dense einsums over all slots: cost grows with G·R, the CPU path and GPU fallback),
"gpu" (Pallas kernels, Triton lowering, lora_gpu.py; on a backend without a GPU it runs in Pallas
interpret mode, which the tests use), "tpu" (jax's megablox gmm/tgmm) and "auto" (by
jax.default_backend(): gpu → "gpu", tpu → "tpu", else "xla"). docs/kernels/lora.md has the
measurements behind the choices.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "IMPLS",
    "GroupMeta",
    "TpuBackend",
    "XlaBackend",
    "group_meta",
    "live_mask",
    "lora_delta",
    "lora_delta_by_slot",
    "lora_delta_with",
    "ref_lora_delta",
    "resolve_impl",
    "row_scale",
    "validate_inputs",
]

Impl = Literal["auto", "reference", "xla", "gpu", "tpu"]
IMPLS = ("auto", "reference", "xla", "gpu", "tpu")
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_F32 = jnp.float32
# Full float32 products: on GPU XLA would otherwise use tf32 for float32 operands; bf16 operands are
# unaffected.
_PREC = lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------ validation


def _concrete(v: object) -> np.ndarray | None:
    """The value of v if it is known now (not a tracer under jit), else None."""
    if isinstance(v, jax.core.Tracer):
        return None
    try:
        return np.asarray(v)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def validate_inputs(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    group_sizes: jax.Array,
    scale: jax.Array,
    rank: jax.Array | None = None,
    impl: str = "auto",
    base: jax.Array | None = None,
) -> None:
    """Raise ValueError naming the argument, its value and what is allowed.

    Shapes and dtypes always; the values of group_sizes and rank only when they are concrete
    (under jit they are clipped instead: sizes to [0, T] cumulatively, ranks to [0, R]).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    if x.ndim != 2:
        raise ValueError(f"x.shape={tuple(x.shape)} must be [T, I] (2-D)")
    if a.ndim != 3:
        raise ValueError(f"a.shape={tuple(a.shape)} must be [G, I, R] (3-D)")
    if b.ndim != 3:
        raise ValueError(f"b.shape={tuple(b.shape)} must be [G, R, O] (3-D)")
    T, I = x.shape
    G, Ia, R = a.shape
    if Ia != I:
        raise ValueError(f"a.shape[1]={Ia} must equal x.shape[1]={I} (input features I)")
    if b.shape[0] != G or b.shape[1] != R:
        raise ValueError(f"b.shape={tuple(b.shape)} must be [G={G}, R={R}, O] to match a")
    if G < 1 or R < 1:
        raise ValueError(f"a.shape={tuple(a.shape)}: G (slots) and R (rank) must be >= 1")
    for name, arr in (("x", x), ("a", a), ("b", b)):
        if jnp.dtype(arr.dtype) not in _DTYPES:
            raise ValueError(f"{name}.dtype={arr.dtype} must be one of bfloat16, float16, float32")
    if tuple(group_sizes.shape) != (G,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes (shape {tuple(group_sizes.shape)}, {group_sizes.dtype}) must be "
            f"int32[G={G}]"
        )
    if tuple(jnp.shape(scale)) != (G,) or not jnp.issubdtype(jnp.result_type(scale), jnp.floating):
        raise ValueError(
            f"scale (shape {tuple(jnp.shape(scale))}, {jnp.result_type(scale)}) must be "
            f"float32[G={G}]"
        )
    if rank is not None and (
        tuple(rank.shape) != (G,) or not jnp.issubdtype(rank.dtype, jnp.integer)
    ):
        raise ValueError(
            f"rank (shape {tuple(rank.shape)}, {rank.dtype}) must be None or int32[G={G}]"
        )
    if base is not None and (
        tuple(base.shape) != (T, b.shape[2]) or jnp.dtype(base.dtype) != jnp.dtype(x.dtype)
    ):
        raise ValueError(
            f"base (shape {tuple(base.shape)}, {base.dtype}) must be None or "
            f"{jnp.dtype(x.dtype).name}[T={T}, O={b.shape[2]}] (x's dtype)"
        )
    gs = _concrete(group_sizes)
    if gs is not None:
        if (gs < 0).any():
            raise ValueError(f"group_sizes={gs.tolist()} must all be >= 0")
        if int(gs.sum()) > T:
            raise ValueError(f"sum(group_sizes)={int(gs.sum())} must be <= T={T} (x.shape[0])")
    rk = None if rank is None else _concrete(rank)
    if rk is not None and ((rk < 0).any() or (rk > R).any()):
        raise ValueError(f"rank={rk.tolist()} must lie in [0, R={R}] (R = a.shape[2])")


def _check_slot(slot: jax.Array, T: int, G: int) -> None:
    if tuple(slot.shape) != (T,) or not jnp.issubdtype(slot.dtype, jnp.integer):
        raise ValueError(f"slot (shape {tuple(slot.shape)}, {slot.dtype}) must be int32[T={T}]")
    sv = _concrete(slot)
    if sv is not None and ((sv < -1).any() or (sv >= G).any()):
        bad = sv[(sv < -1) | (sv >= G)][:4].tolist()
        raise ValueError(f"slot values {bad} must lie in [-1, G={G}) (-1 = no adapter)")


# ------------------------------------------------------------------------------ group metadata


class GroupMeta(NamedTuple):
    """Per-row and per-slot facts derived from group_sizes (all on device, no host sync)."""

    starts: jax.Array  # i32[G]: first row of each slot
    ends: jax.Array  # i32[G]: one past the last row of each slot (clipped to T)
    row_slot: jax.Array  # i32[T]: slot of each row, G for rows past the groups
    rank: jax.Array  # i32[G]: clipped to [0, R]
    scale: jax.Array  # f32[G]


def group_meta(
    group_sizes: jax.Array, scale: jax.Array, rank: jax.Array | None, T: int, R: int
) -> GroupMeta:
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)  # i32[G]
    ends = jnp.minimum(jnp.cumsum(sizes), T).astype(jnp.int32)  # i32[G]
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    t = jnp.arange(T, dtype=jnp.int32)
    # A compare-and-count, one fusion: jnp.searchsorted's default is a loop, which on GPU costs
    # a kernel launch (and host round trip) per step, measured at tens of microseconds.
    row_slot = jnp.sum(ends[None, :] <= t[:, None], axis=1, dtype=jnp.int32)  # i32[T]
    G = sizes.shape[0]
    rk = jnp.full((G,), R, jnp.int32) if rank is None else jnp.clip(rank.astype(jnp.int32), 0, R)
    return GroupMeta(starts, ends, row_slot, rk, jnp.asarray(scale, _F32))


# ------------------------------------------------------------------------------------ reference


def ref_lora_delta(
    x: jax.Array,  # [T, I]
    a: jax.Array,  # [G, I, R]
    b: jax.Array,  # [G, R, O]
    group_sizes: jax.Array,  # i32[G]
    scale: jax.Array,  # f32[G]
    *,
    rank: jax.Array | None = None,  # i32[G]
    impl: str = "reference",
    base: jax.Array | None = None,  # [T, O]
) -> jax.Array:  # [T, O] in x.dtype
    """The oracle: for each slot, mask its rows and its rank, multiply in float32, sum.

    Plain jnp with jax's own autodiff (no custom VJP), so jax.grad of it checks the operator's
    backward. O(G·T·I·R): for tests, not for speed.
    """
    validate_inputs(x, a, b, group_sizes, scale, rank, impl, base)
    T = x.shape[0]
    G, _, R = a.shape
    m = group_meta(group_sizes, scale, rank, T, R)
    xf = x.astype(_F32)  # f32[T, I]
    r = jnp.arange(R)
    out = jnp.zeros((T, b.shape[2]), _F32)
    for g in range(G):
        keep = r < m.rank[g]  # bool[R]
        a_g = jnp.where(keep[None, :], a[g].astype(_F32), 0.0)  # f32[I, R]
        b_g = jnp.where(keep[:, None], b[g].astype(_F32), 0.0)  # f32[R, O]
        d = jnp.dot(jnp.dot(xf, a_g, precision=_PREC), b_g, precision=_PREC)
        out = out + jnp.where((m.row_slot == g)[:, None], m.scale[g] * d, 0.0)
    if base is not None:
        out = out + base.astype(_F32)
    return out.astype(x.dtype)


# ------------------------------------------------------------------------------------- backends
#
# A backend is a hashable object with two methods (the custom VJP below holds the rest):
#   fwd(x, a, b, m, base) -> (delta or base + delta [T, O] in x.dtype, s_live f32[T, R])
#       s_live[t] = x[t] @ a[slot(t)], zero where r >= rank or past the groups (unscaled).
#   bwd(x, a, b, m, s_live, dy) -> (dx [T, I] in x.dtype, da [G, I, R] in a.dtype,
#       db [G, R, O] in b.dtype, u_live f32[T, R])
#       u_live[t] = dy[t] @ b[slot(t)]^T masked like s_live; du = scale · u_live;
#       dx = du @ a^T, da_g = sum over the slot's rows of x^T du, db_g = (scale · s_live)^T dy.


def live_mask(m: GroupMeta, R: int) -> jax.Array:
    """bool[T, R]: the row belongs to a slot and r < that slot's rank."""
    G = m.rank.shape[0]
    slot = jnp.minimum(m.row_slot, G - 1)
    return (m.row_slot < G)[:, None] & (jnp.arange(R)[None, :] < m.rank[slot][:, None])


def row_scale(m: GroupMeta) -> jax.Array:
    """f32[T]: the scale of each row's slot, 0 past the groups."""
    G = m.scale.shape[0]
    return jnp.where(m.row_slot < G, m.scale[jnp.minimum(m.row_slot, G - 1)], 0.0)


def _rank_masked(a: jax.Array, b: jax.Array, m: GroupMeta) -> tuple[jax.Array, jax.Array]:
    """a, b with entries past each slot's rank zeroed (they may hold anything)."""
    keep = jnp.arange(a.shape[2])[None, :] < m.rank[:, None]  # bool[G, R]
    return jnp.where(keep[:, None, :], a, 0), jnp.where(keep[:, :, None], b, 0)


def _spread(v: jax.Array, m: GroupMeta, G: int) -> jax.Array:
    """[T, G, C]: row t's values in its slot's place, zeros elsewhere (a select, so non-finite
    values in rows past the groups do not leak)."""
    own = m.row_slot[:, None, None] == jnp.arange(G)[None, :, None]  # bool[T, G, 1]
    return jnp.where(own, v[:, None, :], jnp.zeros((), v.dtype))


def _xla_gmm(lhs: jax.Array, w: jax.Array, m: GroupMeta, trans: bool) -> jax.Array:
    """f32[T, N]: every row times every slot's matrix, keeping its own slot. O(T·K·N·G) flops:
    fine while G times the small side (the rank) stays small."""
    G = w.shape[0]
    K, N = (w.shape[2], w.shape[1]) if trans else (w.shape[1], w.shape[2])
    spec = "GNK" if trans else "GKN"
    if N <= K:  # shrink: all slots' outputs are small ([T, G, N]); select after
        y = jnp.einsum(f"TK,{spec}->TGN", lhs, w, preferred_element_type=_F32, precision=_PREC)
        own = jnp.take_along_axis(y, jnp.minimum(m.row_slot, G - 1)[:, None, None], axis=1)
        return jnp.where((m.row_slot < G)[:, None], own[:, 0], 0.0)
    # expand: spread each row over its slot's K columns, then one product over G·K
    spread = _spread(lhs, m, G)  # [T, G, K]
    return jnp.einsum(f"TGK,{spec}->TN", spread, w, preferred_element_type=_F32, precision=_PREC)


def _xla_tgmm(lhs: jax.Array, rhs: jax.Array, m: GroupMeta, G: int) -> jax.Array:
    """f32[G, K, N]: per slot, the sum over its rows of lhs^T rhs."""
    if lhs.shape[1] <= rhs.shape[1]:
        rhs = jnp.where((m.row_slot < G)[:, None], rhs, jnp.zeros((), rhs.dtype))
        return jnp.einsum("TGK,TN->GKN", _spread(lhs, m, G), rhs, preferred_element_type=_F32,
                          precision=_PREC)  # fmt: skip
    lhs = jnp.where((m.row_slot < G)[:, None], lhs, jnp.zeros((), lhs.dtype))
    return jnp.einsum("TK,TGN->GKN", lhs, _spread(rhs, m, G), preferred_element_type=_F32,
                      precision=_PREC)  # fmt: skip


class XlaBackend(NamedTuple):
    """Masked dense einsums over all slots (CPU path and GPU fallback)."""

    def fwd(self, x, a, b, m, base=None):
        R = a.shape[2]
        a, b = _rank_masked(a, b, m)
        s = jnp.where(live_mask(m, R), _xla_gmm(x, a, m, False), 0.0)  # f32[T, R]
        sp = (s * row_scale(m)[:, None]).astype(b.dtype)
        d = _xla_gmm(sp, b, m, False)  # f32[T, O]
        return (d if base is None else d + base.astype(_F32)).astype(x.dtype), s

    def bwd(self, x, a, b, m, s, dy):
        G, _, R = a.shape
        a, b = _rank_masked(a, b, m)
        rs = row_scale(m)[:, None]  # f32[T, 1]
        u = jnp.where(live_mask(m, R), _xla_gmm(dy, b, m, True), 0.0)  # f32[T, R]
        du = (u * rs).astype(a.dtype)
        dx = _xla_gmm(du, a, m, True).astype(x.dtype)
        da = _xla_tgmm(x, du.astype(x.dtype), m, G).astype(a.dtype)
        db = _xla_tgmm((s * rs).astype(dy.dtype), dy, m, G).astype(b.dtype)
        return dx, da, db, u


def _megablox_tiling(M: int, K: int, N: int) -> tuple[int, int, int] | None:
    """megablox tiles: rows in 128s (T must divide), each other dim whole or in 128s."""
    if M % 128:
        return None
    tk = K if K <= 512 else 512 if K % 512 == 0 else 128 if K % 128 == 0 else None
    tn = N if N <= 512 else 512 if N % 512 == 0 else 128 if N % 128 == 0 else None
    return None if tk is None or tn is None else (128, tk, tn)


def _megablox():
    """jax's megablox kernel module (the package re-exports a function under the same name)."""
    import importlib

    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


class TpuBackend(NamedTuple):
    """jax's megablox gmm/tgmm (Pallas TPU kernels). supports() says which shapes fit."""

    interpret: bool = False

    @staticmethod
    def supports(T: int, I: int, R: int, O: int) -> bool:
        return all(_megablox_tiling(T, k, n) for k, n in ((I, R), (R, O), (O, R), (R, I)))

    def _gmm(self, lhs, w, m, trans, out_dtype):
        gmm = _megablox()

        K, N = (w.shape[2], w.shape[1]) if trans else (w.shape[1], w.shape[2])
        sizes = m.ends - m.starts  # i32[G]
        out = gmm.gmm(lhs, w.astype(lhs.dtype), sizes, out_dtype,
                      _megablox_tiling(lhs.shape[0], K, N), transpose_rhs=trans,
                      interpret=self.interpret)  # fmt: skip
        # Rows past the groups are not written (NaN in TPU interpret mode): zero them.
        return jnp.where((m.row_slot < w.shape[0])[:, None], out, jnp.zeros((), out.dtype))

    def _tgmm(self, lhs, rhs, m, out_dtype):
        gmm = _megablox()

        sizes = m.ends - m.starts
        tiling = _megablox_tiling(lhs.shape[0], lhs.shape[1], rhs.shape[1])
        return gmm.tgmm(lhs.T, rhs, sizes, out_dtype, tiling, interpret=self.interpret)

    def fwd(self, x, a, b, m, base=None):
        R = a.shape[2]
        a, b = _rank_masked(a, b, m)
        s = jnp.where(live_mask(m, R), self._gmm(x, a, m, False, _F32), 0.0)
        sp = (s * row_scale(m)[:, None]).astype(b.dtype)
        d = self._gmm(sp, b, m, False, _F32)
        return (d if base is None else d + base.astype(_F32)).astype(x.dtype), s

    def bwd(self, x, a, b, m, s, dy):
        R = a.shape[2]
        a, b = _rank_masked(a, b, m)
        rs = row_scale(m)[:, None]
        u = jnp.where(live_mask(m, R), self._gmm(dy, b, m, True, _F32), 0.0)
        du = (u * rs).astype(x.dtype)
        dx = self._gmm(du, a, m, True, x.dtype)
        da = self._tgmm(x, du, m, a.dtype)
        db = self._tgmm((s * rs).astype(dy.dtype), dy, m, b.dtype)
        return dx, da, db, u


# ------------------------------------------------------------------------------ custom VJP core


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora(backend, x, a, b, group_sizes, scale, rank, base):
    return _lora_fwd(backend, x, a, b, group_sizes, scale, rank, base)[0]


def _lora_fwd(backend, x, a, b, group_sizes, scale, rank, base):
    m = group_meta(group_sizes, scale, rank, x.shape[0], a.shape[2])
    out, s = backend.fwd(x, a, b, m, base)
    return out, (x, a, b, group_sizes, scale, rank, s, base is not None)


def _lora_bwd(backend, res, dy):
    x, a, b, group_sizes, scale, rank, s, has_base = res
    G = a.shape[0]
    m = group_meta(group_sizes, scale, rank, x.shape[0], a.shape[2])
    dx, da, db, u = backend.bwd(x, a, b, m, s, dy)
    # d scale_g = sum over the slot's rows and live ranks of s · u (both already masked).
    dscale = jax.ops.segment_sum(jnp.sum(s * u, axis=1), m.row_slot, num_segments=G + 1)[:G]
    float0 = lambda v: None if v is None else np.zeros(v.shape, jax.dtypes.float0)
    dbase = dy if has_base else None
    return dx, da, db, float0(group_sizes), dscale.astype(scale.dtype), float0(rank), dbase


_lora.defvjp(_lora_fwd, _lora_bwd)


def lora_delta_with(
    backend: object,
    x: jax.Array,  # [T, I]
    a: jax.Array,  # [G, I, R]
    b: jax.Array,  # [G, R, O]
    group_sizes: jax.Array,  # i32[G]
    scale: jax.Array,  # f32[G]
    *,
    rank: jax.Array | None = None,  # i32[G]
    base: jax.Array | None = None,  # [T, O] in x.dtype
) -> jax.Array:  # [T, O] in x.dtype
    """The operator through an explicit backend (see above); inputs already validated."""
    scale = jnp.asarray(scale)
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        scale = scale.astype(_F32)
    rank = None if rank is None else rank.astype(jnp.int32)
    return _lora(backend, x, a, b, group_sizes.astype(jnp.int32), scale, rank, base)


# ---------------------------------------------------------------------------------- public API


def resolve_impl(impl: str, x: jax.Array, a: jax.Array, b: jax.Array) -> str:
    """The concrete path for `impl` on this backend ("auto" falls back to "xla" for shapes the
    accelerator kernels do not cover)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    if platform in ("gpu", "cuda"):
        from rtpjax.kernels import lora_gpu

        return "gpu" if lora_gpu.supports(a.shape[2], x.dtype) else "xla"
    if platform == "tpu":
        T, I = x.shape
        return "tpu" if TpuBackend.supports(T, I, a.shape[2], b.shape[2]) else "xla"
    return "xla"


def _backend(path: str) -> object:
    if path == "xla":
        return XlaBackend()
    if path == "gpu":
        from rtpjax.kernels import lora_gpu

        # Off a GPU the kernels run in Pallas interpret mode (slow; for tests).
        return lora_gpu.GpuBackend(interpret=jax.default_backend() not in ("gpu", "cuda"))
    return TpuBackend(interpret=jax.default_backend() != "tpu")


def lora_delta(
    x: jax.Array,  # [T, I]
    a: jax.Array,  # [G, I, R]
    b: jax.Array,  # [G, R, O]
    group_sizes: jax.Array,  # i32[G]
    scale: jax.Array,  # f32[G]
    *,
    rank: jax.Array | None = None,  # i32[G]
    impl: Impl = "auto",
    base: jax.Array | None = None,  # [T, O] in x.dtype
) -> jax.Array:  # [T, O] in x.dtype
    """delta[t] = scale[g] · (x[t] @ a[g][:, :rank[g]]) @ b[g][:rank[g]] for rows sorted by slot.

    Rows offsets[g] .. offsets[g]+group_sizes[g]-1 use slot g; rows past sum(group_sizes) get 0.
    Differentiable in x, a, b, scale and base (custom VJP).

    base: optional [T, O] (the base projection x @ W); returns base + delta. On GPU the kernel
    adds in place (base's buffer is reused when XLA can donate it), which saves the separate
    add pass `x @ W + delta` costs there (XLA does not fold the delta into the GEMM).
    """
    validate_inputs(x, a, b, group_sizes, scale, rank, impl, base)
    path = resolve_impl(impl, x, a, b)
    if path == "reference":
        return ref_lora_delta(x, a, b, group_sizes, scale, rank=rank, base=base)
    return lora_delta_with(_backend(path), x, a, b, group_sizes, scale, rank=rank, base=base)


def lora_delta_by_slot(
    x: jax.Array,  # [T, I]
    a: jax.Array,  # [G, I, R]
    b: jax.Array,  # [G, R, O]
    slot: jax.Array,  # i32[T]: -1 = no adapter
    scale: jax.Array,  # f32[G]
    *,
    rank: jax.Array | None = None,  # i32[G]
    impl: Impl = "auto",
) -> jax.Array:  # [T, O] in x.dtype
    """lora_delta for rows in any order: row t uses slot[t] (-1: none, delta 0).

    Sorts rows by slot (stable), calls lora_delta, and puts the rows back.
    """
    T = x.shape[0]
    G = a.shape[0]
    _check_slot(slot, T, G)
    slot = slot.astype(jnp.int32)
    key = jnp.where((slot < 0) | (slot >= G), G, slot)  # i32[T]: no adapter sorts last
    order = jnp.argsort(key, stable=True)  # i32[T]
    group_sizes = jnp.bincount(key, length=G + 1)[:G].astype(jnp.int32)  # i32[G]
    d_sorted = lora_delta(x[order], a, b, group_sizes, scale, rank=rank, impl=impl)
    inverse = jnp.zeros((T,), jnp.int32).at[order].set(jnp.arange(T, dtype=jnp.int32))
    return d_sorted[inverse]
