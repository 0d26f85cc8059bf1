"""What every section of scripts/bench_lora.py shares: logging, timing, operands, the LoRA
formulations under test and the layer / jitted-call wrappers around them, the measured ceilings,
relative errors and per-kernel device time.

SMOKE (set by bench_lora.py --smoke) runs the GPU kernels in interpret mode on tiny shapes, a CPU
check of the benchmark itself; ROUNDS (--rounds) is the number of timing rounds. Both are set by
the driver on this module: read them as `common.SMOKE` at call time, never `from ... import SMOKE`
(a copied name would keep the value it had at import). No module imports bench_lora: run as
`__main__`, it would load a second copy with its own globals.
"""

# Shape letters follow docs/glossary.md (I, O: LoRA in/out features).
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rtpjax.kernels import lora
from rtpjax.kernels import lora_gpu as lg
from rtpjax.kernels import lora_linear as ll
from rtpjax.kernels import lora_matmul_mgpu as mm

T0 = time.time()
LOG: list[str] = []
SMOKE = False
SMOKE_GEMM = mm.GemmConfig(
    tile_m=64, tile_n=64, tile_k=32, stages=2, epi=32, snake_width=2, wg_split="n"
)
# The in-GEMM shrink stacks the warpgroups by rows.
SMOKE_GEMM_M = dataclasses.replace(SMOKE_GEMM, wg_split="m")


def say(msg: str) -> None:
    line = f"[{time.time() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    LOG.append(line)


ROUNDS = 7


def timed(fns: dict, args: dict, reps: int = 20, rounds: int | None = None) -> dict[str, float]:
    """Seconds per call of each jitted fn (dispatch-pipelined mean, median over rounds). Calls
    over 5 ms get 2 reps (dispatch cannot matter there)."""
    rounds = rounds or ROUNDS
    if SMOKE:
        reps, rounds = 1, 1
    n = {}
    for k, f in fns.items():
        jax.block_until_ready(f(*args[k]))
        t = time.perf_counter()
        jax.block_until_ready(f(*args[k]))
        n[k] = 2 if time.perf_counter() - t > 5e-3 else reps
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            a = args[k]
            t = time.perf_counter()
            for _ in range(n[k]):
                r = f(*a)
            jax.block_until_ready(r)
            out[k].append((time.perf_counter() - t) / n[k])
    return {k: float(np.median(v)) for k, v in out.items()}


# ---------------------------------------------------------------------------------- operands


def operands(G: int, T: int, D: int, R: int, seed: int = 0, dtype=jnp.bfloat16):
    """x, W, a, b, group sizes (uneven, summing to T), scale, dy."""
    rng = np.random.default_rng(seed + G)
    w = rng.uniform(0.5, 1.5, size=G)
    sizes = np.floor(w / w.sum() * T).astype(np.int32)
    sizes[0] += T - sizes.sum()
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (T, D), dtype)
    W = (jax.random.normal(k[1], (D, D), jnp.float32) / np.sqrt(D)).astype(dtype)
    a = (jax.random.normal(k[2], (G, D, R), jnp.float32) / np.sqrt(D)).astype(dtype)
    b = (jax.random.normal(k[3], (G, R, D), jnp.float32) / np.sqrt(R)).astype(dtype)
    dy = jax.random.normal(k[4], (T, D), dtype)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, size=G), jnp.float32)
    return x, W, a, b, jnp.asarray(sizes), scale, dy


# ------------------------------------------------------------------------- LoRA formulations


def op_gpu(config: lg.LoraGpuConfig):
    be = lg.GpuBackend(config, interpret=SMOKE)
    return lambda x, a, b, gs, sc: lora.lora_delta_with(be, x, a, b, gs, sc)


class WithBase:
    """A formulation that takes the base output and returns base + delta (lora_delta's base=)."""

    def __init__(self, config: lg.LoraGpuConfig):
        self.be = lg.GpuBackend(config, interpret=SMOKE)

    def __call__(self, base, x, a, b, gs, sc):
        return lora.lora_delta_with(self.be, x, a, b, gs, sc, base=base)


class Fused:
    """The layer as one call: lora_linear (base GEMM + LoRA expand fused on Hopper)."""

    def __init__(self, gemm_config: mm.GemmConfig, impl="fused", small_ops="auto", plan=False,
                 lora_config: lg.LoraGpuConfig | None = None, one_slot=None):  # fmt: skip
        self.cfg, self.impl, self.small, self.lcfg = gemm_config, impl, small_ops, lora_config
        # one_slot=True: the caller knows every 64-row piece has one slot (groups of multiples
        # of 64 rows), which the plan, built under jit, cannot see: the in-GEMM shrink applies.
        self.one_slot = one_slot
        # plan=True: the row bookkeeping (lora_plan) is built once outside the timed call, as a
        # training step builds it once for all of its layers' projections.
        self.shared_plan, self.plan = plan, None

    def prepare(self, T: int, R: int, gs) -> None:
        if self.shared_plan:
            self.plan = jax.jit(
                lambda g: ll.lora_plan(g, T, R, gemm_config=self.cfg, one_slot=self.one_slot)
            )(gs)

    def layer(self, W, gs, sc, plan=None):
        return lambda x, a, b: ll.lora_linear(
            x, W, a, b, None if plan is not None else gs, sc, impl=self.impl,
            gemm_config=self.cfg, small_ops=self.small, plan=plan, lora_config=self.lcfg,
            interpret=SMOKE,
        )  # fmt: skip


