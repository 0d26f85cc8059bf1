"""The base GEMM with the whole LoRA inside one kernel, for Hopper GPUs (Pallas, Mosaic GPU).

    s[p] = x[p] @ A_g^T                  (g = the slot of 64-row piece p; zero past the slot's rows)
    y[p] = x[p] @ W  +  scale[g] · s[p] @ E_g

A piece is the 64 rows one wgmma instruction covers. Its live rows belong to one adapter slot
(`sub_slot[p]`; rows from `slot_end[g]` on belong to none and get only x @ W): lora_linear takes
this path when every piece of the grouping is like that (every group a multiple of 64 rows, say)
and the visit kernel (lora_matmul_mgpu.matmul_expand) otherwise.

Why: the shrink s = x · A_g is a memory-bound pass over x (~12 µs at 4096 x 4096 bf16, 7% of the
170 µs GEMM by itself). As its own kernel it runs before the GEMM and adds its whole time. Here
it runs inside the GEMM's launch, on the CTAs that have a spare tile slot: 512 output tiles on
132 SMs give 116 CTAs four tiles and 16 CTAs three, and those 16 compute the shrink of the row
bands (one band of cta_m rows each) before their three tiles. A tile needs its band's s only in
its epilogue; each band's producer signals a global semaphore when its s and h = scale · s are
in memory, and a tile waits on it before loading h (its CTA's first tile after its K loop, later
tiles before it: by then the shrink is long done). Computing the shrink inside every tile's K
loop instead (x is in shared memory there anyway) measured 40–60 µs slower: a wgmma with N = 16
costs far more than 16/128 of one with N = 128, and every CTA would pay it at least once.

Operands: the shrink's matrices as stored, [G, K, R] (`transpose_a`: the forward's A), or
transposed, [G, R, K] (the backward's B). wgmma takes one swizzle for both of its shared-memory
operands, and a [tile_k, R] block of A has the 32-byte one; so with A as stored the shrink loads
its x rows into registers (the 128-byte-swizzled tile stays as it is for TMA) and only A comes
from shared memory. Transposing A in XLA instead costs a copy (1.6 µs at G = 1, 6.8 at G = 64
on the H100), and giving the x tiles A's swizzle (16 wide) made the kernel 226 µs instead of
184. E is [G, R, N] (or [G, N, R] read transposed, `transpose_e`). The backward uses the same
kernel for dx = dy @ W^T + du @ A^T with B [G, R, O] as the shrink operand (u = dy @ B^T comes
out as s) and A as E (transpose_e).

Structure as matmul_expand's: persistent, one producer warpgroup streaming tiles through a
`stages`-deep ring, two compute warpgroups with tile_m x tile_n of y each (stacked rows,
tile_m / 64 accumulators of 64 rows), epilogue through shared memory by TMA. The store buffer
and the E tiles take turns in one shared-memory region (a RefUnion), which leaves room for 4
pipeline stages at rank 16 (3 without: 4 divide K / tile_k, so the producer's pipeline chains
across tiles, `GemmConfig.chain_tiles`). Mosaic GPU's interpret mode has no semaphores, so
there (`sync="two_launch"`) the shrink bands run as one launch and the GEMM as a second one
reading h: the same code without the waits.

Tried and dropped, both to have the bands the first wave needs ready in half the time:
- shrink units of one row tile (the two warpgroups splitting its pieces): with x through
  registers the forward kernel took 200 µs instead of 186 (H100, same run). With one piece per
  warpgroup, each K step's register load, wgmma and wait run back to back;
- each band's shrink split over two K ranges on two CTAs (partial s and h, two expand wgmmas):
  the forward kernel took 204–205 µs, the dx kernel (shared-memory operands) 184–187 as before.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from rtpjax.kernels import lora_matmul_mgpu as mm

SUB = 64  # rows per wgmma instruction: the piece that has one slot
_WGS = mm._COMPUTE_WGS
SYNCS = ("semaphore", "two_launch")

DEFAULT_CONFIG = mm.DEFAULT_CONFIG  # 4 stages fit beside rank 16 (config_for: 3 at 32, 48)


def _out_e_slots(cfg: mm.GemmConfig, R: int, itemsize: int = 2) -> tuple[int, int] | None:
    """(store pieces, E tiles) per warpgroup in the shared region the epilogue's store buffer
    and the expand's E tiles take turns in (a RefUnion: E is dead once the expand's wgmma is
    done, the store buffer free once the previous tile's stores have read it). Both sides are
    padded to the same bytes per warpgroup, so warpgroup w's store buffer overlaps only its
    own E tiles. None when the two sizes do not divide a common size."""
    out_b = cfg.epi * cfg.epi * itemsize
    e_b = R * cfg.tile_n * itemsize
    per_wg = max(cfg.epi_slots * out_b, (cfg.tile_m // SUB) * e_b)
    if per_wg % out_b or per_wg % e_b:
        return None
    return per_wg // out_b, per_wg // e_b


def smem_bytes(cfg: mm.GemmConfig, R: int, itemsize: int = 2) -> int:
    """The larger of the two phases: the shrink's ring (x and the A^T blocks of every piece),
    and the GEMM's ring with its h buffer and the store / E region."""
    nsub = cfg.tile_m // SUB
    shrink = cfg.stages * (cfg.cta_m * cfg.tile_k + _WGS * nsub * R * cfg.tile_k) * itemsize
    shrink += 2 * _WGS * cfg.tile_m * R * itemsize  # s and h on their way out
    ring = cfg.stages * (cfg.cta_m * cfg.tile_k + cfg.tile_k * cfg.cta_n) * itemsize
    slots = _out_e_slots(cfg, R, itemsize)
    out_e = _WGS * slots[0] * cfg.epi * cfg.epi * itemsize if slots else 1 << 30
    h = _WGS * cfg.tile_m * R * itemsize
    return max(shrink, ring + out_e + h)


