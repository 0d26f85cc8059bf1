"""The base GEMM with the LoRA expand in its epilogue, for Hopper GPUs (Pallas, Mosaic GPU).

    y[M, N] = x[M, K] @ W  +  sum over visits v of tile(v): h_vis[v] @ e[slot(v)]

W is [K, N] (`transpose_w=False`, the forward `x @ W`) or [N, K] (`transpose_w=True`, the
backward `dy @ W^T` with W stored [in, out]). Rows come in tiles of `tile_m`; a *visit* is one
(row tile, adapter slot) pair: `h_vis[v]` [tile_m, R] holds the rank-space activations of the
tile's rows that belong to the slot (other rows zero, scale already applied), and `e[slot]`
[R, N] is the slot's expand matrix (B in the forward, A^T in the backward). `visit_start[m]` ..
`visit_start[m + 1]` are tile m's visits; `visit_slot[v]` their slots. lora_linear.py builds
these from group sizes.

Why this shape: an unfused LoRA costs a full pass over y (read y, add delta, write y: 67 MB at
4096 x 4096 bf16, ~24 us), more than the 10% of a 0.19 ms GEMM that issue 7 allows. Here the
expand is one more wgmma per visit on the accumulator that is still in registers: R·tile_n
bytes of e and tile_m·R of h per visit, read once per output tile.

Structure: a persistent kernel, one CTA per SM walking output tiles in a snake order (L2 reuse of
x rows and W columns). Three warpgroups: one issues the TMA loads of x and W tiles into a ring of
`stages` shared-memory slots; two compute warpgroups each own a tile_m x tile_n piece of the
CTA's tile (`wg_split="m"`: stacked rows, the CTA covers 2·tile_m x tile_n; `"n"`: side by side,
tile_m x 2·tile_n), run wgmma over K, then their visits, then store through shared memory by TMA
in `epi x epi` pieces (double-buffered so a store overlaps the next piece's conversion).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile shapes of the fused GEMM. Each compute warpgroup owns tile_m x tile_n of y; the CTA
    two of them, stacked (wg_split "m") or side by side ("n")."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    # x/W tiles in flight. 4 divides K / tile_k for the usual widths, so the pipeline chains
    # across tiles (chain_tiles); it fits beside one store and one visit buffer at R = 16. H100,
    # 4096³: 176.0 µs against 178.8 for 3 stages with two of each (docs/kernels/lora.md).
    stages: int = 4
    epi: int = 64  # the store's square piece
    epi_slots: int = 1  # store buffers per warpgroup (2: a store overlaps the next piece)
    visit_buffers: int = 1  # visits whose operands load ahead (the first ones during K)
    snake_width: int = 8  # output tiles per band of the snake
    snake_minor: str = "m"  # planar_snake's minor dimension
    wg_split: str = "m"
    # Two CTAs of a cluster share one operand's tiles through TMA multicast: "n" (adjacent
    # column tiles, x loaded once for both), "m" (adjacent row tiles, W once), None (no cluster).
    cluster: str | None = None
    # One producer pipeline across all of a CTA's tiles (jax's pipeline_state START / STEADY /
    # STOP): the next tile's first loads go out while this tile's epilogue runs, instead of the
    # ring filling from empty for every tile. Used when K / tile_k is a multiple of `stages` and
    # every CTA has at least two tiles; else each tile runs its own pipeline.
    chain_tiles: bool = True

    @property
    def cta_m(self) -> int:
        return self.tile_m * (_COMPUTE_WGS if self.wg_split == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (_COMPUTE_WGS if self.wg_split == "n" else 1)

    def __post_init__(self) -> None:
        if self.tile_m % 64 or self.tile_n % 64 or self.tile_k % 16 or self.stages < 2:
            raise ValueError(f"GemmConfig {self} needs tile_m, tile_n multiples of 64, ")
        if self.visit_buffers not in (1, 2):
            raise ValueError(f"GemmConfig.visit_buffers={self.visit_buffers} must be 1 or 2")
        if self.epi_slots not in (1, 2):
            raise ValueError(f"GemmConfig.epi_slots={self.epi_slots} must be 1 or 2")
        if self.tile_m % self.epi or self.tile_n % self.epi:
            raise ValueError(f"GemmConfig.epi={self.epi} must divide tile_m and tile_n")
        for name in ("snake_minor", "wg_split"):
            if getattr(self, name) not in ("m", "n"):
                raise ValueError(f"GemmConfig.{name}={getattr(self, name)!r} must be 'm' or 'n'")
        if self.cluster not in (None, "m", "n"):
            raise ValueError(f"GemmConfig.cluster={self.cluster!r} must be None, 'm' or 'n'")

    @property
    def cluster_m(self) -> int:
        return self.cta_m * (2 if self.cluster == "m" else 1)

    @property
    def cluster_n(self) -> int:
        return self.cta_n * (2 if self.cluster == "n" else 1)


DEFAULT_CONFIG = GemmConfig()

_SMEM_BYTES = 227 * 1024  # Hopper's opt-in shared memory per block


def smem_bytes(cfg: GemmConfig, R: int, itemsize: int = 2) -> int:
    ring = cfg.stages * (cfg.cta_m * cfg.tile_k + cfg.tile_k * cfg.cta_n) * itemsize
    out = _COMPUTE_WGS * cfg.epi_slots * cfg.epi * cfg.epi * itemsize
    visits = _COMPUTE_WGS * cfg.visit_buffers * (cfg.tile_m * R + R * cfg.tile_n) * itemsize
    return ring + out + visits


def supports(M: int, N: int, K: int, R: int, dtype, cfg: GemmConfig = DEFAULT_CONFIG) -> bool:
    """Shapes this kernel tiles exactly (no masking): the caller falls back otherwise."""
    dtype = jnp.dtype(dtype)
    return (
        dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and M % cfg.cluster_m == 0
        and N % cfg.cluster_n == 0
        and K % cfg.tile_k == 0
        and R % 16 == 0
        and 16 <= R <= 128
        and smem_bytes(cfg, R, dtype.itemsize) <= _SMEM_BYTES
    )


def num_visits(M: int, G: int, tile_m: int) -> int:
    """Upper bound on visits: every row tile once, plus one more per slot boundary."""
    return M // tile_m + G


def _transforms(cols: int, itemsize: int) -> tuple:
    """TMA/wgmma shared-memory layout for a tile whose minor dimension has `cols` elements."""
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _num_sms() -> int:
    dev = jax.devices()[0]
    return getattr(dev, "core_count", None) or 132


@functools.partial(
    jax.jit, static_argnames=("transpose_w", "transpose_e", "cfg", "interpret", "num_sms")
)
def matmul_expand(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [K, N], or [N, K] with transpose_w
    h_vis: jax.Array | None,  # [V, tile_m, R]; None: a plain GEMM (no visits)
    e: jax.Array | None,  # [G, R, N], or [G, N, R] with transpose_e
    visit_start: jax.Array | None,  # i32[M // tile_m + 1]
    visit_slot: jax.Array | None,  # i32[V]
    *,
    transpose_w: bool = False,
    transpose_e: bool = False,
    cfg: GemmConfig = DEFAULT_CONFIG,
    interpret: bool = False,
    num_sms: int | None = None,
) -> jax.Array:  # [M, N] in x.dtype
    """x @ W (or x @ W^T) plus the visits' h_vis[v] @ e[slot(v)] (or @ e[slot(v)]^T), in one
    kernel (see module). transpose_e lets the backward use A [G, I, R] as it is stored."""
    M, K = x.shape
    N = w.shape[0] if transpose_w else w.shape[1]
    Kw = w.shape[1] if transpose_w else w.shape[0]
    plain = h_vis is None
    if plain:  # one visit of zeros per row tile would cost a wgmma each: compile them out
        h_vis = jnp.zeros((1, cfg.tile_m, 16), x.dtype)
        e = jnp.zeros((1, N, 16) if transpose_e else (1, 16, N), x.dtype)
        visit_start = jnp.zeros((M // cfg.tile_m + 1,), jnp.int32)
        visit_slot = jnp.zeros((1,), jnp.int32)
    V, tm, R = h_vis.shape
    G = e.shape[0]
    e_shape = (N, R) if transpose_e else (R, N)
    if Kw != K or tm != cfg.tile_m or e.shape[1:] != e_shape or x.dtype != w.dtype:
        raise ValueError(
            f"matmul_expand: x {x.shape} {x.dtype}, w {w.shape} {w.dtype} (transpose_w="
            f"{transpose_w}), h_vis {h_vis.shape}, e {e.shape} do not fit together"
        )
    if not supports(M, N, K, R, x.dtype, cfg):
        raise ValueError(f"matmul_expand: shape M={M} N={N} K={K} R={R} not covered by {cfg}")
    dtype = x.dtype
    isz = jnp.dtype(dtype).itemsize
    tile_m, tile_n, tile_k, epi = cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.epi
    cta_m, cta_n, split_m = cfg.cta_m, cfg.cta_n, cfg.wg_split == "m"
    m_tiles, n_tiles, k_steps = M // cfg.cluster_m, N // cfg.cluster_n, K // tile_k
    op_tr = _transforms(tile_k, isz)  # x tiles [cta_m, tile_k]; W^T tiles [cta_n, tile_k]
    w_tr = op_tr  # W tiles too: wgmma wants one swizzle for both operands
    # wgmma wants one swizzle for both operands: h's rows (R elements) set it for e too
    # (e's tiles are [R, tile_n], or [tile_n, R] read transposed).
    h_tr = e_tr = _transforms(R, isz)
    e_tile = (tile_n, R) if transpose_e else (R, tile_n)
    out_tr = _transforms(epi, isz)
    minor = 1 if cfg.snake_minor == "n" else 0
    nbuf = cfg.visit_buffers

    # With a cluster the operand both CTAs share is multicast (loaded once into both).
    x_mc = ("cluster",) if cfg.cluster == "n" else ()
    w_mc = ("cluster",) if cfg.cluster == "m" else ()
    x_spec = plgpu.BlockSpec(
        (cta_m, tile_k), lambda k: (0, k), transforms=op_tr, memory_space=plgpu.SMEM,
        collective_axes=x_mc,
    )  # fmt: skip
    if transpose_w:
        w_spec = plgpu.BlockSpec(
            (cta_n, tile_k), lambda k: (0, k), transforms=w_tr, memory_space=plgpu.SMEM,
            collective_axes=w_mc,
        )  # fmt: skip
    else:
        w_spec = plgpu.BlockSpec(
            (tile_k, cta_n), lambda k: (k, 0), transforms=w_tr, memory_space=plgpu.SMEM,
            collective_axes=w_mc,
        )  # fmt: skip
    grid_axis = "cluster_grid" if cfg.cluster else "sm"

    csize = 2 if cfg.cluster else 1
    grid = min((num_sms or _num_sms()) // csize, m_tiles * n_tiles)
    chained = cfg.chain_tiles and k_steps % cfg.stages == 0 and m_tiles * n_tiles >= 2 * grid

    def pipeline(body, compute_context, state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[x_spec, w_spec],
            wg_axis="wg",
            num_compute_wgs=_COMPUTE_WGS,
            max_concurrent_steps=cfg.stages,
            compute_context=compute_context,
            pipeline_state=state,
        )

    def kernel(x_g, w_g, h_g, e_g, vstart_g, vslot_g, y_g):
        unused = lambda *a, **k: None

        @functools.partial(
            pl.run_scoped,
            ring=pipeline(unused, unused).get_allocations(x_g, w_g),
            out_smem=plgpu.SMEM((_COMPUTE_WGS, cfg.epi_slots, epi, epi), dtype, transforms=out_tr),
            h_smem=plgpu.SMEM((_COMPUTE_WGS, nbuf, tile_m, R), dtype, transforms=h_tr),
            e_smem=plgpu.SMEM((_COMPUTE_WGS, nbuf, *e_tile), dtype, transforms=e_tr),
            bars=plgpu.Barrier(num_barriers=2 * nbuf * _COMPUTE_WGS),  # (wg, buffer, h or e)
            collective_axes="wg",
        )
        def scope(ring, out_smem, h_smem, e_smem, bars):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes=grid_axis)
            def tile_loop(info: plgpu.NDLoopInfo):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), minor, cfg.snake_width)
                if cfg.cluster:  # (mi, ni) index cluster tiles: this CTA's half
                    cta = lax.axis_index("cluster")
                    if cfg.cluster == "m":
                        mi = mi * 2 + cta
                    else:
                        ni = ni * 2 + cta
                rows = pl.ds(mi * cta_m, cta_m)
                cols = pl.ds(ni * cta_n, cta_n)
                # This warpgroup's piece: its row tile (indexes the visits) and columns.
                row_tile = mi * (cta_m // tile_m) + (wg if split_m else 0)
                my_rows = pl.ds(row_tile * tile_m, tile_m)
                my_cols = pl.ds(ni * cta_n + (0 if split_m else wg * tile_n), tile_n)
                local_m = pl.ds(wg * tile_m, tile_m)
                local_n = pl.ds(wg * tile_n, tile_n)

                def mma(_, x_s, w_s, acc):
                    x_t = x_s.at[local_m, :] if split_m else x_s
                    if transpose_w:
                        w_t = (w_s if split_m else w_s.at[local_n, :]).transpose((1, 0))
                    else:
                        w_t = w_s if split_m else w_s.at[:, local_n]
                    plgpu.wgmma(acc, x_t, w_t)
                    plgpu.wgmma_wait(0)
                    return acc

                def fetch(v, buf):
                    # h and e come in as 2-D [V·tile_m, R] and [G·R, N] (or [G·N, R]): the
                    # visit's rows of h, its slot's tile of e.
                    h_rows = pl.ds(v * tile_m, tile_m)
                    slot = vslot_g[v]
                    if transpose_e:
                        col0 = ni * cta_n + (0 if split_m else wg * tile_n)
                        e_src = e_g.at[pl.ds(slot * N + col0, tile_n), :]
                    else:
                        e_src = e_g.at[pl.ds(slot * R, R), my_cols]
                    bar = 2 * (nbuf * wg + buf)
                    plgpu.copy_gmem_to_smem(h_g.at[h_rows, :], h_smem.at[wg, buf], bars.at[bar])
                    plgpu.copy_gmem_to_smem(e_src, e_smem.at[wg, buf], bars.at[bar + 1])

                def expand(v, first, stop, acc):
                    # Visit v's operands are in buffer (v - first) % 2; once its wgmma is
                    # done, visit v + nbuf's load goes into the same buffer.
                    buf = lax.rem(v - first, nbuf)
                    plgpu.barrier_wait(bars.at[2 * (nbuf * wg + buf)])
                    plgpu.barrier_wait(bars.at[2 * (nbuf * wg + buf) + 1])
                    e_op = e_smem.at[wg, buf]
                    plgpu.wgmma(
                        acc, h_smem.at[wg, buf], e_op.transpose((1, 0)) if transpose_e else e_op
                    )
                    plgpu.wgmma_wait(0)

                    @pl.when(v + nbuf < stop)
                    def _():
                        fetch(v + nbuf, buf)

                def compute_context(run_pipeline):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((tile_m, tile_n), jnp.float32))
                    def _(acc):
                        if not plain:
                            first, stop = vstart_g[row_tile], vstart_g[row_tile + 1]

                            # The tile's first visits load while its K loop runs.
                            for j in range(nbuf):

                                @pl.when(first + j < stop)
                                def _(j=j):
                                    fetch(first + j, j)

                        run_pipeline(acc)
                        if not plain:
                            body = lambda v, c: expand(v, first, stop, acc) or c
                            lax.fori_loop(first, stop, body, 0)
                        y = acc[...].astype(dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        piece = 0
                        for pm in range(tile_m // epi):
                            for pn in range(tile_n // epi):
                                slot = piece % cfg.epi_slots
                                piece += 1
                                plgpu.wait_smem_to_gmem(cfg.epi_slots - 1, wait_read_only=True)
                                piece_rows = slice(pm * epi, (pm + 1) * epi)
                                out_smem[wg, slot] = y[piece_rows, pn * epi : (pn + 1) * epi]
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(
                                    out_smem.at[wg, slot],
                                    y_g.at[my_rows, my_cols].at[
                                        pl.ds(pm * epi, epi), pl.ds(pn * epi, epi)
                                    ],
                                )

                w_view = w_g.at[cols, :] if transpose_w else w_g.at[:, cols]
                state = None
                if chained:  # the CTA's first tile fills the ring, its last one drains it
                    last = info.num_local_steps - 1
                    state = jnp.where(
                        info.local_index == 0,
                        int(plgpu.PipelinePipeline.START),
                        jnp.where(
                            info.local_index == last,
                            int(plgpu.PipelinePipeline.STOP),
                            int(plgpu.PipelinePipeline.STEADY),
                        ),
                    ).astype(jnp.int32)
                pipeline(mma, compute_context, state)(x_g.at[rows, :], w_view, allocations=ring)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    cluster_kw = dict(cluster=(2,), cluster_names=("cluster",)) if cfg.cluster else {}
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((M, N), dtype),
        grid=(grid,),
        grid_names=(grid_axis,),
        **cluster_kw,
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    return call(
        x,
        w,
        h_vis.reshape(V * tm, R),
        e.reshape(G * e.shape[1], e.shape[2]),
        visit_start.astype(jnp.int32),
        visit_slot.astype(jnp.int32),
    )
