"""Ragged paged attention for prefill on Hopper GPUs (Pallas, Mosaic GPU): TMA + wgmma.

Same inputs and meaning as ragged_paged_attention.py (module docstring there). Decode stays on
the Triton-lowered kernel (ragged_paged_attention_gpu.py); this one is for prefill chunks, with or
without a cached prefix, chunk boundaries anywhere.

Layout work in the wrapper (XLA gathers, about one pass over q and one over the output):
- queries are cut into blocks of BQ tokens that never straddle sequences (rpa.q_block_map), and
  each (block, kv head) becomes one contiguous tile of BM = BQ*G rows (row r: token r // G,
  query head kv_head*G + r % G; rows past the sequence zero) in a 2-D array
  q_blk[NB*K*BM, H]: one 2-D TMA box per consumer warpgroup. The output comes back the same way.
- kv_pages is viewed as 2-D [P*page_size, 2K*H]: keys of kv head h are columns 2h*H..(2h+1)*H,
  values the next H. A tile of BS kv tokens is BS/page_size box copies of [page_size, H] (one per
  page) into consecutive shared-memory rows, or one [BS, H] slice of a page when page_size >= BS.
- the page holding each sequence's last kv_len % page_size tokens is copied (the only slots
  past kv_len a tile can reach: they may hold NaN, and 0 * NaN in P·V is NaN) with the slots past
  kv_len zeroed, into a small side array `tail[(B+1)*page_size, 2K*H]` whose last page is all
  zeros; tiles read that page in place of the partial page, and the zero page past it.

Kernel: grid (query block, kv head); three warpgroups. Warpgroup 2 issues the TMA copies of K and
V tiles into a ring of `stages` shared-memory slots (K and V on separate barriers, so QKᵀ starts
before V lands). Warpgroups 0 and 1 each own BMW = BM/2 rows: S = Q·Kᵀ by wgmma, online softmax
in registers in base 2, then acc += P·V by wgmma, either with P straight from registers (FA3's
way; `p_regs`) or through shared memory (the form Mosaic GPU's interpreter can run). Tiles wholly
at or before the block's first query position run without a mask; the rest (the diagonal) run
masked; tiles past the block's last position are never loaded. Both consumers walk the same
tiles, so one "slot is free" barrier per stage with two arrivals keeps the ring in step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from rtpjax.kernels import ragged_paged_attention as rpa

__all__ = ["MgpuConfig", "choose_config", "mgpu_ragged_paged_attention", "supports"]

LOG2E = math.log2(math.e)
HEAD_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
PAGE_SIZES = (16, 32, 64, 128)
_COMPUTE_WGS = 2
_META = 8  # int32 fields per query block in `meta` (see _block_meta)
_SMEM_BYTES = 227 * 1024  # Hopper's opt-in shared memory per block
_MASK = rpa.MASK_VALUE


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Static kernel shape. block_m: query rows (tokens x heads of one kv head) per consumer
    warpgroup (the CTA holds two); block_s: kv tokens per tile; stages: tiles in flight;
    p_regs: P·V's wgmma takes P from registers (else P goes through shared memory: slower, but
    the only form interpret mode runs); pingpong: the two consumers take turns on the tensor
    cores (one's softmax overlaps the other's wgmma)."""

    block_m: int = 64
    block_s: int = 128
    stages: int = 2
    p_regs: bool = True
    pingpong: bool = True

    def __post_init__(self) -> None:
        if self.block_m not in (64, 128):
            raise ValueError(f"MgpuConfig.block_m={self.block_m} must be 64 or 128")
        if self.block_s not in (64, 128):
            raise ValueError(f"MgpuConfig.block_s={self.block_s} must be 64 or 128")
        if self.stages < 2:
            raise ValueError(f"MgpuConfig.stages={self.stages} must be >= 2")

    def smem_bytes(self, head_dim: int, itemsize: int = 2) -> int:
        q = _COMPUTE_WGS * self.block_m * head_dim
        kv = 2 * self.stages * self.block_s * head_dim
        p = 0 if self.p_regs else _COMPUTE_WGS * self.block_m * self.block_s
        return (q + kv + p) * itemsize + 1024  # barriers and alignment


