"""Weight-streaming matmul for few rows (decode) on NVIDIA GPUs: Pallas, Triton lowering.

y[M, N] = x[M, K] · w[N, K]ᵀ with M <= 64 (GEMM letters here, not the glossary's heads). At
such M the product is a stream over w: every weight byte is read once, and the work per byte is
tiny. A program owns block_n rows of w (and one of split_k slices of K); it walks its K range in
block_k chunks, each a [block_n, block_k] tile of contiguous K, and the compiler's software
pipeline (num_stages) keeps several tiles in flight. x is tiny and stays in L2; its rows past M
are masked to zero (Mp = max(16, next power of two of M) rows: tl.dot needs >= 16).

Forms (KernelConfig.form):
- "wx": acc f32[block_n, Mp] += w_tile · x_tileᵀ. w is the dot's left operand, so block_n >= 64
  fills a Hopper wgmma (its M is 64 per warpgroup) while Mp stays 16.
- "xw": acc f32[Mp, block_n] += x_tile · w_tileᵀ (the textbook orientation: Mp = 16 rows put
  Hopper on the older mma.sync path).
- "gemv": M == 1 only, no tensor cores: acc f32[block_n, block_k] += w_tile * x_chunk, one row
  reduction at the end.

With split_k > 1 each program writes a float32 partial [M, block_n]; XLA sums the S partials
(one small fusion, the output cast fused into it). That buys programs when N / block_n is small
against the SM count (N = 4096 at block_n 64 is 64 programs on 132 SMs).

The kernel runs in Pallas interpret mode on CPU (the tests do that). Measured figures and the
reasoning behind choose_config are in docs/kernels/skinny_matmul.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = [
    "DTYPES",
    "FORMS",
    "MAX_M",
    "KernelConfig",
    "auto_split",
    "check_config",
    "choose_config",
    "gpu_skinny_matmul",
    "padded_rows",
    "pipeline_bytes",
    "supports",
]

MAX_M = 64
K_MULTIPLE = 128
N_MULTIPLE = 16
FORMS = ("wx", "xw", "gemv")
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
NUM_SMS = 132  # H100 SXM; only a default for choose_config when no device says otherwise


def supports(m: int, n: int, k: int, dtype: jnp.dtype) -> bool:
    """Whether the kernel covers y[m, n] = x[m, k] · w[n, k]ᵀ in dtype (else "auto" uses xla)."""
    return (
        1 <= m <= MAX_M
        and n >= N_MULTIPLE
        and n % N_MULTIPLE == 0
        and k >= K_MULTIPLE
        and k % K_MULTIPLE == 0
        and n * k < 2**31  # the kernel's element offsets are int32
        and jnp.dtype(dtype) in DTYPES
    )


def padded_rows(m: int) -> int:
    """Mp: rows of the x tile and the accumulator (a power of two >= 16, for tl.dot)."""
    p = 16
    while p < m:
        p *= 2
    return p


def _pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel shape. block_n: rows of w (output columns) per program; block_k: K per
    loop step; split_k: programs sharing one block_n's K range (float32 partials summed by XLA);
    num_warps, num_stages: Triton's (num_stages = tiles in flight in the software pipeline);
    form: "wx", "xw" or "gemv" (see the module docstring)."""

    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    form: str = "wx"

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            val = getattr(self, name)
            if val < 16 or not _pow2(val):
                raise ValueError(f"KernelConfig.{name}={val} must be a power of two >= 16")
        if self.split_k < 1:
            raise ValueError(f"KernelConfig.split_k={self.split_k} must be >= 1")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"KernelConfig.num_warps={self.num_warps} must be 1, 2, 4, 8 or 16")
        if self.num_stages < 1:
            raise ValueError(f"KernelConfig.num_stages={self.num_stages} must be >= 1")
        if self.form not in FORMS:
            raise ValueError(f"KernelConfig.form={self.form!r} must be one of {FORMS}")

    @property
    def tag(self) -> str:
        """Short name for tables and kernel names."""
        return (
            f"{self.form}_n{self.block_n}_k{self.block_k}_s{self.split_k}"
            f"_w{self.num_warps}_p{self.num_stages}"
        )