def config_for(R: int, itemsize: int = 2) -> mm.GemmConfig:
    """The default tiles with as many stages (4, else 3) as fit beside rank R's buffers: 4
    divide K / tile_k for the usual widths, so the producer's pipeline chains across tiles."""
    for stages in (4, 3):
        cfg = mm.GemmConfig(stages=stages)
        if smem_bytes(cfg, R, itemsize) <= mm._SMEM_BYTES:
            return cfg
    return DEFAULT_CONFIG


def supports(M: int, N: int, K: int, R: int, dtype, cfg: mm.GemmConfig = DEFAULT_CONFIG) -> bool:
    """Shapes this kernel tiles exactly; lora_linear falls back to the visit kernel otherwise."""
    dtype = jnp.dtype(dtype)
    return (
        dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and cfg.wg_split == "m"
        and cfg.cluster is None
        and cfg.tile_m % SUB == 0
        and SUB % cfg.epi == 0
        and M % cfg.cta_m == 0
        and N % cfg.cta_n == 0
        and K % cfg.tile_k == 0
        and R % 16 == 0
        and 16 <= R <= 64
        and smem_bytes(cfg, R, dtype.itemsize) <= mm._SMEM_BYTES
    )


def one_slot_pieces(group_sizes, T: int) -> bool:
    """Whether every 64-row piece of T rows sorted by slot has its live rows in one slot (the
    condition for this kernel), from concrete group sizes."""
    ends = np.cumsum(np.asarray(group_sizes, np.int64))
    used = min(int(ends[-1]) if len(ends) else 0, T)
    for r0 in range(0, used, SUB):
        last = min(r0 + SUB, used) - 1
        if np.searchsorted(ends, r0, side="right") != np.searchsorted(ends, last, side="right"):
            return False
    return True


def sub_slots(row_slot: jax.Array, G: int) -> jax.Array:
    """i32[T // 64]: each piece's slot (its first row's; pieces in the tail get slot G - 1,
    whose rows end before them)."""
    return jnp.minimum(row_slot[::SUB], G - 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("transpose_w", "transpose_a", "transpose_e", "cfg",
                                             "interpret", "num_sms", "sync"))  # fmt: skip
