"""Benchmark the weight-streaming matmul (rtpjax/kernels/skinny_matmul.py) against XLA on a GPU.

    python scripts/bench_skinny_matmul.py [--json bench_skinny_matmul.json] [--budget 90]
        [--ms 1,8,16,32,64] [--shapes qkv,o,gate_up,down,lm_head] [--no-chain] [--smoke]

y[M, N] = x[M, K] · w[N, K]ᵀ for Llama-3-8B's weights (bf16; lm_head with a float32 output):
qkv (6144, 4096), o (4096, 4096), gate_up (28672, 4096), down (4096, 14336), lm_head (128256, 4096).
For each shape and M: XLA's einsum (as the model writes it) and the kernel over a small grid of
configs (choose_config's pick first), each checked against XLA (max |diff| / max |XLA|) and
timed. Reported: time per product, weight bytes per second, and that as a fraction of the copy
bandwidth measured here (x + 1 on a 1 GiB array, read + write). Then the model sum (32 layers x 4
products + lm_head, from the per-product times) at M = 1 and 16, and a real 32-layer chain (the
four products per layer with distinct weights and light glue, M = 16) in one jit: XLA vs the kernel
with choose_config vs the kernel with the sweep's best config per shape.

Timing: each timed function runs the product on C weight copies (C x bytes >= 256 MiB, so the
50 MB L2 never holds the next call's weights) with a distinct x per copy (XLA's dot merger must
not fuse them); calls are dispatched back to back, mean per call over a round of >= 2 ms, median
of 5 rounds, divided by C. Variants of one (shape, M) are compiled in parallel threads.

--budget (seconds): past it, the remaining (shape, M) pairs time only XLA and choose_config's pick,
so that the whole run stays under two minutes. --smoke runs tiny shapes in Pallas interpret mode:
a CPU check of this script.
"""

# Shape letters: GEMM M, N, K (not the glossary's heads).
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import gc
import json
import math
import os
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from rtpjax.kernels import skinny_matmul as sm  # noqa: E402
from rtpjax.kernels import skinny_matmul_gpu as smg  # noqa: E402

KC = smg.KernelConfig
T0 = time.time()
LOG: list[str] = []
SMOKE = False
LAYERS = 32
# name: (N, K, output dtype)
SHAPES = {
    "qkv": (6144, 4096, jnp.bfloat16),
    "o": (4096, 4096, jnp.bfloat16),
    "gate_up": (28672, 4096, jnp.bfloat16),
    "down": (4096, 14336, jnp.bfloat16),
    "lm_head": (128256, 4096, jnp.float32),
}
SMOKE_SHAPES = {  # the same roles at D = 256, F = 384
    "qkv": (384, 256, jnp.bfloat16),
    "o": (256, 256, jnp.bfloat16),
    "gate_up": (768, 256, jnp.bfloat16),
    "down": (256, 384, jnp.bfloat16),
    "lm_head": (160, 256, jnp.float32),
}
LAYER_SHAPES = ("qkv", "o", "gate_up", "down")
MIN_BYTES = 256 << 20  # per timed call: five times the H100's 50 MB L2


def say(msg: str) -> None:
    line = f"[{time.time() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    LOG.append(line)


def timed(f, args, rounds: int = 5, min_round_s: float = 2e-3) -> float:
    """Seconds per call: dispatch-pipelined mean over a round, median over rounds."""
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    one = time.perf_counter() - t
    if SMOKE:
        return one
    reps = max(2, min(50, math.ceil(min_round_s / max(one, 1e-6))))
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            out = f(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) / reps)
    return float(np.median(samples))


def compile_all(fns: dict, args: dict, workers: int = 16) -> dict:
    """name -> compiled executable or the exception; lowering here, compiling in threads."""
    lowered, out = {}, {}
    for name, fn in fns.items():
        try:
            lowered[name] = jax.jit(fn).lower(*args[name])
        except Exception as e:  # a config the lowering rejects is a result, not a crash
            out[name] = e
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futs = {name: pool.submit(low.compile) for name, low in lowered.items()}
        for name, fut in futs.items():
            try:
                out[name] = fut.result()
            except Exception as e:  # e.g. Triton out of shared memory
                out[name] = e
    return out


# ---------------------------------------------------------------------------------- ceilings