def check_config(cfg: KernelConfig, m: int, n: int, k: int) -> None:
    """Raise ValueError when cfg cannot run y[m, n] = x[m, k] · w[n, k]ᵀ."""
    if k % cfg.block_k:
        raise ValueError(f"KernelConfig.block_k={cfg.block_k} must divide K={k}")
    if cfg.split_k > k // cfg.block_k:
        raise ValueError(
            f"KernelConfig.split_k={cfg.split_k} must be <= K / block_k = {k // cfg.block_k}"
        )
    if cfg.form == "gemv" and m != 1:
        raise ValueError(f"KernelConfig.form='gemv' needs M == 1, got M={m}: use 'wx' or 'xw'")


def _num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or NUM_SMS
    except RuntimeError:
        return NUM_SMS


def auto_split(
    n: int, k: int, block_n: int, block_k: int, *, target: int, min_steps: int = 4
) -> int:
    """Smallest power-of-two split_k giving >= target programs, each with >= min_steps K steps
    (a pipeline shorter than that is mostly fill) and an equal share of K."""
    nb = -(-n // block_n)
    nk = k // block_k
    s = 1
    while nb * s < target and nk % (2 * s) == 0 and nk // (2 * s) >= min_steps:
        s *= 2
    return s


SMEM_BUDGET = 160 << 10  # of the H100's 227 KB per block: room for Triton's own scratch


def pipeline_bytes(cfg: KernelConfig, m: int, itemsize: int = 2) -> int:
    """Shared memory of the software pipeline: num_stages tiles of w (and of x), roughly."""
    rows = cfg.block_n + (0 if cfg.form == "gemv" else padded_rows(m))
    return cfg.num_stages * rows * cfg.block_k * itemsize


def choose_config(
    m: int, n: int, k: int, num_sms: int | None = None, itemsize: int = 2
) -> KernelConfig:
    """The kernel shape for y[m, n] = x[m, k] · w[n, k]ᵀ: a function of the static shapes only.

    A first guess before any measurement (docs/kernels/skinny_matmul.md has the reasoning and
    the sweep that replaces it): about two programs per SM; row blocks of 64 rows of w (128 when
    M > 32, so that each program's re-read of x from L2 stays at most half its w bytes), halved
    down to max(32, Mp) before splitting K (split-K costs a second launch, the partial sum);
    256-wide K steps (512 B of each weight row per step) with up to 4 tiles in flight.
    itemsize: bytes per element of x and w (the pipeline's shared memory scales with it).
    """
    sms = num_sms or _num_sms()
    target = 7 * sms // 4  # "about two": 256 programs on 132 SMs is close enough
    block_n = 64 if m <= 32 else 128
    while block_n > max(32, padded_rows(m)) and -(-n // block_n) < target:
        block_n //= 2
    warps = 4 if padded_rows(m) * block_n <= 64 * 64 else 8
    # The widest K step that keeps >= 3 tiles in flight within the shared memory budget
    # (float32 tiles with Mp = 64 need the narrower steps).
    shapes = [(bk, st) for bk in (256, 128, 64) for st in (4, 3) if k % bk == 0] + [(32, 2)]
    for block_k, stages in shapes:
        cfg = KernelConfig(block_n, block_k, 1, warps, stages, "wx")
        if pipeline_bytes(cfg, m, itemsize) <= SMEM_BUDGET:
            break
    split = auto_split(n, k, block_n, block_k, target=target)
    return dataclasses.replace(cfg, split_k=split)


def _kernel(x_ref, w_ref, out_ref, *, M: int, cfg: KernelConfig, exact_f32: bool):
    """x_ref [M, K]; w_ref [N, K]; out_ref [M, N] (split_k == 1) or f32[S*M, N] (partials)."""
    K = x_ref.shape[1]
    N = w_ref.shape[0]
    BN, BK, S = cfg.block_n, cfg.block_k, cfg.split_k
    Mp = 1 if cfg.form == "gemv" else padded_rows(M)
    j = pl.program_id(0)
    nk = K // BK
    per = -(-nk // S)
    k0 = pl.program_id(1) * per if S > 1 else 0
    # Equal shares keep the trip count static (the software pipeline's best case).
    steps = per if nk % S == 0 else jnp.minimum(per, nk - k0)

    n_idx = j * BN + lax.broadcasted_iota(jnp.int32, (BN,), 0)  # i32[BN]
    n_ok = n_idx < N
    # Rows past N (last block only) load row N-1 unmasked: w's loads stay unmasked and
    # contiguous along K; those columns are never stored.
    n_load = n_idx if N % BN == 0 else jnp.minimum(n_idx, N - 1)
    m_idx = lax.broadcasted_iota(jnp.int32, (Mp,), 0)  # i32[Mp]
    m_ok = m_idx < M
    k_iota = lax.broadcasted_iota(jnp.int32, (BK,), 0)
    dot = functools.partial(plgpu.dot, allow_tf32=False) if exact_f32 else plgpu.dot

    def load_w(kk):  # [BN, BK]
        return plgpu.load(w_ref.at[n_load[:, None], kk[None, :]])

    def load_x(kk):  # [Mp, BK], rows >= M zero
        rows = jnp.minimum(m_idx, M - 1)[:, None]
        if Mp == M:
            return plgpu.load(x_ref.at[rows, kk[None, :]])
        mask = jnp.broadcast_to(m_ok[:, None], (Mp, BK))
        return plgpu.load(x_ref.at[rows, kk[None, :]], mask=mask, other=0.0)

    if cfg.form == "gemv":

        def body(i, acc):  # acc f32[BN, BK]: one reduction over K after the loop
            kk = (k0 + i) * BK + k_iota
            w = load_w(kk).astype(jnp.float32)
            return acc + w * load_x(kk).astype(jnp.float32)

        acc = lax.fori_loop(0, steps, body, jnp.zeros((BN, BK), jnp.float32))
        acc = jnp.sum(acc, axis=1)[:, None]  # f32[BN, 1]
    elif cfg.form == "wx":

        def body(i, acc):  # acc f32[BN, Mp]
            kk = (k0 + i) * BK + k_iota
            return acc + dot(load_w(kk), load_x(kk), trans_b=True)

        acc = lax.fori_loop(0, steps, body, jnp.zeros((BN, Mp), jnp.float32))
    else:

        def body(i, acc):  # acc f32[Mp, BN]
            kk = (k0 + i) * BK + k_iota
            return acc + dot(load_x(kk), load_w(kk), trans_b=True)

        acc = lax.fori_loop(0, steps, body, jnp.zeros((Mp, BN), jnp.float32))

    # Store through index arrays shaped like acc (no transpose of the accumulator). Masked-off
    # entries point past the array: never dereferenced on the GPU, and dropped by interpret
    # mode's scatter (an in-range dummy index could race a real store there).
    rows_total = out_ref.shape[0]
    row = m_idx + (pl.program_id(1) * M if S > 1 else 0)  # i32[Mp]
    if cfg.form == "xw":
        ok = m_ok[:, None] & n_ok[None, :]  # bool[Mp, BN]
        r_idx, c_idx = row[:, None], n_idx[None, :]
    else:
        ok = n_ok[:, None] & m_ok[None, :]  # bool[BN, Mp]
        r_idx, c_idx = row[None, :], n_idx[:, None]
    ok = jnp.broadcast_to(ok, acc.shape)
    r_idx = jnp.where(ok, r_idx, rows_total)
    c_idx = jnp.where(ok, c_idx, 0)
    plgpu.store(out_ref.at[r_idx, c_idx], acc.astype(out_ref.dtype), mask=ok)


def gpu_skinny_matmul(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [N, K]
    *,
    out_dtype: jnp.dtype | None = None,
    config: KernelConfig | None = None,
    interpret: bool = False,
) -> jax.Array:  # [M, N] in out_dtype (default x.dtype)
    """The Pallas (Triton lowering) kernel; inputs as validated by skinny_matmul."""
    M, K = x.shape
    N = w.shape[0]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if not supports(M, N, K, x.dtype) or x.dtype != w.dtype:
        raise ValueError(
            f"the GPU kernel does not cover M={M}, N={N}, K={K} (x {x.dtype}, w {w.dtype}): "
            f"needs 1 <= M <= {MAX_M}, K % {K_MULTIPLE} == 0, N % {N_MULTIPLE} == 0, N*K < 2**31, "
            "x and w of one dtype in bfloat16, float16, float32 (impl='auto' falls back to xla)"
        )
    cfg = config or choose_config(M, N, K, itemsize=jnp.dtype(x.dtype).itemsize)
    check_config(cfg, M, N, K)
    S = cfg.split_k
    part_dtype = out_dtype if S == 1 else jnp.dtype(jnp.float32)
    kernel = functools.partial(_kernel, M=M, cfg=cfg, exact_f32=jnp.dtype(x.dtype) == jnp.float32)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((S * M, N), part_dtype),
        grid=(-(-N // cfg.block_n), S),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"skinny_matmul_{cfg.tag}",
    )(x, w)
    if S == 1:
        return out
    return jnp.sum(out.reshape(S, M, N), axis=0).astype(out_dtype)