def matmul_lora(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [K, N], or [N, K] with transpose_w
    a: jax.Array,  # [G, R, K] (the backward's B), or [G, K, R] with transpose_a (the forward's A)
    e: jax.Array,  # [G, R, N], or [G, N, R] with transpose_e
    sub_slot: jax.Array,  # i32[M // 64]: each piece's slot (sub_slots)
    slot_end: jax.Array,  # i32[G]: one past each slot's last row
    scale: jax.Array,  # f32[G]
    *,
    transpose_w: bool = False,
    transpose_a: bool = False,
    transpose_e: bool = False,
    cfg: mm.GemmConfig = DEFAULT_CONFIG,
    interpret: bool = False,
    num_sms: int | None = None,
    sync: str | None = None,
) -> tuple[jax.Array, jax.Array]:  # y [M, N], s [M, R], both in x.dtype
    """y = x @ W + scale[g]·s @ E_g and s = x @ A_g^T per 64-row piece (see module).
    sync: "semaphore" (one launch; the default on a GPU) or "two_launch" (the default in
    interpret mode, which has no semaphores)."""
    M, K = x.shape
    N = w.shape[0] if transpose_w else w.shape[1]
    Kw = w.shape[1] if transpose_w else w.shape[0]
    G, R, Ka = (a.shape[0], a.shape[2], a.shape[1]) if transpose_a else a.shape
    e_shape = (N, R) if transpose_e else (R, N)
    if Kw != K or Ka != K or e.shape != (G, *e_shape) or x.dtype != w.dtype:
        raise ValueError(
            f"matmul_lora: x {x.shape} {x.dtype}, w {w.shape} {w.dtype} (transpose_w="
            f"{transpose_w}), a {a.shape} (transpose_a={transpose_a}), e {e.shape} do not fit "
            "together"
        )
    if not supports(M, N, K, R, x.dtype, cfg):
        raise ValueError(f"matmul_lora: shape M={M} N={N} K={K} R={R} not covered by {cfg}")
    sync = sync or ("two_launch" if interpret else "semaphore")
    if sync not in SYNCS:
        raise ValueError(f"matmul_lora: sync={sync!r} must be one of {SYNCS}")
    k = functools.partial(
        _kernel_call, x.shape, N, R, G, x.dtype, transpose_w, transpose_a, transpose_e, cfg,
        interpret, num_sms or mm._num_sms(),
    )  # fmt: skip
    args = (
        x,
        w,
        a.reshape(G * a.shape[1], a.shape[2]),
        e.reshape(G * e.shape[1], e.shape[2]),
        sub_slot.astype(jnp.int32),
        slot_end.astype(jnp.int32),
        scale.astype(jnp.float32),
    )
    if sync == "semaphore":
        y, s, _ = k("both")(*args)
    else:
        s, h = k("shrink")(*args)
        y = k("gemm")(*args, h)
    return y, s


