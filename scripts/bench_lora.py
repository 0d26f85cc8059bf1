"""Benchmark the batched multi-LoRA operator (rtpjax/kernels/lora.py) on a GPU.

    python scripts/bench_lora.py [--out bench_lora.json] [--sweep] [--training] [--smoke]

Prints tables and writes JSON:
- ceilings measured here: HBM copy bandwidth (read + write) and a bf16 GEMM through XLA;
- correctness on the device: the GPU path's output and gradients against the float32 reference;
- for G = 1, 8, 64 adapters (T = 4096 rows, D = 4096 in and out, rank 16, bf16, uneven group
  sizes): the time LoRA adds to the base matmul `x @ W`, i.e. time(base + LoRA in one jit) -
  time(base alone), forward and forward+backward (grads of x, a, b; W frozen, so no dW), for
  the operator's paths beside lax.ragged_dot and a per-row gather + einsum; plus the LoRA call
  alone, and its byte floor (x read, A and B read, delta written; backward: dy read twice, x read,
  dx written);
- with --sweep, kernel block shapes for each of the operator's kernels, timed alone;
- with --profile, per-kernel device time of lora_linear (fused_plan; fused_plan_sep: u and dB
  as two kernels instead of gmm_tgmm's one pass over dy); with --udb-sweep, gmm_tgmm's shapes
  alone against those two kernels, G = 1, 8, 64 (device time from the profiler);
- with --training, the rows of training_benchmark() from scripts/bench_finetune.py (skipped with a
  message when that script does not exist yet).
--smoke runs everything on tiny shapes in Pallas interpret mode: a CPU check of this script.

Timing: `reps` calls dispatched back to back, then one block_until_ready: the mean per call; median
of `rounds` such runs, base and LoRA interleaved round by round so that drift hits both.
"""

# Shape letters follow docs/glossary.md (I, O: LoRA in/out features). The closures made in loops
# are jitted and run within the same iteration, so late binding (B023) cannot bite.
# ruff: noqa: E741, B023
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from rtpjax.kernels import lora  # noqa: E402
from rtpjax.kernels import lora_gpu as lg  # noqa: E402
from rtpjax.kernels import lora_linear as ll  # noqa: E402
from rtpjax.kernels import lora_matmul_mgpu as mm  # noqa: E402

T0 = time.time()
LOG: list[str] = []
SMOKE = False
SMOKE_GEMM = mm.GemmConfig(
    tile_m=64, tile_n=64, tile_k=32, stages=2, epi=32, snake_width=2, wg_split="n"
)


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
                 lora_config: lg.LoraGpuConfig | None = None):  # fmt: skip
        self.cfg, self.impl, self.small, self.lcfg = gemm_config, impl, small_ops, lora_config
        # plan=True: the row bookkeeping (lora_plan) is built once outside the timed call, as a
        # training step builds it once for all of its layers' projections.
        self.shared_plan, self.plan = plan, None

    def prepare(self, T: int, R: int, gs) -> None:
        if self.shared_plan:
            self.plan = jax.jit(lambda g: ll.lora_plan(g, T, R, gemm_config=self.cfg))(gs)

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


# ----------------------------------------------------------------------------- correctness


