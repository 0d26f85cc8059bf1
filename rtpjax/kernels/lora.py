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
returned in x.dtype. The caller adds it to the base projection (`x @ W + delta`): on GPU, XLA folds
that add into the base GEMM's epilogue (beta = 1), so the delta's only extra traffic is its own
write and the read of x.

Gradients (custom VJP) flow to x, a, b and scale; grads of a and b are exactly zero beyond each
slot's rank, and zero for empty slots. Nothing flows to group_sizes, rank or slot.

Paths (`impl`): "reference" (ref_lora_delta: a loop over slots in plain jnp; the test oracle),
"xla" (two masked dense einsums over all slots: cost grows with G·R, the CPU path and GPU fallback),
"gpu" (Pallas kernels, Triton lowering, lora_gpu.py; on a backend without a GPU it runs in Pallas
interpret mode, which the tests use), "tpu" (jax's megablox gmm/tgmm) and "auto" (by
jax.default_backend(): gpu → "gpu", tpu → "tpu", else "xla"). docs/kernels/lora.md has the
measurements behind the choices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "IMPLS",
    "GroupMeta",
    "group_meta",
    "lora_delta",
    "lora_delta_by_slot",
    "ref_lora_delta",
    "resolve_impl",
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
    row_slot = jnp.searchsorted(ends, t, side="right").astype(jnp.int32)  # i32[T]
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
) -> jax.Array:  # [T, O] in x.dtype
    """The oracle: for each slot, mask its rows and its rank, multiply in float32, sum.

    Plain jnp with jax's own autodiff (no custom VJP), so jax.grad of it checks the operator's
    backward. O(G·T·I·R): for tests, not for speed.
    """
    validate_inputs(x, a, b, group_sizes, scale, rank, impl)
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
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------- xla backend
#
# Every path computes the operator from two grouped products (see _lora_fwd/_lora_bwd):
#   gmm(lhs[T, K], w[G, K, N] (or [G, N, K] with trans), meta) -> f32[T, N]: row t times the matrix
#       of its slot; rows past the groups give 0.
#   tgmm(lhs[T, K], rhs[T, N], meta) -> f32[G, K, N]: per slot, the sum over its rows of
#       lhs[t]^T rhs[t].


def _xla_gmm(lhs: jax.Array, w: jax.Array, m: GroupMeta, trans: bool) -> jax.Array:
    """Every row times every slot's matrix, then keep its own slot: O(T·K·G·N) flops, fine while
    G·min(K, N) is small (LoRA: the small side is R)."""
    G = w.shape[0]
    onehot = (m.row_slot[:, None] == jnp.arange(G)[None, :]).astype(_F32)  # f32[T, G]
    prec = _PREC
    K, N = (w.shape[2], w.shape[1]) if trans else (w.shape[1], w.shape[2])
    spec = "GNK" if trans else "GKN"
    if N <= K:  # shrink: all slots' outputs are small ([T, G, N]); select after
        y = jnp.einsum(f"TK,{spec}->TGN", lhs, w, preferred_element_type=_F32, precision=prec)
        return jnp.einsum("TGN,TG->TN", y, onehot, precision=prec)
    # expand: spread each row over its slot's K columns first, then one product over G·K
    spread = (lhs.astype(_F32)[:, None, :] * onehot[:, :, None]).astype(lhs.dtype)  # [T, G, K]
    return jnp.einsum(f"TGK,{spec}->TN", spread, w, preferred_element_type=_F32, precision=prec)


def _xla_tgmm(lhs: jax.Array, rhs: jax.Array, m: GroupMeta, G: int) -> jax.Array:
    onehot = (m.row_slot[:, None] == jnp.arange(G)[None, :]).astype(lhs.dtype)  # [T, G]
    prec = _PREC
    if lhs.shape[1] <= rhs.shape[1]:
        spread = lhs[:, None, :] * onehot[:, :, None]  # [T, G, K]
        return jnp.einsum("TGK,TN->GKN", spread, rhs, preferred_element_type=_F32, precision=prec)
    spread = rhs[:, None, :] * onehot.astype(rhs.dtype)[:, :, None]  # [T, G, N]
    return jnp.einsum("TK,TGN->GKN", lhs, spread, preferred_element_type=_F32, precision=prec)


class _Ops(NamedTuple):
    gmm: Callable[..., jax.Array]  # (lhs, w, meta, trans) -> f32[T, N]
    tgmm: Callable[..., jax.Array]  # (lhs, rhs, meta, G) -> f32[G, K, N]