def _kernel_call(xshape, N, R, G, dtype, transpose_w, transpose_a, transpose_e, cfg, interpret, sms,
                 phase):  # fmt: skip
    """The kernel for one phase: "both" (shrink bands, then tiles that wait for them), "shrink"
    (the bands alone: outputs s and h) or "gemm" (the tiles alone, h given)."""
    M, K = xshape
    isz = jnp.dtype(dtype).itemsize
    tile_m, tile_n, tile_k, epi = cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.epi
    cta_m, cta_n = cfg.cta_m, cfg.cta_n
    nsub = tile_m // SUB
    m_tiles, n_tiles, k_steps = M // cta_m, N // cta_n, K // tile_k
    op_tr = mm._transforms(tile_k, isz)  # x, W^T and A^T tiles all have tile_k minor
    h_tr = e_tr = mm._transforms(R, isz)  # the expand: h [64, R] and e [R, tile_n] (one swizzle)
    e_tile = (tile_n, R) if transpose_e else (R, tile_n)
    out_tr = mm._transforms(epi, isz)
    smem = functools.partial(plgpu.BlockSpec, memory_space=plgpu.SMEM, transforms=op_tr)
    x_spec = smem((cta_m, tile_k), lambda k: (0, k))
    if transpose_w:
        w_spec = smem((cta_n, tile_k), lambda k: (0, k))
    else:
        w_spec = smem((tile_k, cta_n), lambda k: (k, 0))
    n_a = _WGS * nsub  # A blocks per K step: one per (warpgroup, piece)
    if transpose_a:  # [tile_k, R] blocks of A as stored, R-wide swizzle: x goes via registers
        a_spec = plgpu.BlockSpec((tile_k, R), lambda k: (k, 0), memory_space=plgpu.SMEM,
                                 transforms=mm._transforms(R, isz))  # fmt: skip
    else:  # A^T blocks, the x tile's swizzle: both wgmma operands from shared memory
        a_spec = smem((R, tile_k), lambda k: (0, k))
    a_rows = K if transpose_a else R

    n_out, n_e = _out_e_slots(cfg, R, isz)
    e_step = min(1, k_steps - 1)
    total = m_tiles * n_tiles
    grid = m_tiles if phase == "shrink" else min(sms, total)
    # The CTAs with one tile fewer (the last total % grid of the strided order) do the shrink:
    # CTA c takes the tiles rot(c), rot(c) + grid, ... with rot(c) = (c + total % grid) % grid,
    # so CTAs 0 .. n_shrink - 1 are the short ones.
    spare = (grid - total % grid) % grid
    n_shrink = m_tiles if phase == "shrink" else min(m_tiles, grid, max(spare, 1))
    if phase == "both" and spare == 0:
        n_shrink = min(m_tiles, grid)
    chained = cfg.chain_tiles and k_steps % cfg.stages == 0 and total >= 2 * grid

    def gemm_pipeline(body, compute_context, state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_steps,), memory_registers=40, in_specs=[x_spec, w_spec],
            wg_axis="wg", num_compute_wgs=_WGS, max_concurrent_steps=cfg.stages,
            compute_context=compute_context, pipeline_state=state,
        )  # fmt: skip

    def shrink_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_steps,), memory_registers=40, in_specs=[x_spec] + [a_spec] * n_a,
            wg_axis="wg", num_compute_wgs=_WGS, max_concurrent_steps=cfg.stages,
            compute_context=compute_context,
        )  # fmt: skip

    def kernel(x_g, w_g, a_g, e_g, sslot_g, send_g, scale_g, *outs):
        if phase == "gemm":
            h_g, y_g = outs
        elif phase == "shrink":
            s_g, h_g = outs
        else:
            y_g, s_g, h_g = outs
        sems = (
            pl.get_global(plgpu.SemaphoreType.REGULAR((m_tiles * _WGS,)))
            if phase == "both"
            else None
        )
        unused = lambda *a, **k: None
        wg = lax.axis_index("wg")
        cta = lax.axis_index("sm")

        def band_slot(band, q, p):
            return sslot_g[(band * _WGS + q) * nsub + p]

        def shrink_band(band):
            a_views = [a_g.at[pl.ds(band_slot(band, q, p) * a_rows, a_rows), :]
                       for q in range(_WGS) for p in range(nsub)]  # fmt: skip
            row_tile = band * _WGS + wg
            my_rows = pl.ds(row_tile * tile_m, tile_m)

            @functools.partial(
                pl.run_scoped,
                ring=shrink_pipeline(unused, unused).get_allocations(x_g, *a_views),
                s_smem=plgpu.SMEM((_WGS, tile_m, R), dtype, transforms=h_tr),
                h_smem=plgpu.SMEM((_WGS, tile_m, R), dtype, transforms=h_tr),
                collective_axes="wg",
            )
            def _(ring, s_smem, h_smem):
                def mma(_, x_s, *rest):
                    *a_s, saccs = rest
                    for q in range(_WGS):

                        @pl.when(wg == q)
                        def _(q=q):
                            for p in range(nsub):
                                x_p = x_s.at[pl.ds(q * tile_m + p * SUB, SUB), :]
                                a_p = a_s[q * nsub + p]
                                if transpose_a:  # x from registers (interpret mode: the
                                    # same product from the ref; it has no register operand)
                                    plgpu.wgmma(saccs[p], x_p if interpret else x_p[...], a_p)
                                else:
                                    plgpu.wgmma(saccs[p], x_p, a_p.transpose((1, 0)))

                    plgpu.wgmma_wait(0)
                    return saccs

                def compute_context(run_pipeline):
                    @functools.partial(
                        pl.run_scoped,
                        saccs=[plgpu.ACC((SUB, R), jnp.float32) for _ in range(nsub)],
                    )
                    def _(saccs):
                        run_pipeline(saccs)
                        for p in range(nsub):
                            piece = row_tile * nsub + p
                            slot = sslot_g[piece]
                            rows = plgpu.broadcasted_iota(jnp.int32, (SUB, R), 0,
                                                          layout=plgpu.Layout.WGMMA)  # fmt: skip
                            sv = jnp.where(rows + piece * SUB < send_g[slot], saccs[p][...], 0.0)
                            s_smem[wg, pl.ds(p * SUB, SUB)] = sv.astype(dtype)
                            h_smem[wg, pl.ds(p * SUB, SUB)] = (sv * scale_g[slot]).astype(dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(s_smem.at[wg], s_g.at[my_rows, :])
                        plgpu.copy_smem_to_gmem(h_smem.at[wg], h_g.at[my_rows, :])
                        plgpu.wait_smem_to_gmem(0, wait_read_only=False)
                        if sems is not None:  # h is in memory: this band's tiles may load it
                            pl.semaphore_signal(sems.at[row_tile], n_tiles)

                rows = pl.ds(band * cta_m, cta_m)
                shrink_pipeline(mma, compute_context)(x_g.at[rows, :], *a_views, allocations=ring)

        if phase in ("both", "shrink"):

            @pl.when(cta < n_shrink)
            def _():
                @pl.loop(cta, m_tiles, step=n_shrink)
                def _(band):
                    shrink_band(band)

        if phase == "shrink":
            return

        @functools.partial(
            pl.run_scoped,
            ring=gemm_pipeline(unused, unused).get_allocations(x_g, w_g),
            out_e=plgpu.RefUnion(
                plgpu.SMEM((_WGS, n_out, epi, epi), dtype, transforms=out_tr),
                plgpu.SMEM((_WGS, n_e, *e_tile), dtype, transforms=e_tr),
            ),
            h_smem=plgpu.SMEM((_WGS, tile_m, R), dtype, transforms=h_tr),
            bars=plgpu.Barrier(num_barriers=_WGS * (nsub + 1)),  # (wg, piece's e), (wg, h)
            collective_axes="wg",
        )
        def _(ring, out_e, h_smem, bars):
            out_smem, e_smem = out_e
            rot = lax.rem(cta + total % grid, grid)
            count = lax.div(total - rot + grid - 1, grid)

            @pl.loop(0, count)
            def _(j):
                lin = rot + j * grid
                mi, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), 0, cfg.snake_width)
                row_tile = mi * _WGS + wg
                my_rows = pl.ds(row_tile * tile_m, tile_m)
                my_cols = pl.ds(ni * cta_n, tile_n)  # wg_split "m": both own the CTA's columns
                piece = lambda p: row_tile * nsub + p
                h_bar = bars.at[_WGS * nsub + wg]

                def mma(idx, x_s, w_s, accs):
                    # E shares its buffer with the store's: it loads once the previous tile's
                    # stores have read it, long done by the second K step (the first: K = 1).
                    pl.when(idx[0] == e_step)(fetch_e_and_h)
                    w_t = w_s.transpose((1, 0)) if transpose_w else w_s
                    for p in range(nsub):
                        plgpu.wgmma(accs[p], x_s.at[pl.ds(wg * tile_m + p * SUB, SUB), :], w_t)
                    plgpu.wgmma_wait(0)
                    return accs

                def live(p):  # the piece has rows of its slot
                    return send_g[sslot_g[piece(p)]] > piece(p) * SUB

                def fetch_e(p):
                    slot = sslot_g[piece(p)]
                    if transpose_e:
                        e_src = e_g.at[pl.ds(slot * N + ni * cta_n, tile_n), :]
                    else:
                        e_src = e_g.at[pl.ds(slot * R, R), my_cols]
                    plgpu.copy_gmem_to_smem(e_src, e_smem.at[wg, p], bars.at[wg * nsub + p])

                def fetch_h():
                    if sems is not None:
                        pl.semaphore_wait(sems.at[row_tile], 1, decrement=False)
                    plgpu.copy_gmem_to_smem(h_g.at[my_rows, :], h_smem.at[wg], h_bar)

                def fetch_e_and_h():
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for p in range(nsub):
                        pl.when(live(p))(functools.partial(fetch_e, p))
                    # The CTA's first tile may run beside its band's shrink: it waits for h
                    # after its K loop. Later tiles find h ready and load it during theirs.
                    pl.when(j > 0)(fetch_h)

                def compute_context(run_pipeline):
                    @functools.partial(
                        pl.run_scoped,
                        accs=[plgpu.ACC((SUB, tile_n), jnp.float32) for _ in range(nsub)],
                    )
                    def _(accs):
                        run_pipeline(accs)
                        pl.when(j == 0)(fetch_h)
                        plgpu.barrier_wait(h_bar)
                        for p in range(nsub):

                            @pl.when(live(p))
                            def _(p=p):
                                plgpu.barrier_wait(bars.at[wg * nsub + p])
                                e_op = e_smem.at[wg, p]
                                plgpu.wgmma(
                                    accs[p], h_smem.at[wg, pl.ds(p * SUB, SUB)],
                                    e_op.transpose((1, 0)) if transpose_e else e_op,
                                )  # fmt: skip

                        plgpu.wgmma_wait(0)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for p in range(nsub):
                            y = accs[p][...].astype(dtype)
                            for pm in range(SUB // epi):
                                for pn in range(tile_n // epi):
                                    buf = (pm * (tile_n // epi) + pn) % cfg.epi_slots
                                    plgpu.wait_smem_to_gmem(cfg.epi_slots - 1,
                                                            wait_read_only=True)  # fmt: skip
                                    out_smem[wg, buf] = y[pm * epi:(pm + 1) * epi,
                                                          pn * epi:(pn + 1) * epi]  # fmt: skip
                                    plgpu.commit_smem()
                                    plgpu.copy_smem_to_gmem(
                                        out_smem.at[wg, buf],
                                        y_g.at[my_rows, my_cols].at[
                                            pl.ds(p * SUB + pm * epi, epi), pl.ds(pn * epi, epi)
                                        ],
                                    )  # fmt: skip

                cols = pl.ds(ni * cta_n, cta_n)
                w_view = w_g.at[cols, :] if transpose_w else w_g.at[:, cols]
                state = None
                if chained:  # the CTA's first tile fills the ring, its last one drains it
                    state = jnp.where(
                        j == 0,
                        int(plgpu.PipelinePipeline.START),
                        jnp.where(
                            j == count - 1,
                            int(plgpu.PipelinePipeline.STOP),
                            int(plgpu.PipelinePipeline.STEADY),
                        ),
                    ).astype(jnp.int32)
                rows = pl.ds(mi * cta_m, cta_m)
                gemm_pipeline(mma, compute_context, state)(x_g.at[rows, :], w_view,
                                                           allocations=ring)  # fmt: skip

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    # Named per use, so a profile tells the forward's launch from the backward's.
    kernel.__name__ = f"lora_in_gemm_{phase}_{'dx' if transpose_w else 'y'}_s{cfg.stages}"
    y_t = jax.ShapeDtypeStruct((M, N), dtype)
    sr_t = jax.ShapeDtypeStruct((M, R), dtype)
    out_type = {"both": (y_t, sr_t, sr_t), "shrink": (sr_t, sr_t), "gemm": y_t}[phase]
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(grid,),
        grid_names=("sm",),
        num_threads=_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