def copy_bandwidth() -> float:
    """Bytes per second of a jitted x + 1 over a 1 GiB bf16 array (read + write)."""
    n = (1 << 20) if SMOKE else (1 << 29)
    a = jnp.ones((n,), jnp.bfloat16)
    f = jax.jit(lambda v: v + 1)
    t = timed(f, (a,))
    bw = 2 * n * 2 / t
    say(f"copy: {t * 1e3:.3f} ms per GiB pass, {bw / 1e12:.3f} TB/s (read + write)")
    return bw


# ---------------------------------------------------------------------------------- the sweep


def xla_op(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """The product as the model writes it (rtpjax/models/llama.py)."""
    if jnp.dtype(out_dtype) == jnp.dtype(x.dtype):
        return jnp.einsum("MK,NK->MN", x, w)
    return jnp.einsum("MK,NK->MN", x, w, preferred_element_type=out_dtype)


def kernel_op(cfg: smg.KernelConfig):
    def op(x, w, out_dtype):
        return sm.skinny_matmul(x, w, out_dtype=out_dtype, impl="gpu", config=cfg,
                                interpret=SMOKE)  # fmt: skip

    return op


def candidates(m: int, n: int, k: int, sms: int, itemsize: int = 2) -> list[smg.KernelConfig]:
    """choose_config's pick, then up to 11 neighbours: tile sizes, split counts, stages, forms.
    The order matters: later ones are cut first."""
    chosen = smg.choose_config(m, n, k, sms)
    out = [chosen]

    def add(form: str, bn: int, bk: int, split: int | None = None, scale: float = 1.0,
            warps: int = 4, stages: int = 4):  # fmt: skip
        if k % bk:
            return
        s = split or smg.auto_split(n, k, bn, bk, target=7 * sms // 4)
        s = max(1, int(s * scale))
        try:
            cfg = KC(bn, bk, s, warps, stages, form)
            smg.check_config(cfg, m, n, k)
        except ValueError:
            return
        if smg.pipeline_bytes(cfg, m, itemsize) > 200 << 10 or cfg in out:
            return
        out.append(cfg)

    add("wx", 64, 128)  # split-K family: 64 rows of w per program, K split to ~2 per SM
    add("wx", 64, 256, stages=3)
    add("wx", 128, 128, warps=8)
    add("wx", 32, 256, split=1)  # no split-K (no partial sum): thin row blocks instead
    add("wx", 32, 128, split=1, stages=6)
    add("xw", 32, 256, split=1)
    add("xw", 16, 256, split=1)
    if m == 1:
        add("gemv", 64, 128)
        add("gemv", 32, 256, stages=3)
    add("wx", chosen.block_n, chosen.block_k, split=2 * chosen.split_k, stages=chosen.num_stages)
    add("wx", chosen.block_n, chosen.block_k, split=chosen.split_k, stages=6)
    add("wx", chosen.block_n, chosen.block_k, split=chosen.split_k, stages=3)
    # M = 1 and 16 carry the goal and the model sums; the other M get fewer shapes (time budget).
    return out[: 12 if m in (1, 16) else 8]


@dataclasses.dataclass
class Row:
    shape: str
    m: int
    variant: str  # "xla" or a config tag
    us: float | None = None
    gbps: float | None = None
    frac_copy: float | None = None
    rel_err: float | None = None
    error: str | None = None
    config: dict | None = None


def sweep_shape(name: str, n: int, k: int, out_dtype, ms: list[int], bw: float, sms: int,
                deadline: float) -> list[Row]:  # fmt: skip
    """All rows of one weight shape: XLA and the kernel candidates for each M."""
    wbytes = n * k * 2
    copies = 2 if SMOKE else max(2, math.ceil(MIN_BYTES / wbytes))
    keys = jax.random.split(jax.random.key(n * 7 + k), copies + 1)
    gen = jax.jit(lambda kk: (jax.random.normal(kk, (n, k), jnp.float32) / math.sqrt(k))
                  .astype(jnp.bfloat16), )  # fmt: skip
    ws = tuple(gen(kk) for kk in keys[:copies])
    rows: list[Row] = []
    for m in ms:
        xs = tuple(
            jax.random.normal(jax.random.fold_in(keys[-1], c * 1000 + m), (m, k), jnp.bfloat16)
            for c in range(copies)
        )
        late = time.time() > deadline
        cands = [smg.choose_config(m, n, k, sms)] if late else candidates(m, n, k, sms)
        fns = {"xla": lambda xs, ws: tuple(xla_op(x, w, out_dtype) for x, w in zip(xs, ws))}
        for cfg in cands:
            op = kernel_op(cfg)
            fns[cfg.tag] = lambda xs, ws, op=op: tuple(op(x, w, out_dtype) for x, w in zip(xs, ws))
        compiled = compile_all(fns, {key: (xs, ws) for key in fns})
        ref = None
        for key in fns:  # "xla" first: the others are checked against it
            exe = compiled[key]
            cfg = next((c for c in cands if c.tag == key), None)
            row = Row(name, m, key, config=dataclasses.asdict(cfg) if cfg else None)
            rows.append(row)
            if isinstance(exe, Exception):
                row.error = f"{type(exe).__name__}: {str(exe).splitlines()[0][:200]}"
                say(f"{name} M={m} {key}: {row.error}")
                continue
            try:
                y0 = exe(xs, ws)[0].astype(jnp.float32)
                if ref is None:
                    ref = y0
                denom = jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30)
                row.rel_err = float(jnp.max(jnp.abs(y0 - ref)) / denom)
                t = timed(exe, (xs, ws)) / copies
            except Exception as e:
                row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                say(f"{name} M={m} {key}: {row.error}")
                continue
            row.us = t * 1e6
            row.gbps = wbytes / t / 1e9
            row.frac_copy = wbytes / t / bw
        best = _best(rows, name, m)
        xla = next(r for r in rows if r.shape == name and r.m == m and r.variant == "xla")
        say(f"{name} M={m}: xla {_fmt(xla)}; best {best.variant if best else '-'} "
            f"{_fmt(best)}{' (late: choose_config only)' if late else ''}")  # fmt: skip
    del ws
    return rows


def _fmt(r: Row | None) -> str:
    if r is None or r.us is None:
        return "-"
    return f"{r.us:.1f} us {r.gbps:.0f} GB/s ({100 * r.frac_copy:.0f}%)"


def _ok(r: Row) -> bool:
    return r.us is not None and r.rel_err is not None and r.rel_err < 2e-2


def _best(rows: list[Row], name: str, m: int) -> Row | None:
    ks = [r for r in rows if r.shape == name and r.m == m and r.variant != "xla" and _ok(r)]
    return min(ks, key=lambda r: r.us) if ks else None


def _find(rows: list[Row], name: str, m: int, variant: str) -> Row | None:
    return next((r for r in rows if r.shape == name and r.m == m and r.variant == variant), None)


# --------------------------------------------------------------------------- model sum, chain


def model_sum(rows: list[Row], shapes: dict, m: int, bw: float, sms: int) -> dict | None:
    """32 layers x (qkv + o + gate_up + down) + lm_head from the per-product times."""
    if any(_find(rows, s, m, "xla") is None for s in shapes):
        return None
    res = {"m": m}
    for label in ("xla", "chosen", "best"):
        total = 0.0
        for s, (n, k, _) in shapes.items():
            if label == "xla":
                r = _find(rows, s, m, "xla")
            elif label == "chosen":
                r = _find(rows, s, m, smg.choose_config(m, n, k, sms).tag)
            else:
                r = _best(rows, s, m)
            if r is None or r.us is None:
                total = float("nan")
                break
            total += (LAYERS if s in LAYER_SHAPES else 1) * r.us
        res[f"{label}_ms"] = total / 1e3
    nbytes = sum(
        (LAYERS if s in LAYER_SHAPES else 1) * n * k * 2 for s, (n, k, _) in shapes.items()
    )
    res["weight_gb"] = nbytes / 1e9
    res["floor_ms"] = nbytes / bw * 1e3
    return res


def chain(shapes: dict, rows: list[Row], m: int, bw: float, sms: int) -> dict:
    """32 layers of the four products with distinct weights and light glue, in one jit."""
    (nq, d, _), (no, ko, _), (ngu, _, _), (nd, kd, _) = (shapes[s] for s in LAYER_SHAPES)
    layers = 2 if SMOKE else LAYERS

    @jax.jit
    def gen(key):
        ks = jax.random.split(key, 4)
        return tuple(
            (jax.random.normal(kk, (n, k), jnp.float32) / math.sqrt(k)).astype(jnp.bfloat16)
            for kk, (n, k) in zip(ks, ((nq, d), (no, ko), (ngu, d), (nd, kd)))
        )

    weights = [gen(jax.random.key(100 + i)) for i in range(layers)]
    x = jax.random.normal(jax.random.key(1), (m, d), jnp.bfloat16)

    def step(mm):
        def f(x, weights):
            for w_qkv, w_o, w_gu, w_down in weights:
                h = x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1,
                                               keepdims=True) + 1e-6).astype(x.dtype)  # fmt: skip
                qkv = mm("qkv", h, w_qkv)  # [M, Nq]
                x = x + mm("o", qkv[:, :ko], w_o)
                h = x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1,
                                               keepdims=True) + 1e-6).astype(x.dtype)  # fmt: skip
                gu = mm("gate_up", h, w_gu)  # [M, 2F]
                act = jax.nn.silu(gu[:, : ngu // 2]) * gu[:, ngu // 2 :]
                x = x + mm("down", act, w_down)
            return x

        return f

    def by_config(pick):
        def mm(s, a, w):
            return kernel_op(pick(s))(a, w, a.dtype)

        return mm

    def chosen(s):
        n, k, _ = shapes[s]
        return smg.choose_config(m, n, k, sms)

    def best(s):
        r = _best(rows, s, m)
        return smg.KernelConfig(**r.config) if r is not None else chosen(s)

    fns = {
        "xla": step(lambda s, a, w: xla_op(a, w, a.dtype)),
        "kernel_chosen": step(by_config(chosen)),
        "kernel_best": step(by_config(best)),
    }
    compiled = compile_all(fns, {key: (x, weights) for key in fns}, workers=3)
    nbytes = layers * 2 * (nq * d + no * ko + ngu * d + nd * kd)
    res: dict = {"m": m, "layers": layers, "weight_gb": nbytes / 1e9,
                 "floor_ms": nbytes / bw * 1e3,
                 "best_configs": {s: best(s).tag for s in LAYER_SHAPES}}  # fmt: skip
    ref = None
    for key in fns:
        exe = compiled[key]
        if isinstance(exe, Exception):
            res[key] = f"{type(exe).__name__}: {str(exe).splitlines()[0][:200]}"
            say(f"chain {key}: {res[key]}")
            continue
        y = exe(x, weights).astype(jnp.float32)
        ref = y if ref is None else ref
        err = float(jnp.max(jnp.abs(y - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))
        t = timed(exe, (x, weights))
        res[key] = {"ms": t * 1e3, "frac_floor": nbytes / bw / t, "rel_err_vs_xla": err}
        say(f"chain M={m} {key}: {t * 1e3:.3f} ms ({100 * nbytes / bw / t:.0f}% of the "
            f"{nbytes / bw * 1e3:.3f} ms copy floor), rel err vs xla {err:.1e}")  # fmt: skip
    del weights
    return res


# ------------------------------------------------------------------------------------ report


def report(rows: list[Row], shapes: dict, ms: list[int], sums: list[dict], ch: dict | None,
           bw: float, sms: int) -> None:  # fmt: skip
    print("\n== per product: time, weight GB/s, % of copy bandwidth "
          f"({bw / 1e12:.2f} TB/s) ==")  # fmt: skip
    hdr = (f"{'shape':8} {'M':>3} | {'xla us':>8} {'%':>4} | {'chosen us':>9} {'%':>4} | "
           f"{'best us':>8} {'%':>4} {'x xla':>6} {'err':>7} | best config")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for s, (n, k, _) in shapes.items():
        for m in ms:
            x = _find(rows, s, m, "xla")
            c = _find(rows, s, m, smg.choose_config(m, n, k, sms).tag)
            b = _best(rows, s, m)
            if x is None:
                continue

            def cell(r, width):
                if r is None or r.us is None:
                    return f"{'-':>{width}} {'-':>4}"
                return f"{r.us:>{width}.1f} {100 * r.frac_copy:>4.0f}"

            speed = f"{x.us / b.us:>6.2f}" if b and x.us else f"{'-':>6}"
            err = f"{b.rel_err:>7.1e}" if b else f"{'-':>7}"
            print(f"{s:8} {m:>3} | {cell(x, 8)} | {cell(c, 9)} | {cell(b, 8)} {speed} {err} | "
                  f"{b.variant if b else '-'}")  # fmt: skip
    bad = [r for r in rows if r.variant != "xla" and r.rel_err is not None and r.rel_err >= 2e-2]
    errs = [r for r in rows if r.error]
    print(f"\nconfigs over the 2e-2 error bar: {len(bad)}; configs that failed: {len(errs)}")
    for r in bad:
        print(f"  WRONG {r.shape} M={r.m} {r.variant}: rel err {r.rel_err:.2e}")
    for r in errs:
        print(f"  FAILED {r.shape} M={r.m} {r.variant}: {r.error}")
    for su in sums:
        print(f"\nmodel sum M={su['m']} ({LAYERS} layers x 4 products + lm_head, "
              f"{su['weight_gb']:.2f} GB): xla {su['xla_ms']:.3f} ms, kernel chosen "
              f"{su['chosen_ms']:.3f} ms, kernel best {su['best_ms']:.3f} ms; copy floor "
              f"{su['floor_ms']:.3f} ms")  # fmt: skip
    if ch:
        print(f"\nchain M={ch['m']}, {ch['layers']} layers ({ch['weight_gb']:.2f} GB, copy floor "
              f"{ch['floor_ms']:.3f} ms):")  # fmt: skip
        for key in ("xla", "kernel_chosen", "kernel_best"):
            v = ch.get(key)
            if isinstance(v, dict):
                print(f"  {key:14} {v['ms']:.3f} ms ({100 * v['frac_floor']:.0f}% of floor), "
                      f"rel err vs xla {v['rel_err_vs_xla']:.1e}")  # fmt: skip
            else:
                print(f"  {key:14} {v}")
        print(f"  best configs: {ch['best_configs']}")


def main() -> None:
    global SMOKE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="bench_skinny_matmul.json", help="results file")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds after which only choose_config is swept")  # fmt: skip
    p.add_argument("--ms", default="1,8,16,32,64")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--chain-m", type=int, default=16)
    p.add_argument("--no-chain", action="store_true")
    p.add_argument("--commit", default="", help="commit to record when the tree has no .git")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    args = p.parse_args()
    SMOKE = args.smoke
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    commit = args.commit or commit or "unknown"
    dev = jax.devices()[0]
    sms = int(getattr(dev, "core_count", 0) or smg.NUM_SMS)
    say(f"device {dev.device_kind} ({jax.default_backend()}, {sms} SMs), jax {jax.__version__}, "
        f"commit {commit}")  # fmt: skip
    table = SMOKE_SHAPES if SMOKE else SHAPES
    shapes = {s: table[s] for s in args.shapes.split(",")}
    ms = [int(v) for v in args.ms.split(",")]
    result: dict = {
        "date": datetime.date.today().isoformat(),
        "device": dev.device_kind,
        "sms": sms,
        "jax": jax.__version__,
        "commit": commit,
        "smoke": SMOKE,
    }

    def save():
        result["log"] = LOG
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)

    bw = copy_bandwidth()
    result["copy_tb_s"] = bw / 1e12
    deadline = T0 + args.budget
    rows: list[Row] = []
    for s, (n, k, out_dtype) in shapes.items():
        try:
            rows += sweep_shape(s, n, k, out_dtype, ms, bw, sms, deadline)
        except Exception:
            say(f"{s} FAILED:\n{traceback.format_exc()}")
        gc.collect()
        result["rows"] = [dataclasses.asdict(r) for r in rows]
        save()
    result["best"] = {
        f"{s} M={m}": (b.variant if (b := _best(rows, s, m)) else None) for s in shapes for m in ms
    }
    sums = [su for m in (1, 16) if m in ms and (su := model_sum(rows, shapes, m, bw, sms))]
    result["model_sum"] = sums
    ch = None
    if not args.no_chain and all(s in shapes for s in LAYER_SHAPES):
        try:
            ch = chain(shapes, rows, args.chain_m, bw, sms)
        except Exception:
            ch = None
            result["chain_error"] = traceback.format_exc()
            say(f"chain FAILED:\n{result['chain_error']}")
        result["chain"] = ch
    say("done")
    save()
    report(rows, shapes, ms, sums, ch, bw, sms)


if __name__ == "__main__":
    main()