def op_xla(x, a, b, gs, sc):
    return lora.lora_delta(x, a, b, gs, sc, impl="xla")


def op_ragged_dot(x, a, b, gs, sc):
    m = lora.group_meta(gs, sc, None, x.shape[0], a.shape[2])
    s = lax.ragged_dot(x, a, gs, preferred_element_type=jnp.float32)  # f32[T, R]
    s = (s * lora.row_scale(m)[:, None]).astype(x.dtype)
    return lax.ragged_dot(s, b, gs, preferred_element_type=jnp.float32).astype(x.dtype)


def op_gather_einsum(x, a, b, gs, sc):
    m = lora.group_meta(gs, sc, None, x.shape[0], a.shape[2])
    slot = jnp.minimum(m.row_slot, a.shape[0] - 1)
    s = jnp.einsum("TI,TIR->TR", x, a[slot], preferred_element_type=jnp.float32)
    s = (s * lora.row_scale(m)[:, None]).astype(x.dtype)
    return jnp.einsum("TR,TRO->TO", s, b[slot], preferred_element_type=jnp.float32).astype(x.dtype)


def _layer(op, W, gs, sc, with_base: bool, plan=None):
    if isinstance(op, Fused):
        return op.layer(W, gs, sc, plan)
    if isinstance(op, WithBase):
        return lambda x, a, b: op(x @ W, x, a, b, gs, sc)
    if with_base:
        return lambda x, a, b: x @ W + op(x, a, b, gs, sc)
    return lambda x, a, b: op(x, a, b, gs, sc)


# A shared plan (Fused(plan=True)) goes into the jitted call as an argument, as a training step
# passes the plan it built once to every projection. Closed over instead, its arrays become
# constants that XLA rewrites into iota / broadcast kernels run on every call (2-3 µs at G = 1).


def fwd_fn(op, with_base: bool):
    f = jax.jit(
        lambda x, W, a, b, gs, sc, dy, plan: _layer(op, W, gs, sc, with_base, plan)(x, a, b)
    )
    return lambda *ops: f(*ops, getattr(op, "plan", None))


def fb_fn(op, with_base: bool):
    def f(x, W, a, b, gs, sc, dy, plan):
        g = _layer(op, W, gs, sc, with_base, plan)
        y, vjp = jax.vjp(g, x, a, b)
        return (y, *vjp(dy))

    jf = jax.jit(f)
    return lambda *ops: jf(*ops, getattr(op, "plan", None))


def base_fns():
    fwd = jax.jit(lambda x, W, a, b, gs, sc, dy: x @ W)

    def fb(x, W, a, b, gs, sc, dy):
        y, vjp = jax.vjp(lambda x: x @ W, x)
        return y, vjp(dy)[0]

    return fwd, jax.jit(fb)


# -------------------------------------------------------------------------------- ceilings


def ceilings() -> dict:
    n = 1 << 27 if not SMOKE else 1 << 10  # 256 MiB of bf16
    x = jax.random.normal(jax.random.key(1), (n,), jnp.bfloat16)
    copy = jax.jit(lambda v: v * 2)
    t = timed({"c": copy}, {"c": (x,)})["c"]
    bw = 2 * x.nbytes / t
    res = {"copy_tb_s": bw / 1e12}
    for d in (4096, 8192) if not SMOKE else (64,):
        k1, k2 = jax.random.split(jax.random.key(d))
        p = jax.random.normal(k1, (d, d), jnp.bfloat16)
        q = jax.random.normal(k2, (d, d), jnp.bfloat16)
        tm = timed({"m": jax.jit(jnp.matmul)}, {"m": (p, q)})["m"]
        res[f"gemm_{d}_ms"] = tm * 1e3
        res[f"gemm_{d}_tflops"] = 2 * d**3 / tm / 1e12
    say(f"ceilings: copy {res['copy_tb_s']:.2f} TB/s (read+write); " + ", ".join(
        f"{k} {v:.3g}" for k, v in res.items() if k.startswith("gemm")))  # fmt: skip
    return res


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def device_breakdown(fn, args, reps: int = 10) -> dict[str, float]:
    """Device microseconds per call of each kernel `fn` launches (scripts/device_profile.py)."""
    from scripts.device_profile import kernel_times

    jax.block_until_ready(fn(*args))
    return kernel_times(lambda _: fn(*args), 1 if SMOKE else reps)[0]


# The backward's u and dB as two kernels (gmm with trans, tgmm): two passes over dy.
TWO_PASS = dataclasses.replace(lg.DEFAULT_CONFIG, fused_udb=False)