# The H100 sweep's best (bench_attention_mgpu.py, 2026-11-24): 0.88 of cuDNN on 4k fresh and 0.94
# on a 2k chunk over 6k cached, against 0.83 / 0.86 for block_m 64, block_s 128.
DEFAULT_CONFIG = MgpuConfig(block_m=128, block_s=64)


def supports(
    q_shape: tuple[int, ...],
    kv_pages_shape: tuple[int, ...],
    dtype: jnp.dtype,
    *,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    config: MgpuConfig | None = None,
) -> bool:
    """Whether the kernel covers these shapes (else use the Triton kernel or the xla path)."""
    return _unsupported(q_shape, kv_pages_shape, dtype, config or DEFAULT_CONFIG) is None


def _unsupported(q_shape, kv_pages_shape, dtype, cfg: MgpuConfig) -> str | None:
    """One line naming the first unsupported property, or None."""
    if len(q_shape) != 3 or len(kv_pages_shape) != 4:
        return f"q.shape={tuple(q_shape)}, kv_pages.shape={tuple(kv_pages_shape)}: need 3-D, 4-D"
    _, N, H = q_shape
    _, page_size, K2, _ = kv_pages_shape
    if jnp.dtype(dtype) not in DTYPES:
        return f"dtype={jnp.dtype(dtype)} is not supported: use bfloat16 or float16"
    if H not in HEAD_DIMS:
        return f"head_dim={H} is not supported: use one of {HEAD_DIMS}"
    if page_size not in PAGE_SIZES:
        return f"page_size={page_size} is not supported: use one of {PAGE_SIZES}"
    if K2 < 2 or K2 % 2 or N % (K2 // 2):
        return f"q heads N={N} and kv_pages.shape[2]={K2} (2K) do not fit (N % K == 0)"
    G = N // (K2 // 2)
    if cfg.block_m % G:
        return f"G={G} query heads per kv head must divide block_m={cfg.block_m}"
    if cfg.smem_bytes(H) > _SMEM_BYTES:
        return f"{cfg} needs {cfg.smem_bytes(H)} bytes of shared memory at head_dim={H}"
    return None


def choose_config(num_tokens: int, head_dim: int) -> MgpuConfig:
    """Block shapes from static shapes only (one compile per bucket)."""
    del num_tokens, head_dim
    return DEFAULT_CONFIG


def _transforms(cols: int, itemsize: int) -> tuple:
    """TMA/wgmma shared-memory layout for a tile whose minor dimension has `cols` elements."""
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _kernel(
    meta_g,  # i32[NB*_META]
    pages_g,  # i32[B*pps]
    q_g,  # [NB*K*BM, H]
    kv_g,  # [P*page_size, 2K*H]
    tail_g,  # [(B+1)*page_size, 2K*H]
    o_g,  # [NB*K*BM, H]
    *,
    K: int,
    B: int,
    NB: int,
    pps: int,
    page_size: int,
    G: int,
    cfg: MgpuConfig,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    H = q_g.shape[1]
    dtype = q_g.dtype
    isz = jnp.dtype(dtype).itemsize
    BMW, BS, stages = cfg.block_m, cfg.block_s, cfg.stages
    BM = _COMPUTE_WGS * BMW
    rows_per_copy = min(BS, page_size)
    copies = BS // rows_per_copy  # TMA copies per tile per K or V

    def body(q_smem, k_smem, v_smem, p_smem, q_bar, k_full, v_full, k_free, v_free, turn):
        # Heaviest first: a sequence's later blocks see more keys, and the grid runs in order.
        ib = NB - 1 - lax.axis_index("blk")
        kh = lax.axis_index("kvh")
        wg = lax.axis_index("wg")
        base = ib * _META
        seq, n_tiles, t_lo, n_free = (meta_g[base + i] for i in range(4))
        pos0, full = meta_g[base + 4], meta_g[base + 5]
        tile_row0 = (ib * K + kh) * BM  # this (block, kv head)'s first row of q_g / o_g

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < _COMPUTE_WGS)
        def _consumer():
            plgpu.set_max_registers(232 if cfg.p_regs else 240, action="increase")
            q_wg = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_g.at[pl.ds(tile_row0 + wg * BMW, BMW), :], q_wg, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            m = plgpu.layout_cast(jnp.full((BMW,), _MASK, jnp.float32), row_layout)
            l = plgpu.layout_cast(jnp.zeros((BMW,), jnp.float32), row_layout)
            acc = plgpu.layout_cast(jnp.zeros((BMW, H), jnp.float32), plgpu.Layout.WGMMA)
            if cfg.pingpong:
                pl.when(wg == 1)(take_turn)

            def step(i, carry, masked: bool):
                acc, m, l = carry
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(k_full.at[slot])

                def qk(s_ref):
                    plgpu.wgmma(s_ref, q_wg, k_smem.at[slot].transpose((1, 0)))
                    if cfg.pingpong:
                        take_turn()
                    return s_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((BMW, BS), jnp.float32))  # f32[BMW, BS]
                plgpu.barrier_arrive(k_free.at[slot])
                if soft_cap is None:
                    s = s * (sm_scale * LOG2E)  # base 2 from here on
                else:
                    s = (soft_cap * LOG2E) * jnp.tanh(s * (sm_scale / soft_cap))
                if masked:
                    # Row r is token r // G at pos0 + r // G; key column c is position
                    # (t_lo + i) * BS + c. With d = key - pos0: key <= token position
                    # <=> G * d <= r, and (window) key > position - W <=> r < G * (d + W).
                    r = (
                        plgpu.broadcasted_iota(jnp.int32, (BMW, BS), 0, layout=plgpu.Layout.WGMMA)
                        + wg * BMW
                    )
                    c = plgpu.broadcasted_iota(jnp.int32, (BMW, BS), 1, layout=plgpu.Layout.WGMMA)
                    d = c + ((t_lo + i) * BS - pos0)
                    vis = d * G <= r
                    if sliding_window is not None:
                        vis = vis & (r < (d + sliding_window) * G)
                    s = jnp.where(vis, s, _MASK)
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                if masked:  # a row that saw nothing yet has m_new = _MASK: exp2(0) = 1
                    p = jnp.where(vis, p, 0.0)
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                if cfg.pingpong:
                    plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_full.at[slot])
                if cfg.pingpong:
                    plgpu.barrier_wait(turn)
                if cfg.p_regs:

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                else:
                    p_smem.at[wg][...] = p16
                    plgpu.commit_smem()

                    def pv(o_ref):
                        plgpu.wgmma(o_ref, p_smem.at[wg], v_smem.at[slot])
                        return o_ref[...]

                    acc = acc + pl.run_scoped(pv, plgpu.ACC((BMW, H), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            carry = lax.fori_loop(0, n_free, functools.partial(step, masked=False), (acc, m, l))
            acc, m, l = lax.fori_loop(n_free, n_tiles, functools.partial(step, masked=True), carry)
            if cfg.pingpong:
                pl.when(wg == 0)(take_turn)
            inv = 1.0 / jnp.where(l > 0, l, 1.0)
            out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            q_wg[...] = out.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_wg, o_g.at[pl.ds(tile_row0 + wg * BMW, BMW), :])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            k_col = 2 * kh * H
            seq_c = jnp.maximum(seq, 0)

            def sources(i):
                """Per copy of tile t_lo + i: (read kv_g, else tail_g; first source row). The page
                ids are loaded together, before any copy waits on them."""
                out = []
                for cp in range(copies):
                    j = (t_lo + i) * BS + cp * rows_per_copy  # first kv position of the copy
                    s_pg, off = j // page_size, j % page_size
                    pid = pages_g[seq_c * pps + jnp.minimum(s_pg, pps - 1)]
                    in_kv = s_pg < full
                    tpage = jnp.where(s_pg == full, seq_c, B)  # the partial page or zeros
                    out.append((in_kv, jnp.where(in_kv, pid, tpage) * page_size + off))
                return out

            def copy(in_kv, row, col, dst, bar):
                rows, cols = pl.ds(row, rows_per_copy), pl.ds(col, H)
                pl.when(in_kv)(lambda: plgpu.copy_gmem_to_smem(kv_g.at[rows, cols], dst, bar))
                pl.when(~in_kv)(lambda: plgpu.copy_gmem_to_smem(tail_g.at[rows, cols], dst, bar))

            def load(srcs, col, smem, bar):
                """One tile's keys (col = k_col) or values into `smem`."""
                for cp, (in_kv, row) in enumerate(srcs):
                    dst = smem.at[pl.ds(cp * rows_per_copy, rows_per_copy)]
                    copy(in_kv, row, col, dst, bar)

            @pl.loop(0, n_tiles)
            def _(i):
                slot = lax.rem(i, stages)

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                srcs = sources(i)
                load(srcs, k_col, k_smem.at[slot], k_full.at[slot])

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])

                load(srcs, k_col + H, v_smem.at[slot], v_full.at[slot])

            # Observe the last tiles' releases too: every phase of a barrier is waited by each
            # warpgroup that uses it (what the interpreter checks; on the GPU it costs nothing).
            @pl.loop(jnp.maximum(n_tiles - stages, 0), n_tiles)
            def _(i):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

    p_tr = _transforms(BS, isz)
    scratch = [
        plgpu.SMEM((_COMPUTE_WGS, BMW, H), dtype, transforms=_transforms(H, isz)),
        plgpu.SMEM((stages, BS, H), dtype, transforms=_transforms(H, isz)),
        plgpu.SMEM((stages, BS, H), dtype, transforms=_transforms(H, isz)),
        None if cfg.p_regs else plgpu.SMEM((_COMPUTE_WGS, BMW, BS), dtype, transforms=p_tr),
    ]
    barriers = [
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),  # q
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),  # k_full
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),  # v_full
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),  # k_free
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),  # v_free
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS),  # turn (pingpong)
    ]
    pl.run_scoped(lambda *refs: body(*refs), *scratch, *barriers, collective_axes="wg")


