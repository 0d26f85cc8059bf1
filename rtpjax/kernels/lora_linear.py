"""A linear layer with batched multi-LoRA: y = x @ W + lora_delta(x, a, b, ...), W frozen.

`lora_linear` is what a LoRA-wrapped projection computes. Where it can, it runs the base GEMM
and the LoRA expand as one kernel (`lora_matmul_mgpu.matmul_expand`, Hopper): the forward is
the shrink s = x @ A_g (lora_gpu's kernel, a pass over x) and then one GEMM whose epilogue adds
scale·s @ B_g; the backward's dx = dy @ W^T + du @ A_g^T is the same fused GEMM with W
transposed, and u = dy @ B_g^T, dA, dB come from lora_gpu's grouped kernels (u and dB from one
pass over dy). When every 64-row piece of the grouping holds one slot's rows (LoraPlan.one_slot),
the shrink and the backward's u run inside the GEMM's own launch instead
(lora_matmul_shrink_mgpu, `small_ops="in_gemm"`). Everywhere else it is
`lora_delta(x, a, b, ..., base=x @ W)`: the same values through the unfused operator.

Rows are sorted by adapter slot as in lora_delta (group_sizes; rows past the groups get only
x @ W).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.kernels import lora
from rtpjax.kernels import lora_gpu as lg
from rtpjax.kernels import lora_gpu_udb as udb
from rtpjax.kernels import lora_matmul_mgpu as mm
from rtpjax.kernels import lora_matmul_shrink_mgpu as ms

Impl = Literal["auto", "fused", "unfused"]
IMPLS = ("auto", "fused", "unfused")
SMALL_OPS = ("auto", "in_gemm", "kernel", "xla")


def visits(m: lora.GroupMeta, T: int, tile_m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The (row tile, slot) pairs the fused GEMM's epilogue walks (see Visits); all on device.

    Rows are sorted by slot, so a tile holds the slots row_slot[first row] .. row_slot[last row].
    Empty slots in between get a visit of zeros (harmless); the tail (slot G) gets none.
    """
    G = m.starts.shape[0]
    n_t = T // tile_m
    first_row = jnp.arange(n_t, dtype=jnp.int32) * tile_m
    first = m.row_slot[first_row]  # i32[n_t], G for a tile that starts in the tail
    last = jnp.minimum(m.row_slot[first_row + tile_m - 1], G - 1)
    count = jnp.where(first < G, last - first + 1, 0)  # i32[n_t]
    start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(count, dtype=jnp.int32)])
    V = mm.num_visits(T, G, tile_m)
    v = jnp.arange(V, dtype=jnp.int32)
    tile = jnp.minimum(jnp.sum(start[1:][None, :] <= v[:, None], axis=1, dtype=jnp.int32), n_t - 1)
    slot = jnp.clip(first[tile] + v - start[tile], 0, G - 1)
    return start, slot.astype(jnp.int32), tile