def ops3(x, a, b):
    return x, a, b


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def correctness(config: lg.LoraGpuConfig, quick: bool = False) -> list[dict]:
    rows = []
    shapes = [(1000, 1024, 16, 768, 8, 37, (jnp.bfloat16, jnp.float32)),
              (4096, 4096, 16, 4096, 64, 0, (jnp.bfloat16,))]  # fmt: skip
    if SMOKE:
        shapes = [(40, 32, 8, 24, 3, 5, (jnp.bfloat16, jnp.float32))]
    if quick:
        shapes = shapes[:1]
    configs = {"default": config, "fused": lg.FUSED_CONFIG}
    for T, I, R, O, G, tail, dtypes in shapes:
        rng = np.random.default_rng(T)
        sizes = rng.multinomial(T - tail, np.ones(G) / G).astype(np.int32)
        sizes[G // 2] = 0
        rank = rng.integers(1, R + 1, size=G).astype(np.int32)
        k = jax.random.split(jax.random.key(T), 4)
        for dtype in dtypes:
            x = jax.random.normal(k[0], (T, I), dtype)
            a = (jax.random.normal(k[1], (G, I, R)) / np.sqrt(I)).astype(dtype)
            b = jax.random.normal(k[2], (G, R, O)).astype(dtype)
            dy = jax.random.normal(k[3], (T, O), dtype)
            gs, sc, rk = jnp.asarray(sizes), jnp.asarray(rng.uniform(0.5, 2, G), jnp.float32), (
                jnp.asarray(rank))  # fmt: skip
            base0 = jax.random.normal(k[0], (T, O), dtype)

            def run(fn, *ops):
                y, vjp = jax.vjp(lambda x, a, b: fn(x, a, b), *ops)
                return (y, *vjp(dy.astype(y.dtype)))

            f32 = [v.astype(jnp.float32) for v in (*ops3(x, a, b), base0)]
            for with_base in (False, True):
                bb = base0.astype(jnp.float32) if with_base else None
                want = jax.jit(lambda x, a, b, bb=bb: run(
                    lambda x, a, b: lora.ref_lora_delta(x, a, b, gs, sc, rank=rk, base=bb),
                    x, a, b))(*f32[:3])  # fmt: skip
                for cname, cfg in configs.items():
                    be = lg.GpuBackend(cfg, interpret=SMOKE)
                    bb = base0 if with_base else None
                    op = lambda x, a, b, be=be, bb=bb: lora.lora_delta_with(
                        be, x, a, b, gs, sc, rank=rk, base=bb)  # fmt: skip
                    got = jax.jit(lambda x, a, b, op=op: run(op, x, a, b))(x, a, b)
                    errs = {n: _rel(g_, w_) for n, g_, w_ in zip(("y", "dx", "da", "db"), got,
                                                                   want, strict=True)}  # fmt: skip
                    tail_ok = True
                    if tail:
                        rest = np.asarray(got[0], np.float32)[T - tail :]
                        ref_rest = np.asarray(base0, np.float32)[T - tail :] if with_base else 0
                        tail_ok = bool((rest == ref_rest).all())
                    finite = all(np.isfinite(np.asarray(v, np.float32)).all() for v in got)
                    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4
                    ok = finite and tail_ok and max(errs.values()) < tol
                    name = f"{cname}{'+base' if with_base else ''}"
                    row = {"shape": [T, I, R, O, G], "dtype": jnp.dtype(dtype).name, "tail": tail,
                           "config": name, "rel_err": errs, "ok": bool(ok)}  # fmt: skip
                    rows.append(row)
                    es = " ".join(f"{n} {e:.1e}" for n, e in errs.items())
                    say(f"check T{T} I{I} R{R} O{O} G{G} {row['dtype']} {name}: {es} -> "
                        f"{'ok' if ok else 'FAIL'}")  # fmt: skip
    return rows


# ------------------------------------------------------------------------------ main table


def floors(T: int, D: int, R: int, G: int, bw: float) -> dict:
    """Byte floors in microseconds: forward (x read, A and B read, delta written) and backward
    (dy read for u and for dB, x read for dA, dx written, A and B read, dA and dB written)."""
    e = 2  # bf16
    ab = 2 * G * D * R * e
    fwd = 2 * T * D * e + ab
    bwd = 4 * T * D * e + 2 * ab
    return {"fwd_us": fwd / bw * 1e6, "fb_us": (fwd + bwd) / bw * 1e6}


def table(bw: float, variants: dict, Gs=(1, 8, 64), alone: bool = True) -> list[dict]:
    T, D, R = (4096, 4096, 16) if not SMOKE else (128, 128, 16)
    rows = []
    base_f, base_fb = base_fns()
    for G in Gs:
        ops = operands(G, T, D, R)
        fl = floors(T, D, R, G, bw)
        for name, op in variants.items():
            if isinstance(op, Fused):
                op.prepare(T, R, ops[4])
            try:
                fns = {"base_f": base_f, "lora_f": fwd_fn(op, True), "base_fb": base_fb,
                       "lora_fb": fb_fn(op, True)}  # fmt: skip
                if alone and not isinstance(op, (WithBase, Fused)):
                    fns |= {"alone_f": fwd_fn(op, False), "alone_fb": fb_fn(op, False)}
                t = timed(fns, dict.fromkeys(fns, ops))
            except Exception as e:  # a variant that fails is reported, not fatal
                say(f"G={G} {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
                rows.append({"G": G, "variant": name, "error": f"{type(e).__name__}: {e}"[:2000]})
                continue
            add_f = t["lora_f"] - t["base_f"]
            add_fb = t["lora_fb"] - t["base_fb"]
            row = {
                "G": G, "variant": name, "T": T, "D": D, "R": R,
                "base_fwd_ms": t["base_f"] * 1e3, "base_fb_ms": t["base_fb"] * 1e3,
                "added_fwd_us": add_f * 1e6, "added_fb_us": add_fb * 1e6,
                "added_fwd_pct": 100 * add_f / t["base_f"],
                "added_fb_pct": 100 * add_fb / t["base_fb"],
                "alone_fwd_us": t.get("alone_f", float("nan")) * 1e6,
                "alone_fb_us": t.get("alone_fb", float("nan")) * 1e6,
                "floor_fwd_us": fl["fwd_us"], "floor_fb_us": fl["fb_us"],
            }  # fmt: skip
            rows.append(row)
            say(f"G={G:3d} {name:14s} base {row['base_fwd_ms']:.3f}/{row['base_fb_ms']:.3f} ms | "
                f"adds fwd {row['added_fwd_us']:7.1f} us ({row['added_fwd_pct']:5.1f}%)  "
                f"fwd+bwd {row['added_fb_us']:7.1f} us ({row['added_fb_pct']:5.1f}%) | alone "
                f"{row['alone_fwd_us']:7.1f}/{row['alone_fb_us']:7.1f} us | floor "
                f"{fl['fwd_us']:.1f}/{fl['fb_us']:.1f} us")  # fmt: skip
    return rows


def fusion_report(config: lg.LoraGpuConfig) -> dict:
    """Does XLA fold `x @ W + delta` into the GEMM (beta = 1)? Read it off the compiled HLO."""
    T, D, R, G = (4096, 4096, 16, 8) if not SMOKE else (64, 32, 16, 2)
    x, W, a, b, gs, sc, _ = operands(G, T, D, R)
    op = op_gpu(config)
    f = jax.jit(lambda x, W, a, b, gs, sc: _layer(op, W, gs, sc, True)(x, a, b))
    hlo = f.lower(x, W, a, b, gs, sc).compile().as_text()
    beta1 = '"beta":1' in hlo.replace(" ", "")
    n_fusions = hlo.count(" fusion(")
    say(f"fusion: GEMM with beta=1 in the forward: {beta1}; fusions in the program: {n_fusions}")
    return {"gemm_beta_1": beta1, "fusions": n_fusions, "hlo_tail": hlo[-4000:]}


# ------------------------------------------------------------------- the fused GEMM + LoRA


GEMM_CONFIGS = {
    "default": mm.GemmConfig(),
    "wgM_s3_epi2_vb2": mm.GemmConfig(stages=3, epi_slots=2, visit_buffers=2),  # fifth session
    "wgN_minM_w8": mm.GemmConfig(wg_split="n"),
    "wgM_minN_w8": mm.GemmConfig(snake_minor="n"),
    "wgM_minM_w16": mm.GemmConfig(snake_width=16),
    "wgM_n64s4": mm.GemmConfig(tile_n=64, stages=4),
    "wgM_k32s6": mm.GemmConfig(tile_k=32, stages=6),
    "wgM_clN": mm.GemmConfig(cluster="n"),  # x multicast to a 2-CTA cluster (cuBLAS: 1x2)
    "wgM_clM": mm.GemmConfig(cluster="m"),  # W multicast
    "wgM_clN_minN": mm.GemmConfig(cluster="n", snake_minor="n"),
    # Stages dividing K / tile_k: one pipeline chained over a CTA's tiles (chain_tiles).
    "wgM_s2": mm.GemmConfig(stages=2),
    "default_unchained": mm.GemmConfig(chain_tiles=False),
    "wgN_s2": mm.GemmConfig(stages=2, wg_split="n"),
}


def gemm_section() -> list[dict]:
    """The fused kernel as a plain GEMM (no visits) against XLA's x @ W and dy @ W^T: what the
    kernel itself costs before any LoRA work (4096^3 bf16)."""
    D = 4096 if not SMOKE else 128
    k = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(k[0], (D, D), jnp.bfloat16)
    W = (jax.random.normal(k[1], (D, D), jnp.float32) / np.sqrt(D)).astype(jnp.bfloat16)
    configs = GEMM_CONFIGS if not SMOKE else {"smoke": SMOKE_GEMM}
    fns = {"xla": jax.jit(lambda x, W: x @ W), "xla_t": jax.jit(lambda x, W: x @ W.T)}
    for name, cfg in configs.items():
        for tw in (False, True):
            plain = lambda x, W, cfg=cfg, tw=tw: mm.matmul_expand(
                x, W, None, None, None, None, transpose_w=tw, cfg=cfg, interpret=SMOKE
            )
            fns[f"{name}{'_t' if tw else ''}"] = jax.jit(plain)
    rows, ok = [], {}
    ref = np.asarray(fns["xla"](x, W), np.float32)
    for name, f in list(fns.items()):
        try:
            got = np.asarray(f(x, W), np.float32)
            want = ref if not name.endswith("_t") else np.asarray(fns["xla_t"](x, W), np.float32)
            ok[name] = _rel(got, want)
        except Exception as ex:  # a config that does not compile is reported, not fatal
            say(f"gemm {name}: FAILED {type(ex).__name__}: {str(ex)[:300]}")
            del fns[name]
    t = timed(fns, dict.fromkeys(fns, (x, W)))
    for name, sec in t.items():
        dev = sum(device_breakdown(fns[name], (x, W)).values())  # µs of kernels, profiler
        row = {"name": name, "us": sec * 1e6, "tflops": 2 * D**3 / sec / 1e12, "rel_err": ok[name],
               "device_us": dev}  # fmt: skip
        rows.append(row)
        say(f"gemm {name:22s} {row['us']:8.1f} us {row['tflops']:6.0f} TFLOP/s, device "
            f"{dev:7.1f} us, rel err vs XLA {row['rel_err']:.1e}")  # fmt: skip
    return rows


def fused_check() -> list[dict]:
    """lora_linear's fused path (values and grads of x, W, a, b, scale) against the float32
    reference `ref_lora_delta(..., base=x @ W)`: per-slot ranks, an empty slot, tail rows."""
    shapes = [(1024, 1024, 16, 768, 8, 37), (4096, 4096, 16, 4096, 64, 0)]
    cfg = mm.DEFAULT_CONFIG
    if SMOKE:
        shapes, cfg = [(128, 128, 16, 128, 3, 5)], SMOKE_GEMM
    rows = []
    for T, I, R, O, G, tail in shapes:
        rng = np.random.default_rng(T + 1)
        sizes = rng.multinomial(T - tail, np.ones(G) / G).astype(np.int32)
        sizes[G // 2] = 0
        rk = jnp.asarray(rng.integers(1, R + 1, size=G).astype(np.int32))
        k = jax.random.split(jax.random.key(T), 5)
        x = jax.random.normal(k[0], (T, I), jnp.bfloat16)
        W = (jax.random.normal(k[4], (I, O)) / np.sqrt(I)).astype(jnp.bfloat16)
        a = (jax.random.normal(k[1], (G, I, R)) / np.sqrt(I)).astype(jnp.bfloat16)
        b = jax.random.normal(k[2], (G, R, O)).astype(jnp.bfloat16)
        dy = jax.random.normal(k[3], (T, O), jnp.bfloat16)
        gs, sc = jnp.asarray(sizes), jnp.asarray(rng.uniform(0.5, 2, G), jnp.float32)

        def run(f, *ops):
            y, vjp = jax.vjp(f, *ops)
            return (y, *vjp(dy.astype(y.dtype)))

        f32 = [v.astype(jnp.float32) for v in (x, W, a, b)]
        want = jax.jit(lambda *o: run(lambda x, W, a, b, sc: lora.ref_lora_delta(
            x, a, b, gs, sc, rank=rk, base=x @ W), *o))(*f32, sc)  # fmt: skip
        got = jax.jit(lambda *o: run(lambda x, W, a, b, sc: ll.lora_linear(
            x, W, a, b, gs, sc, rank=rk, impl="fused", gemm_config=cfg, interpret=SMOKE),
            *o))(x, W, a, b, sc)  # fmt: skip
        errs = {n: _rel(g_, w_) for n, g_, w_ in
                zip(("y", "dx", "dW", "da", "db", "dscale"), got, want, strict=True)}  # fmt: skip
        tail_ok = True
        if tail:  # rows with no adapter: exactly the kernel's own x @ W (not XLA's: other
            # accumulation order, other bf16 roundings)
            plain = mm.matmul_expand(x, W, None, None, None, None, cfg=cfg, interpret=SMOKE)
            base = np.asarray(plain, np.float32)[T - tail :]
            tail_ok = bool((np.asarray(got[0], np.float32)[T - tail :] == base).all())
        ok = tail_ok and max(errs.values()) < 1e-2
        rows.append({"shape": [T, I, R, O, G], "tail": tail, "rel_err": errs, "ok": bool(ok)})
        es = " ".join(f"{n} {e:.1e}" for n, e in errs.items())
        say(f"fused check T{T} I{I} R{R} O{O} G{G} tail {tail}: {es} -> {'ok' if ok else 'FAIL'}")
    return rows


def components() -> list[dict]:
    """Each piece of lora_linear's fused path timed alone (T = D = 4096, rank 16), to see where
    the added time goes: the shrink and u (grouped kernel vs dense XLA), the grads of A and B,
    the visit bookkeeping, and the fused GEMM with its visits against the same kernel without."""
    T, D, R = (4096, 4096, 16) if not SMOKE else (128, 128, 16)
    cfg = SMOKE_GEMM if SMOKE else mm.DEFAULT_CONFIG
    lcfg = lg.DEFAULT_CONFIG
    rows = []
    for G in (1, 8, 64):
        x, W, a, b, gs, sc, dy = operands(G, T, D, R)
        m = lora.group_meta(gs, sc, None, T, R)
        s = ll._shrink(x, a, m, False, "xla", None, SMOKE)
        h = (s * lora.row_scale(m)[:, None]).astype(x.dtype)
        vis = ll.visits(m, T, cfg.tile_m)
        hv = ll.visit_rows(h, m, vis, cfg.tile_m)
        kw = dict(cfg=cfg, interpret=SMOKE)
        fns = {
            "gemm plain": (lambda x, W: mm.matmul_expand(x, W, None, None, None, None, **kw),
                           (x, W)),
            "gemm + visits": (lambda x, W, hv, b, v0, v1: mm.matmul_expand(
                x, W, hv, b, v0, v1, **kw), (x, W, hv, b, vis[0], vis[1])),
            "gemm^T plain": (lambda x, W: mm.matmul_expand(
                x, W, None, None, None, None, transpose_w=True, **kw), (dy, W)),
            "gemm^T + visits (A as stored)": (lambda x, W, hv, a, v0, v1: mm.matmul_expand(
                x, W, hv, a, v0, v1, transpose_w=True, transpose_e=True, **kw),
                (dy, W, hv, a, vis[0], vis[1])),
            "visits + visit_rows": (lambda s, gs, sc: ll.visit_rows(
                s.astype(x.dtype), lora.group_meta(gs, sc, None, T, R),
                ll.visits(lora.group_meta(gs, sc, None, T, R), T, cfg.tile_m), cfg.tile_m),
                (s, gs, sc)),
        }  # fmt: skip
        for small in ("kernel", "xla"):
            fns[f"shrink {small}"] = (
                lambda x, a, gs, sc, small=small: ll._shrink(
                    x, a, lora.group_meta(gs, sc, None, T, R), False, small, lcfg.fwd, SMOKE),
                (x, a, gs, sc))  # fmt: skip
            fns[f"u {small}"] = (
                lambda dy, b, gs, sc, small=small: ll._shrink(
                    dy, b, lora.group_meta(gs, sc, None, T, R), True, small, lcfg.shrink_t,
                    SMOKE), (dy, b, gs, sc))  # fmt: skip
            fns[f"dA {small}"] = (
                lambda x, du, gs, sc, small=small: ll._per_slot(
                    x, du, lora.group_meta(gs, sc, None, T, R), G, x.dtype, small, lcfg.tgmm,
                    SMOKE), (x, h, gs, sc))  # fmt: skip
        jitted = {k: jax.jit(f) for k, (f, _) in fns.items()}
        t = timed(jitted, {k: a_ for k, (_, a_) in fns.items()})
        for k, sec in t.items():
            rows.append({"G": G, "piece": k, "us": sec * 1e6})
            say(f"component G={G:3d} {k:32s} {sec * 1e6:8.1f} us")
    return rows


def device_breakdown(fn, args, reps: int = 10) -> dict[str, float]:
    """Device microseconds per call of each kernel `fn` launches (scripts/device_profile.py)."""
    from scripts.device_profile import kernel_times

    jax.block_until_ready(fn(*args))
    return kernel_times(lambda _: fn(*args), 1 if SMOKE else reps)[0]


def profile_section() -> list[dict]:
    """Per-kernel device time of lora_linear's fused path, forward and forward+backward, beside
    the base matmul alone (G = 1, 8, 64; T = D = 4096, rank 16)."""
    T, D, R = (4096, 4096, 16) if not SMOKE else (128, 128, 16)
    cfg = SMOKE_GEMM if SMOKE else mm.DEFAULT_CONFIG
    rows = []
    base_f, base_fb = base_fns()
    for G in (1, 8, 64) if not SMOKE else (8,):
        ops = operands(G, T, D, R)
        cases = {"base fwd": base_f, "base fwd+bwd": base_fb}
        variants = {"fused": Fused(cfg), "fused_plan": Fused(cfg, plan=True),
                    "fused_plan_sep": Fused(cfg, plan=True, lora_config=TWO_PASS)}  # fmt: skip
        if not SMOKE:  # the fifth session's GEMM shape: 3 stages, two store and visit buffers
            s3 = mm.GemmConfig(stages=3, epi_slots=2, visit_buffers=2)
            variants["fused_plan_s3"] = Fused(s3, plan=True)
        for name, op in variants.items():
            op.prepare(T, R, ops[4])
            cases[f"{name} fwd"] = fwd_fn(op, True)
            cases[f"{name} fwd+bwd"] = fb_fn(op, True)
        for name, fn in cases.items():
            k = device_breakdown(fn, ops)
            total = sum(k.values())
            rows.append({"G": G, "case": name, "device_us": total, "kernels": k})
            top = sorted(k.items(), key=lambda kv: -kv[1])
            say(f"profile G={G:3d} {name:22s} device {total:7.1f} us in {len(k)} kernels: "
                + ", ".join(f"{n[:40]} {v:.1f}" for n, v in top[:12]))  # fmt: skip
    return rows


# The backward's u and dB as two kernels (gmm with trans, tgmm): two passes over dy.
TWO_PASS = dataclasses.replace(lg.DEFAULT_CONFIG, fused_udb=False)


def _udb_configs() -> list[lg.KernelConfig]:
    K = lg.KernelConfig
    if SMOKE:
        return [K(block_t=16, block_n=32), K(block_t=32, block_n=64, splits=2)]
    d = lg.DEFAULT_CONFIG.udb
    shapes = [K(32, 16, 128), K(32, 16, 256), K(64, 16, 128), d, K(64, 16, 256, num_stages=4),
              K(128, 16, 256, num_warps=8), K(64, 16, 512, num_warps=8),
              K(128, 16, 128, num_warps=8)]  # fmt: skip
    # the default shape with forced row splits (0 = automatic: 16 / 2 / 1 at G = 1 / 8 / 64)
    return shapes + [dataclasses.replace(d, splits=s) for s in (1, 2, 4, 8, 16)]


def udb_sweep() -> list[dict]:
    """gmm_tgmm (u and dB from one pass over dy) alone, for a few (block_t, block_n, warps,
    stages, splits), against the two kernels it replaces (gmm with trans for u, tgmm for dB,
    DEFAULT_CONFIG's shapes): device time per call from the profiler, kernels and the XLA sums
    and masks that come with them; and each one's u and dB against the two kernels'."""
    T, D, R = (4096, 4096, 16) if not SMOKE else (128, 128, 16)
    lcfg = lg.DEFAULT_CONFIG
    rows = []
    for G in (1, 8, 64) if not SMOKE else (1, 3):
        _, _, _, b, gs, sc, dy = operands(G, T, D, R)
        m = jax.jit(lambda gs, sc: lora.group_meta(gs, sc, None, T, R))(gs, sc)
        s = jax.random.normal(jax.random.key(11), (T, R), jnp.float32)
        sp = jnp.where(lora.live_mask(m, R), s * lora.row_scale(m)[:, None], 0.0).astype(dy.dtype)

        def two(dy, b, sp, m):
            u = lg.gmm(dy, b, m, True, jnp.float32, cfg=lcfg.shrink_t, interpret=SMOKE)
            u = jnp.where(lora.live_mask(m, R), u, 0.0)
            return u, lg.tgmm(sp, dy, m, G, b.dtype, cfg=lcfg.tgmm, interpret=SMOKE)

        cases = {"two kernels (gmm_t + tgmm)": jax.jit(two)}
        for c in _udb_configs():
            label = (f"udb t{c.block_t} n{c.block_n} w{c.num_warps} st{c.num_stages} "
                     f"S{c.splits or 'auto'}")  # fmt: skip
            cases[label] = jax.jit(lambda dy, b, sp, m, c=c: lg.gmm_tgmm(
                dy, b, sp, m, b.dtype, cfg=c, interpret=SMOKE))  # fmt: skip
        args = (dy, b, sp, m)
        ref = None
        for name, fn in cases.items():
            try:
                got = fn(*args)
                ref = got if ref is None else ref
                err = {"u": _rel(got[0], ref[0]), "db": _rel(got[1], ref[1])}
                k = device_breakdown(fn, args)
            except Exception as e:  # a shape that does not compile is reported, not fatal
                say(f"udb G={G} {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
                rows.append({"G": G, "case": name, "error": f"{type(e).__name__}: {e}"[:2000]})
                continue
            total = sum(k.values())
            lora_us = sum(v for n, v in k.items() if "lora_" in n)
            row = {"G": G, "case": name, "device_us": total, "lora_kernels_us": lora_us,
                   "rel_err_vs_two": err, "kernels": k}  # fmt: skip
            rows.append(row)
            top = sorted(k.items(), key=lambda kv: -kv[1])
            say(f"udb G={G:3d} {name:30s} device {total:6.1f} us (lora kernels {lora_us:6.1f}) "
                f"err u {err['u']:.1e} dB {err['db']:.1e} | "
                + ", ".join(f"{n[:32]} {v:.1f}" for n, v in top[:4]))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------- sweep


def sweep(bw: float) -> dict:
    """Each kernel alone at G = 1 and 64 over a few block shapes."""
    T, D, R = (4096, 4096, 16) if not SMOKE else (64, 32, 16)
    K = lg.KernelConfig
    fwd_cfgs = [K(16, 64, 128), K(32, 64, 128), K(32, 128, 256, num_warps=8), K(64, 64, 128),
                K(16, 128, 64, num_stages=4)]  # fmt: skip
    shrink_cfgs = [K(16, 64), K(32, 128), K(64, 64), K(64, 128, num_warps=8)]
    expand_cfgs = [K(32, 16, 128), K(64, 16, 256, num_warps=8), K(128, 16, 128),
                   K(128, 16, 256, num_warps=8)]  # fmt: skip
    tgmm_cfgs = [K(64, 64, 64), K(128, 64, 64), K(64, 128, 64, num_warps=8), K(32, 32, 32)]
    out: dict = {}
    timings: dict = {}  # kind -> config -> [us at each G]
    for G in (64, 1) if not SMOKE else (2,):
        few = G == 1  # at G = 1 only the fused forward and the tgmm (row splits) are timed
        x, _, a, b, gs, sc, dy = operands(G, T, D, R)
        m = lora.group_meta(gs, sc, None, T, R)
        vmap_ = lambda c: lg.visit_map(m, T, c.block_t)
        s = jax.random.normal(jax.random.key(3), (T, R), jnp.float32)
        sb = s.astype(x.dtype)
        # n calls in one jit, each on its own copy of the metadata (equal values XLA cannot see
        # through, so no call is merged), so the host's dispatch cost is paid once per n.
        n = 10 if not SMOKE else 1
        lim = jnp.stack([jnp.full((G,), T, jnp.int32)] * n)  # i32[n, G]

        def many(kernel):
            def f(lim, *args):
                return [kernel(m._replace(rank=jnp.minimum(m.rank, lim[i]),
                                          ends=jnp.minimum(m.ends, lim[i])), *args)
                        for i in range(n)]  # fmt: skip

            return jax.jit(f)

        K_ = {}
        cfgs = {}  # name -> config
        for c in fwd_cfgs:
            vm = vmap_(c)
            cfgs[f"fused {c}"] = c
            K_[f"fused {c}"] = (lambda m, x, a, b, c=c, vm=vm: lg._fwd(
                x, a, b, m, vm, c, True, SMOKE), (x, a, b))  # fmt: skip
        for c in [] if few else shrink_cfgs:
            vm = vmap_(c)
            cfgs[f"shrink {c}"] = c
            K_[f"shrink {c}"] = (lambda m, x, a, b, c=c, vm=vm: lg._fwd(
                x, a, b, m, vm, c, False, SMOKE)[0], (x, a, b))  # fmt: skip
            cfgs[f"shrink_t {c}"] = c
            K_[f"shrink_t {c}"] = (lambda m, dy, b, c=c, vm=vm: lg.gmm(
                dy, b, m, True, jnp.float32, cfg=c, vm=vm, interpret=SMOKE), (dy, b))  # fmt: skip
        for c in [] if few else expand_cfgs:
            vm = vmap_(c)
            kw = dict(k_is_rank=True, interpret=SMOKE, vm=vm)
            cfgs[f"expand {c}"] = c
            K_[f"expand {c}"] = (lambda m, s, b, c=c, kw=kw: lg.gmm(
                s, b, m, False, s.dtype, cfg=c, **kw), (sb, b))  # fmt: skip
            cfgs[f"expand_t {c}"] = c
            K_[f"expand_t {c}"] = (lambda m, s, a, c=c, kw=kw: lg.gmm(
                s, a, m, True, s.dtype, cfg=c, **kw), (sb, a))  # fmt: skip
        for c in tgmm_cfgs:
            cfgs[f"tgmm_a {c}"] = c
            K_[f"tgmm_a {c}"] = (lambda m, x, s, c=c: lg.tgmm(
                x, s, m, G, x.dtype, cfg=c, interpret=SMOKE), (x, sb))  # fmt: skip
            cfgs[f"tgmm_b {c}"] = c
            K_[f"tgmm_b {c}"] = (lambda m, s, dy, c=c: lg.tgmm(
                s, dy, m, G, s.dtype, cfg=c, interpret=SMOKE), (sb, dy))  # fmt: skip
        res = {}
        for name, (kern, args) in K_.items():
            try:
                t = timed({"k": many(kern)}, {"k": (lim, *args)}, reps=5, rounds=5)["k"]
                res[name] = t / n * 1e6
            except Exception as e:
                res[name] = f"{type(e).__name__}: {str(e)[:200]}"
            v = res[name]
            say(f"sweep G={G} {name}: {v if isinstance(v, str) else f'{v:.1f} us'}")
        out[f"G{G}"] = res
        for name in K_:
            timings.setdefault(name.split(" ")[0], {}).setdefault(cfgs[name], []).append(res[name])
        # bytes each kernel must move, for reading the sweep against the copy ceiling
        e = 2
        out[f"G{G}_floor_us"] = {
            "fused": (2 * T * D * e) / bw * 1e6, "shrink": T * D * e / bw * 1e6,
            "expand": T * D * e / bw * 1e6, "tgmm": T * D * e / bw * 1e6,
        }  # fmt: skip
    out["best"] = best_config(timings)
    say(f"sweep: best {out['best']}")
    return out


def best_config(timings: dict) -> lg.LoraGpuConfig:
    """The fastest shape of each kernel (summed over the G it was timed at and over the two
    uses of one config), and fused vs shrink + expand for the forward (compared at G=64, the
    one G where both were timed)."""

    def pick(*kinds):
        tot: dict = {}
        for k in kinds:
            for c, ts in timings.get(k, {}).items():
                if all(isinstance(t, float) for t in ts):
                    tot[c] = tot.get(c, 0.0) + sum(ts)
        return min(tot, key=tot.get) if tot else None

    d = lg.DEFAULT_CONFIG
    fused, shrink = pick("fused"), pick("shrink")
    expand, shrink_t, tg = pick("expand", "expand_t"), pick("shrink_t"), pick("tgmm_a", "tgmm_b")
    first = lambda kind, c: timings[kind][c][0] if c is not None else 1e30
    use_fused = shrink is None or expand is None or (
        first("fused", fused) <= first("shrink", shrink) + first("expand", expand))  # fmt: skip
    return lg.LoraGpuConfig(
        fwd=(fused if use_fused else shrink) or d.fwd,
        expand=expand or d.expand,
        shrink_t=shrink_t or d.shrink_t,
        tgmm=tg or d.tgmm,
        fused_fwd=bool(use_fused),
    )


def training_rows(args) -> list | None:
    path = os.path.join(ROOT, "scripts", "bench_finetune.py")
    if not os.path.exists(path):
        say("--training: scripts/bench_finetune.py does not exist yet; skipped")
        return None
    spec = importlib.util.spec_from_file_location("bench_finetune", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "training_benchmark"):
        say("--training: scripts/bench_finetune.py has no training_benchmark(); skipped")
        return None
    rows = mod.training_benchmark()
    for r in rows if isinstance(rows, list) else [rows]:
        say(f"training: {r}")
    return rows


def main() -> None:
    global SMOKE, ROUNDS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_lora.json")
    p.add_argument("--sweep", action="store_true", help="time kernel block shapes")
    p.add_argument("--training", action="store_true", help="add scripts/bench_finetune.py rows")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--variants", default="gpu,gpu_fused,gpu_base,gpu_fused_base,xla,ragged_dot,"
                   "gather_einsum")  # fmt: skip
    p.add_argument("--commit", default="", help="commit to record when the tree has no .git")
    p.add_argument("--no-alone", action="store_true", help="skip timing LoRA without the base")
    p.add_argument("--quick-check", action="store_true", help="correctness on the small shape")
    p.add_argument("--no-gemm", action="store_true", help="skip timing the fused kernel as a GEMM")
    p.add_argument("--components", action="store_true", help="time lora_linear's pieces alone")
    p.add_argument("--profile", action="store_true", help="per-kernel device time (profiler)")
    p.add_argument(
        "--udb-sweep",
        action="store_true",
        help="gmm_tgmm (u and dB in one pass) shapes vs the two kernels (profiler)",
    )
    p.add_argument("--rounds", type=int, default=7, help="timing rounds (median taken)")
    args = p.parse_args()
    SMOKE = args.smoke
    ROUNDS = args.rounds
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    commit = args.commit or commit or "unknown"  # a copy without .git (the GPU machine)
    dev = jax.devices()[0]
    say(f"device {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"commit {commit}")  # fmt: skip
    result: dict = {
        "date": datetime.date.today().isoformat(), "device": dev.device_kind,
        "jax": jax.__version__, "commit": commit, "default_config": repr(lg.DEFAULT_CONFIG),
    }  # fmt: skip

    def save():
        result["log"] = LOG
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    config = lg.DEFAULT_CONFIG
    steps = [("ceilings", ceilings)]
    if not args.no_check:
        steps.append(("correctness", lambda: correctness(config, args.quick_check)))
        steps.append(("fused_check", fused_check))
    if not args.no_gemm:
        steps.append(("gemm", gemm_section))
    if args.components:
        steps.append(("components", components))
    if args.profile:
        steps.append(("profile", profile_section))
    if args.udb_sweep:
        steps.append(("udb_sweep", udb_sweep))
    for name, fn in steps:
        try:
            result[name] = fn()
        except Exception:
            result[name] = traceback.format_exc()
            say(f"{name} FAILED:\n{result[name]}")
        save()
    bw = result["ceilings"]["copy_tb_s"] * 1e12 if isinstance(result["ceilings"], dict) else 3e12
    tuned = None
    if args.sweep:
        try:
            result["sweep"] = sweep(bw)
            tuned = result["sweep"]["best"]
        except Exception:
            result["sweep"] = traceback.format_exc()
            say(f"sweep FAILED:\n{result['sweep']}")
        save()
    all_variants = {
        "gpu": op_gpu(config),
        "gpu_fused": op_gpu(lg.FUSED_CONFIG),
        "gpu_base": WithBase(config),
        "gpu_fused_base": WithBase(lg.FUSED_CONFIG),
        "gpu_base_nosplit": WithBase(
            dataclasses.replace(
                config,
                fwd=dataclasses.replace(config.fwd, splits=1),
                shrink_t=dataclasses.replace(config.shrink_t, splits=1),
            )
        ),
        "fused": Fused(SMOKE_GEMM if SMOKE else mm.DEFAULT_CONFIG),
        "fused_kernels": Fused(SMOKE_GEMM if SMOKE else mm.DEFAULT_CONFIG, small_ops="kernel"),
        "fused_xla": Fused(SMOKE_GEMM if SMOKE else mm.DEFAULT_CONFIG, small_ops="xla"),
        "fused_plan": Fused(SMOKE_GEMM if SMOKE else mm.DEFAULT_CONFIG, plan=True),
        "fused_plan_sep": Fused(
            SMOKE_GEMM if SMOKE else mm.DEFAULT_CONFIG, plan=True, lora_config=TWO_PASS
        ),
        "fused_plan_s4": Fused(
            SMOKE_GEMM if SMOKE else mm.GemmConfig(stages=4, epi_slots=1, visit_buffers=1),
            plan=True,
        ),
        "xla": op_xla,
        "ragged_dot": op_ragged_dot,
        "gather_einsum": op_gather_einsum,
    }
    variants = {k: all_variants[k] for k in args.variants.split(",") if k}
    if tuned is not None and tuned != config:
        variants = {"gpu_tuned": op_gpu(tuned), **variants}
    try:
        result["fusion"] = fusion_report(config)
    except Exception:
        result["fusion"] = traceback.format_exc()
        say(f"fusion report FAILED:\n{result['fusion']}")
    result["table"] = table(bw, variants, alone=not args.no_alone)
    save()
    if args.training:
        result["training"] = training_rows(args)
        save()
    say("summary: added time over the base matmul, forward | forward+backward (goal 10% | 20%)")
    for r in result["table"]:
        if "error" in r:
            say(f"  G={r['G']:3d} {r['variant']:14s} error")
            continue
        say(
            f"  G={r['G']:3d} {r['variant']:14s} {r['added_fwd_us']:8.1f} us "
            f"{r['added_fwd_pct']:5.1f}% | {r['added_fb_us']:8.1f} us {r['added_fb_pct']:5.1f}%"
        )
    save()


if __name__ == "__main__":
    main()