def _block_meta(cu_q_lens, kv_lens, num_seqs, *, BQ, NB, BS, page_size, sliding_window):
    """Per query block: (seq, n_tiles, t_lo, n_free, pos0, full_pages, 0, 0) as i32[NB*_META],
    plus (blk_seq, blk_q0, first_blk) from rpa.q_block_map."""
    blk_seq, blk_q0, first_blk = rpa.q_block_map(cu_q_lens, num_seqs, BQ, NB)
    used = blk_seq >= 0
    seq = jnp.maximum(blk_seq, 0)
    q_len = jnp.where(used, cu_q_lens[seq + 1] - cu_q_lens[seq], 0)  # i32[NB]
    kv_len = jnp.where(used, kv_lens[seq], 0)
    pos0 = kv_len - q_len + blk_q0  # position of the block's first token
    hi = jnp.where(used, kv_len - q_len + jnp.minimum(blk_q0 + BQ, q_len), 0)  # keys [0, hi)
    if sliding_window is None:
        t_lo = jnp.zeros_like(hi)
    else:
        t_lo = jnp.maximum(0, pos0 - sliding_window + 1) // BS
    n_tiles = jnp.maximum(0, (hi + BS - 1) // BS - t_lo)
    if sliding_window is None:  # tiles wholly at or before the first query position
        n_free = jnp.clip((pos0 + 1) // BS - t_lo, 0, n_tiles)
    else:
        n_free = jnp.zeros_like(hi)
    full = kv_len // page_size
    zero = jnp.zeros_like(hi)
    meta = jnp.stack([blk_seq, n_tiles, t_lo, n_free, pos0, full, zero, zero], axis=1)
    return meta.astype(jnp.int32).reshape(NB * _META), blk_seq, blk_q0, first_blk


def mgpu_ragged_paged_attention(
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
    config: MgpuConfig | None = None,
    interpret: bool = False,
) -> jax.Array:  # [T, N, H] in q.dtype; padding tokens zero
    """The Mosaic GPU prefill kernel; same inputs as rpa.ragged_paged_attention.

    interpret=True runs Mosaic GPU's interpreter (CPU tests); it cannot run a wgmma whose operand
    sits in registers, so there the config's p_regs is turned off (the math is the same). The
    interpreter runs each warpgroup as a thread that blocks inside XLA:CPU callbacks: with one CPU
    device it can deadlock (seen: tiles of 128); set
    XLA_FLAGS=--xla_force_host_platform_device_count=8 first, as tests/conftest.py does.
    """
    rpa.validate_inputs(
        q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
    )  # fmt: skip
    del max_q_len  # prefill only: the block shape does not depend on it
    T, N, H = q.shape
    P, page_size, K2, _ = kv_pages.shape
    K = K2 // 2
    G = N // K
    B, pps = page_indices.shape
    cfg = config or choose_config(T, H)
    if interpret and cfg.p_regs:
        cfg = dataclasses.replace(cfg, p_regs=False)
    elif not interpret and not cfg.p_regs:
        # Measured on the H100 (2026-11-24): this form never finished (a deadlock); it is the
        # interpreter's stand-in only.
        raise ValueError(
            "MgpuConfig.p_regs=False runs only in interpret mode (on an H100 it deadlocked): "
            "use p_regs=True on a GPU"
        )
    why = _unsupported(q.shape, kv_pages.shape, q.dtype, cfg)
    if why is not None:
        raise ValueError(f"mgpu_ragged_paged_attention: {why}")
    BM = _COMPUTE_WGS * cfg.block_m
    BQ = BM // G
    NB = rpa.num_q_blocks(T, B, BQ)
    BS = cfg.block_s

    meta, blk_seq, blk_q0, first_blk = _block_meta(
        cu_q_lens, kv_lens, num_seqs, BQ=BQ, NB=NB, BS=BS, page_size=page_size,
        sliding_window=sliding_window,
    )  # fmt: skip
    # Queries, block-major: [NB, K, BQ*G, H] as 2-D rows (see module docstring).
    seq = jnp.maximum(blk_seq, 0)
    q_start = cu_q_lens[seq]  # i32[NB]
    q_len = jnp.where(blk_seq >= 0, cu_q_lens[seq + 1] - q_start, 0)
    tok = blk_q0[:, None] + jnp.arange(BQ, dtype=jnp.int32)[None, :]  # i32[NB, BQ]
    row_ok = tok < q_len[:, None]
    q_blk = jnp.where(row_ok[:, :, None, None], q[jnp.where(row_ok, q_start[:, None] + tok, 0)], 0)
    q_blk = q_blk.reshape(NB, BQ, K, G, H).transpose(0, 2, 1, 3, 4).reshape(NB * K * BM, H)

    # The partial last page of each sequence, slots past kv_len zeroed, then one zero page.
    full = kv_lens // page_size  # i32[B]
    tail_pid = page_indices[jnp.arange(B), jnp.minimum(full, pps - 1)]  # i32[B]
    slot_ok = jnp.arange(page_size)[None, :] < (kv_lens % page_size)[:, None]  # bool[B, ps]
    tail = jnp.where(slot_ok[:, :, None, None], kv_pages[tail_pid], 0)  # [B, ps, 2K, H]
    tail = jnp.concatenate([tail, jnp.zeros((1, page_size, K2, H), q.dtype)], axis=0)

    kernel = functools.partial(
        _kernel, K=K, B=B, NB=NB, pps=pps, page_size=page_size, G=G, cfg=cfg,
        sm_scale=float(sm_scale), sliding_window=sliding_window,
        soft_cap=None if soft_cap is None else float(soft_cap),
    )  # fmt: skip
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((NB * K * BM, H), q.dtype),
        grid=(NB, K),
        grid_names=("blk", "kvh"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    # Mosaic GPU wants every operand 256-byte aligned. In the engine page_indices is a slice of
    # the step's packed inputs, which XLA would pass as is (misaligned: measured on the H100);
    # the clamp (a no-op for valid page ids) makes it a buffer of its own.
    pages_flat = jnp.clip(page_indices.reshape(B * pps), 0, P - 1)
    out_blk = call(
        meta,
        pages_flat,
        q_blk,
        kv_pages.reshape(P * page_size, K2 * H),
        tail.reshape((B + 1) * page_size, K2 * H),
    )  # [NB*K*BM, H]
    out_blk = out_blk.reshape(NB, K, BQ, G, H).transpose(0, 2, 1, 3, 4).reshape(NB * BQ, N, H)

    tseq, _, valid = rpa.token_positions(cu_q_lens, kv_lens, num_seqs, T)
    rel = jnp.arange(T, dtype=jnp.int32) - cu_q_lens[tseq]
    row = (first_blk[tseq] + rel // BQ) * BQ + rel % BQ  # i32[T]
    out = out_blk[jnp.where(valid, row, 0)]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