def visit_rows(h: jax.Array, m: lora.GroupMeta, vis, tile_m: int) -> jax.Array:
    """[V, tile_m, R]: for each visit, its tile's rows of h where the row is in the visit's slot,
    zeros elsewhere (one gather + select, ~(T/tile_m + G)·tile_m·R elements)."""
    _, slot, tile = vis
    rows = tile[:, None] * tile_m + jnp.arange(tile_m, dtype=jnp.int32)[None, :]  # i32[V, tm]
    own = m.row_slot[rows] == slot[:, None]  # bool[V, tm]
    return jnp.where(own[..., None], h[rows], jnp.zeros((), h.dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraPlan:
    """The integer bookkeeping of one row grouping: which rows belong to which slot, and the
    (row tile, slot) visits the kernels walk. It depends only on the group sizes and ranks, so a
    training step builds it once (`lora_plan`) and every LoRA projection of every layer uses it;
    built inside each call instead, it costs a dozen small kernels per projection."""

    starts: jax.Array  # i32[G]
    ends: jax.Array  # i32[G]
    row_slot: jax.Array  # i32[T], G past the groups
    rank: jax.Array  # i32[G]
    vis_start: jax.Array  # i32[T / tile_m + 1]: the fused GEMM's visits (see visits())
    vis_slot: jax.Array  # i32[T / tile_m + G]
    vis_tile: jax.Array  # i32[T / tile_m + G]
    vm: tuple  # lora_gpu.visit_map for the grouped kernels' row tiles
    sub_slot: jax.Array  # i32[T / 64]: each 64-row piece's slot (the in-GEMM shrink's map)
    ranked: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # Every 64-row piece has its live rows in one slot: the shrink can run inside the GEMM's
    # launch (lora_matmul_shrink_mgpu). Known only from concrete group sizes.
    one_slot: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def meta(self, scale: jax.Array) -> lora.GroupMeta:
        return lora.GroupMeta(self.starts, self.ends, self.row_slot, self.rank,
                              jnp.asarray(scale, jnp.float32))  # fmt: skip


def lora_plan(
    group_sizes: jax.Array,  # i32[G]
    T: int,
    R: int,
    *,
    rank: jax.Array | None = None,  # i32[G]
    gemm_config: mm.GemmConfig | None = None,
    lora_config: lg.LoraGpuConfig | None = None,
    one_slot: bool | None = None,
) -> LoraPlan:
    """lora_linear's bookkeeping for rows sorted by slot (group_sizes), T rows, rank R; pass it
    as lora_linear(..., plan=) to every projection that shares the grouping.

    one_slot: whether every 64-row piece's rows belong to one slot (true when every group is a
    multiple of 64 rows), which lets the fused path run the shrink inside the GEMM's launch.
    None: worked out from group_sizes when they are concrete (not under jit), else False. A
    caller that pads each adapter's rows to 64 can pass True under jit."""
    gcfg = gemm_config or mm.DEFAULT_CONFIG
    lcfg = lora_config or lg.DEFAULT_CONFIG
    G = group_sizes.shape[0]
    m = lora.group_meta(group_sizes, jnp.ones((G,), jnp.float32), rank, T, R)
    start, slot, tile = visits(m, T, gcfg.tile_m)
    vm = lg.visit_map(m, T, lcfg.fwd.block_t)
    if one_slot is None:
        try:
            one_slot = T % ms.SUB == 0 and ms.one_slot_pieces(np.asarray(group_sizes), T)
        except jax.errors.TracerArrayConversionError:
            one_slot = False
    sub = ms.sub_slots(m.row_slot, G) if T % ms.SUB == 0 else jnp.zeros((0,), jnp.int32)
    return LoraPlan(m.starts, m.ends, m.row_slot, m.rank, start, slot, tile, vm, sub,
                    rank is not None, bool(one_slot))  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _fused(x, w, a, b, scale, plan, gcfg, lcfg, small, interpret):
    return _fused_fwd(x, w, a, b, scale, plan, gcfg, lcfg, small, interpret)[0]


def _shrink(lhs, w, m, trans, small, cfg, interpret, vm=None):
    """f32[T, R]: each row times its slot's matrix (w [G, K, R]), or its transpose (w [G, R, K]);
    zero past the slot's rank and past the groups. "xla": one dense product over all G·R
    columns, then each row keeps its own slot's; "kernel": lora_gpu's grouped kernel. Columns
    past a rank may come out non-finite (w may hold anything there): the select drops them."""
    if small == "xla":
        G = w.shape[0]
        spec = "TK,GRK->TGR" if trans else "TK,GKR->TGR"
        s = jnp.einsum(spec, lhs, w, preferred_element_type=jnp.float32)  # f32[T, G, R]
        s = jnp.take_along_axis(s, jnp.minimum(m.row_slot, G - 1)[:, None, None], axis=1)[:, 0]
    else:
        s = lg.gmm(lhs, w, m, trans, jnp.float32, cfg=cfg, vm=vm, interpret=interpret)
    return jnp.where(lora.live_mask(m, w.shape[1 if trans else 2]), s, 0.0)


def _per_slot(big, small_side, m, G, dtype, small, cfg, interpret, bounds=None):
    """[G, K, R]: per slot, the sum over its rows of big^T small_side (big [T, K], small_side
    [T, R] zero outside live ranks): the grads of A (x, du) and of B^T (dy, scale·s).
    "xla": small_side spread over its slot's R columns of G·R, then one dense product; rows
    past the groups are zero there, so big's rows past the groups must be finite."""
    if small == "xla":
        own = m.row_slot[:, None, None] == jnp.arange(G)[None, :, None]  # bool[T, G, 1]
        spread = jnp.where(own, small_side[:, None, :], jnp.zeros((), small_side.dtype))
        out = jnp.einsum("TK,TGR->GKR", big, spread, preferred_element_type=jnp.float32)
        return out.astype(dtype)
    return lg.tgmm(big, small_side, m, G, dtype, cfg=cfg, interpret=interpret, bounds=bounds)


def _rank_zeroed(v, plan, axis):
    """v [G, ., .] with entries past each slot's rank along `axis` zeroed: they may hold
    anything, and the fused GEMM multiplies them by zeros (0·NaN = NaN). A copy, so only when
    per-slot ranks are given."""
    if not plan.ranked:
        return v
    keep = jnp.arange(v.shape[axis])[None, :] < plan.rank[:, None]  # bool[G, R]
    keep = keep[:, :, None] if axis == 1 else keep[:, None, :]
    return jnp.where(keep, v, jnp.zeros((), v.dtype))


def _vm_for(plan, cfg, lcfg):
    return plan.vm if cfg.block_t == lcfg.fwd.block_t else None


def _shrink_cfg(gcfg: mm.GemmConfig, R: int, dtype) -> mm.GemmConfig:
    """The in-GEMM shrink kernel's tiles: for the default GEMM, the default tiles with as many
    stages as fit beside rank R's buffers (ms.config_for), else the given ones."""
    return ms.config_for(R, jnp.dtype(dtype).itemsize) if gcfg == mm.DEFAULT_CONFIG else gcfg


def _in_gemm_supported(x, w, a, plan, gcfg) -> bool:
    T, I = x.shape
    O, R = w.shape[1], a.shape[2]
    scfg = _shrink_cfg(gcfg, R, x.dtype)
    return (plan.one_slot and ms.supports(T, O, I, R, x.dtype, scfg)
            and ms.supports(T, I, O, R, x.dtype, scfg))  # fmt: skip


def _fused_fwd(x, w, a, b, scale, plan, gcfg, lcfg, small, interpret):
    m = plan.meta(scale)
    if small == "in_gemm":  # shrink, GEMM and expand in one launch; s comes back in x.dtype
        # A goes in as stored ([G, I, R]; the kernel's shrink takes x from registers): no
        # transposed copy (6.8 µs at G = 64 on the H100).
        a_z = _rank_zeroed(a, plan, 2).astype(x.dtype)
        b_z = _rank_zeroed(b, plan, 1).astype(x.dtype)
        scfg = _shrink_cfg(gcfg, a.shape[2], x.dtype)
        y, s = ms.matmul_lora(x, w, a_z, b_z, plan.sub_slot, plan.ends, m.scale, transpose_a=True,
                              cfg=scfg, interpret=interpret)  # fmt: skip
        return y, (x, w, a, b, scale, plan, s)
    vm = _vm_for(plan, lcfg.fwd, lcfg)
    s = _shrink(x, a, m, False, small, lcfg.fwd, interpret, vm)  # f32[T, R], unscaled
    h = (s * lora.row_scale(m)[:, None]).astype(x.dtype)
    vis = (plan.vis_start, plan.vis_slot, plan.vis_tile)
    y = mm.matmul_expand(
        x, w, visit_rows(h, m, vis, gcfg.tile_m), _rank_zeroed(b, plan, 1).astype(x.dtype),
        plan.vis_start, plan.vis_slot, cfg=gcfg, interpret=interpret,
    )  # fmt: skip
    return y, (x, w, a, b, scale, plan, s)


def _fused_bwd(gcfg, lcfg, small, interpret, res, dy):
    x, w, a, b, scale, plan, s = res
    m = plan.meta(scale)
    G = a.shape[0]
    rs = lora.row_scale(m)[:, None]
    bounds = plan.vm[2].reshape(-1)  # the grouped kernels' row ranges, built once per plan
    a_z = _rank_zeroed(a, plan, 2).astype(x.dtype)
    in_gemm = small == "in_gemm"
    if in_gemm:  # dx = dy @ W^T + du @ A^T, with u = dy @ B^T computed in the same launch
        dx, u = ms.matmul_lora(
            dy.astype(x.dtype), w, _rank_zeroed(b, plan, 1).astype(x.dtype), a_z, plan.sub_slot,
            plan.ends, m.scale, transpose_w=True, transpose_e=True,
            cfg=_shrink_cfg(gcfg, a.shape[2], x.dtype),
            interpret=interpret,
        )  # fmt: skip
        s, u = s.astype(jnp.float32), u.astype(jnp.float32)
    # The scale and cast of s stay in XLA: done inside gmm_tgmm (loading s as float32) that
    # kernel measured 2 µs slower at G = 1 and 8 and 10 µs at G = 64 (seventh session).
    sp = (s * rs).astype(dy.dtype)
    one_pass = small == "kernel" and lcfg.fused_udb
    if one_pass:  # u and dB both read dy: one kernel, one pass
        u, db = udb.gmm_tgmm(dy, b, sp, m, b.dtype, cfg=lcfg.udb, interpret=interpret,
                            bounds=bounds)  # fmt: skip
    elif not in_gemm:
        vm = _vm_for(plan, lcfg.shrink_t, lcfg)
        u = _shrink(dy, b, m, True, small, lcfg.shrink_t, interpret, vm)
    du = (u * rs).astype(x.dtype)
    if not in_gemm:
        vis = (plan.vis_start, plan.vis_slot, plan.vis_tile)
        dx = mm.matmul_expand(
            dy.astype(x.dtype), w, visit_rows(du, m, vis, gcfg.tile_m), a_z, plan.vis_start,
            plan.vis_slot, transpose_w=True, transpose_e=True, cfg=gcfg, interpret=interpret,
        )  # fmt: skip
    da = _per_slot(x, du, m, G, a.dtype, small, lcfg.tgmm, interpret, bounds)
    if small == "xla":  # the dense product gives dB^T [G, O, R]
        db = jnp.swapaxes(_per_slot(dy, sp, m, G, b.dtype, small, None, interpret), 1, 2)
    elif not one_pass:
        db = lg.tgmm(sp, dy, m, G, b.dtype, cfg=lcfg.tgmm, interpret=interpret, bounds=bounds)
    # W is frozen in LoRA training; its gradient is here for completeness, and XLA drops it
    # when nobody asks for it.
    dw = jnp.einsum("TI,TO->IO", x, dy, preferred_element_type=jnp.float32).astype(w.dtype)
    dscale = jax.ops.segment_sum(jnp.sum(s * u, axis=1), m.row_slot, num_segments=G + 1)[:G]
    dplan = jax.tree.map(lambda v: np.zeros(v.shape, jax.dtypes.float0), plan)
    return dx, dw, da, db, dscale.astype(scale.dtype), dplan


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_supported(x: jax.Array, w: jax.Array, a: jax.Array, cfg: mm.GemmConfig) -> bool:
    T, I = x.shape
    O = w.shape[1]
    return (
        x.dtype == w.dtype
        and mm.supports(T, O, I, a.shape[2], x.dtype, cfg)
        and mm.supports(T, I, O, a.shape[2], x.dtype, cfg)  # the backward's dx = dy @ W^T
    )


def resolve_impl(impl: str, x, w, a, cfg: mm.GemmConfig) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    if impl != "auto":
        return impl
    on_hopper = jax.default_backend() in ("gpu", "cuda") and _is_hopper()
    return "fused" if on_hopper and fused_supported(x, w, a, cfg) else "unfused"


@functools.cache
def _is_hopper() -> bool:
    cc = getattr(jax.devices()[0], "compute_capability", "")
    return str(cc).startswith("9")


def lora_linear(
    x: jax.Array,  # [T, I]
    w: jax.Array,  # [I, O], frozen
    a: jax.Array,  # [G, I, R]
    b: jax.Array,  # [G, R, O]
    group_sizes: jax.Array,  # i32[G]
    scale: jax.Array,  # f32[G]
    *,
    rank: jax.Array | None = None,  # i32[G]
    impl: Impl = "auto",
    gemm_config: mm.GemmConfig | None = None,
    lora_config: lg.LoraGpuConfig | None = None,
    small_ops: str = "auto",
    plan: LoraPlan | None = None,
    interpret: bool | None = None,
) -> jax.Array:  # [T, O] in x.dtype
    """x @ w + lora_delta(x, a, b, group_sizes, scale, rank=rank) (rows sorted by slot).

    plan: lora_plan(group_sizes, T, R, rank=rank, ...) built once and shared by every call
    with the same grouping (then group_sizes and rank may be None); built here when absent.

    impl: "fused" runs the base GEMM and the LoRA expand as one Hopper kernel (forward and the
    backward's dx); "unfused" is lora_delta(..., base=x @ w); "auto" picks "fused" on a Hopper
    GPU for shapes it tiles (default tiles: T a multiple of 256, I and O of 128, rank a multiple
    of 16 up to 128, bf16/f16), else "unfused". Differentiable in x, w, a, b and scale.
    interpret (default: off a GPU) runs the fused kernels in Pallas interpret mode.

    small_ops (fused path): how the rank-sized products are done (the shrink s = x·A_g, the
    backward's u = dy·B_g^T, and the grads of A and B): "kernel" = lora_gpu's grouped kernels,
    "xla" = one dense XLA product over all slots (G·R columns, then each row keeps its own);
    "in_gemm" = the shrink (and the backward's u) inside the GEMM's launch
    (lora_matmul_shrink_mgpu: x and dy read once by the GEMM, once by the shrink, no launch of
    its own; needs plan.one_slot, see lora_plan), the grads of A and B from the grouped kernels;
    "auto" = "in_gemm" where the plan allows it, else "kernel" (the faster of the other two at
    G = 1, 8 and 64 on the H100, see docs/kernels/lora.md). With "kernel",
    lora_config.fused_udb (default) takes u and dB from one kernel reading dy once
    (lora_gpu_udb.gmm_tgmm); False keeps the two kernels.
    """
    if x.ndim != 2 or w.ndim != 2 or w.shape[0] != x.shape[1]:
        raise ValueError(
            f"lora_linear: x.shape={x.shape} and w.shape={w.shape} must be [T, I] and [I, O]"
        )
    if plan is not None:
        if plan.row_slot.shape != (x.shape[0],) or plan.starts.shape != (a.shape[0],):
            raise ValueError(
                f"lora_linear: plan for {plan.row_slot.shape[0]} rows and "
                f"{plan.starts.shape[0]} slots does not fit x {x.shape} and a {a.shape}"
            )
        group_sizes = plan.ends - plan.starts
        rank = plan.rank if plan.ranked else None
    lora.validate_inputs(x, a, b, group_sizes, scale, rank, "auto", None)
    if b.shape[2] != w.shape[1]:
        raise ValueError(f"lora_linear: b.shape={b.shape} must end in O={w.shape[1]} (w's columns)")
    gcfg = gemm_config or mm.DEFAULT_CONFIG
    path = resolve_impl(impl, x, w, a, gcfg)
    if path == "unfused":
        return lora.lora_delta(x, a, b, group_sizes, scale, rank=rank, base=x @ w)
    if not fused_supported(x, w, a, gcfg):
        raise ValueError(
            f"lora_linear(impl='fused'): x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, rank "
            f"{a.shape[2]} not tiled by {gcfg} (T % {gcfg.cta_m}, I and O % {gcfg.cta_n}, "
            "rank % 16, bf16/f16)"
        )
    if small_ops not in SMALL_OPS:
        raise ValueError(f"small_ops={small_ops!r} must be one of {SMALL_OPS}")
    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "cuda")
    scale = jnp.asarray(scale)
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        scale = scale.astype(jnp.float32)
    lcfg = lora_config or lg.DEFAULT_CONFIG
    if plan is None:
        plan = lora_plan(group_sizes, x.shape[0], a.shape[2], rank=rank, gemm_config=gcfg,
                         lora_config=lcfg)  # fmt: skip
    in_gemm = _in_gemm_supported(x, w, a, plan, gcfg)
    if small_ops == "auto":
        small_ops = "in_gemm" if in_gemm else "kernel"
    if small_ops == "in_gemm" and not in_gemm:
        raise ValueError(
            "lora_linear(small_ops='in_gemm') needs a plan whose 64-row pieces each hold one "
            f"slot (plan.one_slot={plan.one_slot}) and shapes lora_matmul_shrink_mgpu tiles "
            f"(x {x.shape}, w {w.shape}, rank {a.shape[2]} up to 64)"
        )
    return _fused(x, w, a, b, scale, plan, gcfg, lcfg, small_ops, bool(interpret))