def _ops(path: str) -> _Ops:
    if path == "xla":
        return _Ops(_xla_gmm, _xla_tgmm)
    if path == "gpu":
        from rtpjax.kernels import lora_gpu

        interpret = jax.default_backend() not in ("gpu", "cuda", "rocm")
        return _Ops(
            functools.partial(lora_gpu.gmm, interpret=interpret),
            functools.partial(lora_gpu.tgmm, interpret=interpret),
        )
    if path == "tpu":
        from rtpjax.kernels import lora_gpu

        return _Ops(lora_gpu.tpu_gmm, lora_gpu.tpu_tgmm)
    raise ValueError(f"impl={path!r} has no grouped-product backend")


# ------------------------------------------------------------------------------ custom VJP core


def _live(m: GroupMeta, R: int) -> jax.Array:
    """bool[T, R]: the row belongs to a slot and r < that slot's rank."""
    G = m.rank.shape[0]
    slot = jnp.minimum(m.row_slot, G - 1)
    return (m.row_slot < G)[:, None] & (jnp.arange(R)[None, :] < m.rank[slot][:, None])


def _row_coef(m: GroupMeta, R: int) -> jax.Array:
    """f32[T, R]: the scale of the row's slot where _live, else 0."""
    slot = jnp.minimum(m.row_slot, m.rank.shape[0] - 1)
    return jnp.where(_live(m, R), m.scale[slot][:, None], 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _lora(x, a, b, group_sizes, scale, rank, path):
    return _lora_fwd(x, a, b, group_sizes, scale, rank, path)[0]


def _lora_fwd(x, a, b, group_sizes, scale, rank, path):
    ops = _ops(path)
    T, R = x.shape[0], a.shape[2]
    m = group_meta(group_sizes, scale, rank, T, R)
    s = ops.gmm(x, a, m, False)  # f32[T, R]
    coef = _row_coef(m, R)  # f32[T, R]
    delta = ops.gmm((s * coef).astype(b.dtype), b, m, False)  # f32[T, O]
    return delta.astype(x.dtype), (x, a, b, group_sizes, scale, rank, s)


def _lora_bwd(path, res, dy):
    x, a, b, group_sizes, scale, rank, s = res
    ops = _ops(path)
    T, (G, _, R) = x.shape[0], a.shape
    m = group_meta(group_sizes, scale, rank, T, R)
    coef = _row_coef(m, R)  # f32[T, R]
    u = ops.gmm(dy, b, m, True)  # f32[T, R]: dy · B_g^T
    du = u * coef
    dx = ops.gmm(du.astype(a.dtype), a, m, True)  # f32[T, I]
    da = ops.tgmm(x, du.astype(x.dtype), m, G)  # f32[G, I, R]
    db = ops.tgmm((s * coef).astype(dy.dtype), dy, m, G)  # f32[G, R, O]
    # d scale_g = sum over the slot's rows and live ranks of s · u.
    per_row = jnp.sum(jnp.where(_live(m, R), s * u, 0.0), axis=1)  # f32[T]
    dscale = jax.ops.segment_sum(per_row, m.row_slot, num_segments=G + 1)[:G]
    zero_int = lambda v: None if v is None else np.zeros(v.shape, jax.dtypes.float0)
    return (
        dx.astype(x.dtype),
        da.astype(a.dtype),
        db.astype(b.dtype),
        zero_int(group_sizes),
        dscale.astype(jnp.result_type(scale)),
        zero_int(rank),
    )


_lora.defvjp(_lora_fwd, _lora_bwd)


# ---------------------------------------------------------------------------------- public API


def resolve_impl(impl: str, x: jax.Array | None = None, a: jax.Array | None = None) -> str:
    """The concrete path for `impl` on this backend."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend in ("gpu", "cuda"):
        return "gpu"
    if backend == "tpu":
        return "tpu"
    return "xla"


def lora_delta(
    x: jax.Array,  # [T, I]
    a: jax.Array,  # [G, I, R]
    b: jax.Array,  # [G, R, O]
    group_sizes: jax.Array,  # i32[G]
    scale: jax.Array,  # f32[G]
    *,
    rank: jax.Array | None = None,  # i32[G]
    impl: Impl = "auto",
) -> jax.Array:  # [T, O] in x.dtype
    """delta[t] = scale[g] · (x[t] @ a[g][:, :rank[g]]) @ b[g][:rank[g]] for rows sorted by slot.

    Rows offsets[g] .. offsets[g]+group_sizes[g]-1 use slot g; rows past sum(group_sizes) get 0.
    Differentiable in x, a, b and scale (custom VJP).
    """
    validate_inputs(x, a, b, group_sizes, scale, rank, impl)
    path = resolve_impl(impl, x, a)
    if path == "reference":
        return ref_lora_delta(x, a, b, group_sizes, scale, rank=rank)
    scale = jnp.asarray(scale)
    return _lora(x, a, b, group_sizes.astype(jnp.int32), scale, rank, path)


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
