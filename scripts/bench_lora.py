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
- with --profile, per-kernel device time of lora_linear (fused_plan: the shrink as its own
  kernel; in_gemm: inside the GEMM's launch, lora_matmul_shrink_mgpu); with --udb-sweep,
  gmm_tgmm's shapes alone against the two kernels it replaces, G = 1, 8, 64 (device time from
  the profiler);
- with --training, the rows of training_benchmark() from scripts/bench_finetune.py (skipped with a
  message when that script does not exist yet).
--smoke runs everything on tiny shapes in Pallas interpret mode: a CPU check of this script.

Timing: `reps` calls dispatched back to back, then one block_until_ready: the mean per call; median
of `rounds` such runs, base and LoRA interleaved round by round so that drift hits both.
"""

# This file is the driver (CLI) and the timing tables; the shared helpers and the flags the driver
# sets (SMOKE, ROUNDS) live in lora_bench_common.py, the correctness checks in
# lora_bench_checks.py, the tuning sweeps in lora_bench_sweeps.py.
# Shape letters follow docs/glossary.md (I, O: LoRA in/out features). The closures made in loops
# are jitted and run within the same iteration, so late binding (B023) cannot bite.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from rtpjax.kernels import lora  # noqa: E402
from rtpjax.kernels import lora_gpu as lg  # noqa: E402
from rtpjax.kernels import lora_linear as ll  # noqa: E402
from rtpjax.kernels import lora_matmul_mgpu as mm  # noqa: E402
from scripts import lora_bench_common as common  # noqa: E402
from scripts.lora_bench_checks import correctness, fused_check  # noqa: E402
from scripts.lora_bench_common import (  # noqa: E402
    LOG,
    SMOKE_GEMM,
    SMOKE_GEMM_M,
    TWO_PASS,
    Fused,
    WithBase,
    _layer,
    _rel,
    base_fns,
    ceilings,
    device_breakdown,
    fb_fn,
    fwd_fn,
    op_gather_einsum,
    op_gpu,
    op_ragged_dot,
    op_xla,
    operands,
    say,
    timed,
)
from scripts.lora_bench_sweeps import sweep, udb_sweep  # noqa: E402

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
    T, D, R = (4096, 4096, 16) if not common.SMOKE else (128, 128, 16)
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
    T, D, R, G = (4096, 4096, 16, 8) if not common.SMOKE else (64, 32, 16, 2)
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
    D = 4096 if not common.SMOKE else 128
    k = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(k[0], (D, D), jnp.bfloat16)
    W = (jax.random.normal(k[1], (D, D), jnp.float32) / np.sqrt(D)).astype(jnp.bfloat16)
    configs = GEMM_CONFIGS if not common.SMOKE else {"smoke": SMOKE_GEMM}
    fns = {"xla": jax.jit(lambda x, W: x @ W), "xla_t": jax.jit(lambda x, W: x @ W.T)}
    for name, cfg in configs.items():
        for tw in (False, True):
            plain = lambda x, W, cfg=cfg, tw=tw: mm.matmul_expand(
                x, W, None, None, None, None, transpose_w=tw, cfg=cfg, interpret=common.SMOKE
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


def components() -> list[dict]:
    """Each piece of lora_linear's fused path timed alone (T = D = 4096, rank 16), to see where
    the added time goes: the shrink and u (grouped kernel vs dense XLA), the grads of A and B,
    the visit bookkeeping, and the fused GEMM with its visits against the same kernel without."""
    T, D, R = (4096, 4096, 16) if not common.SMOKE else (128, 128, 16)
    cfg = SMOKE_GEMM if common.SMOKE else mm.DEFAULT_CONFIG
    lcfg = lg.DEFAULT_CONFIG
    rows = []
    for G in (1, 8, 64):
        x, W, a, b, gs, sc, dy = operands(G, T, D, R)
        m = lora.group_meta(gs, sc, None, T, R)
        s = ll._shrink(x, a, m, False, "xla", None, common.SMOKE)
        h = (s * lora.row_scale(m)[:, None]).astype(x.dtype)
        vis = ll.visits(m, T, cfg.tile_m)
        hv = ll.visit_rows(h, m, vis, cfg.tile_m)
        kw = dict(cfg=cfg, interpret=common.SMOKE)
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
                    x, a, lora.group_meta(gs, sc, None, T, R), False, small, lcfg.fwd,
                    common.SMOKE), (x, a, gs, sc))  # fmt: skip
            fns[f"u {small}"] = (
                lambda dy, b, gs, sc, small=small: ll._shrink(
                    dy, b, lora.group_meta(gs, sc, None, T, R), True, small, lcfg.shrink_t,
                    common.SMOKE), (dy, b, gs, sc))  # fmt: skip
            fns[f"dA {small}"] = (
                lambda x, du, gs, sc, small=small: ll._per_slot(
                    x, du, lora.group_meta(gs, sc, None, T, R), G, x.dtype, small, lcfg.tgmm,
                    common.SMOKE), (x, h, gs, sc))  # fmt: skip
        jitted = {k: jax.jit(f) for k, (f, _) in fns.items()}
        t = timed(jitted, {k: a_ for k, (_, a_) in fns.items()})
        for k, sec in t.items():
            rows.append({"G": G, "piece": k, "us": sec * 1e6})
            say(f"component G={G:3d} {k:32s} {sec * 1e6:8.1f} us")
    return rows


def profile_section(rounds: int = 3) -> list[dict]:
    """Per-kernel device time of lora_linear's fused path, forward and forward+backward, beside
    the base matmul alone (G = 1, 8, 64; T = D = 4096, rank 16). Each case is traced `rounds`
    times, the cases interleaved (base, layer, base, ...), and the trace with the median total
    is kept: the in-GEMM kernel's time moves by several µs between traces (its first tiles wait
    on the shrink)."""
    T, D, R = (4096, 4096, 16) if not common.SMOKE else (128, 128, 16)
    cfg = SMOKE_GEMM if common.SMOKE else mm.DEFAULT_CONFIG
    rows = []
    base_f, base_fb = base_fns()
    for G in (1, 8, 64) if not common.SMOKE else (8,):
        ops = operands(G, T, D, R)
        cases = {"base fwd": base_f, "base fwd+bwd": base_fb}
        # fused_plan: the shrink as its own kernel (grouped kernels, the visit GEMM); in_gemm:
        # the shrink inside the GEMM's launch (the groups here are multiples of 64 rows).
        variants = {"fused_plan": Fused(cfg, plan=True, small_ops="kernel"),
                    "in_gemm": Fused(SMOKE_GEMM_M if common.SMOKE else cfg, plan=True,
                                     small_ops="in_gemm", one_slot=True)}  # fmt: skip
        for name, op in variants.items():
            op.prepare(T, R, ops[4])
            cases[f"{name} fwd"] = fwd_fn(op, True)
            cases[f"{name} fwd+bwd"] = fb_fn(op, True)
        traces = {name: [] for name in cases}
        for _ in range(1 if common.SMOKE else rounds):
            for name, fn in cases.items():
                traces[name].append(device_breakdown(fn, ops))
        for name, ks in traces.items():
            totals = sorted(sum(k.values()) for k in ks)
            k = min(ks, key=lambda k: abs(sum(k.values()) - totals[len(totals) // 2]))
            total = sum(k.values())
            rows.append({"G": G, "case": name, "device_us": total, "kernels": k,
                         "device_us_traces": totals})  # fmt: skip
            top = sorted(k.items(), key=lambda kv: -kv[1])
            say(f"profile G={G:3d} {name:22s} device {total:7.1f} us (traces "
                + "/".join(f"{t:.1f}" for t in totals) + f") in {len(k)} kernels: "
                + ", ".join(f"{n[:40]} {v:.1f}" for n, v in top[:12]))  # fmt: skip
    return rows


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
    p.add_argument("--profile-rounds", type=int, default=3,
                   help="traces per profiled case; the median is kept")  # fmt: skip
    p.add_argument(
        "--udb-sweep",
        action="store_true",
        help="gmm_tgmm (u and dB in one pass) shapes vs the two kernels (profiler)",
    )
    p.add_argument("--rounds", type=int, default=7, help="timing rounds (median taken)")
    args = p.parse_args()
    common.SMOKE = args.smoke
    common.ROUNDS = args.rounds
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    # A copy without .git (the GPU machine): --commit or RTPJAX_COMMIT, as the other benchmarks.
    commit = args.commit or os.environ.get("RTPJAX_COMMIT") or commit or "unknown"
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
    gemm = SMOKE_GEMM if common.SMOKE else mm.DEFAULT_CONFIG
    steps = [("ceilings", ceilings)]
    if not args.no_check:
        steps.append(("correctness", lambda: correctness(config, args.quick_check)))
        steps.append(("fused_check", fused_check))
    if not args.no_gemm:
        steps.append(("gemm", gemm_section))
    if args.components:
        steps.append(("components", components))
    if args.profile:
        steps.append(("profile", lambda: profile_section(args.profile_rounds)))
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
        "fused": Fused(gemm),
        "fused_kernels": Fused(gemm, small_ops="kernel"),
        "fused_xla": Fused(gemm, small_ops="xla"),
        "fused_plan": Fused(gemm, plan=True),
        "fused_plan_sep": Fused(gemm, plan=True, lora_config=TWO_PASS),
        "fused_in_gemm": Fused(
            SMOKE_GEMM_M if common.SMOKE else gemm, plan=True, small_ops="in_gemm", one_slot=True
        ),
        "fused_plan_s4": Fused(
            SMOKE_GEMM if common.SMOKE else mm.GemmConfig(stages=4, epi_slots=1, visit_buffers=1),
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
