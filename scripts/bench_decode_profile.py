"""Where a decode step's device time goes: per-kernel device time of the engine's real step.

    python scripts/bench_decode_profile.py --model llama3-8b --cases 1x1024,64x1024,1x8192

For each case BATCHxCONTEXT: add BATCH requests of CONTEXT random prompt tokens to an engine on
random weights of the preset, step until one step decodes all of them, then replay that prepared
step (`ModelRunner.execute`) `--repeats` times: once timed on the host, once under jax.profiler.
The trace is read back with `jax.profiler.ProfileData` and every GPU kernel's time summed per
step. Prints the wall time per step, the device time per step, the kernels grouped by kind and
the largest kernels with their count per step; `--out` writes the same as JSON, `--hlo-dir` each
step's compiled HLO (where the fusions in the profile are spelled out). On CPU there is no device
plane: the script runs (as a smoke test of the plumbing) and reports no kernels.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rtpjax import env

env.configure_xla()  # before jax starts: the serving XLA flags (loop graphs)

import jax  # noqa: E402

from scripts import bench_offline as bo  # noqa: E402
from scripts.device_profile import kernel_times  # noqa: E402

# Kernel kinds by name fragment, first match wins (XLA's fusion names say what they start from).
KINDS = ("ragged_paged_attention", "skinny_matmul", "nvjet", "gemm", "cutlass", "cudnn",
         "reduce", "fusion", "memcpy")  # fmt: skip


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k in KINDS if k in low), "other")


def profile_case(llm, batch: int, context: int, repeats: int, top: int, hlo_dir=None) -> dict:
    runner = llm.engine.runner
    prepared = bo._full_decode_step(llm, batch, context, "prof")
    if hlo_dir:  # the compiled step, to see what each fusion in the profile is
        os.makedirs(hlo_dir, exist_ok=True)
        path = os.path.join(hlo_dir, f"decode_b{batch}_ctx{context}.hlo.txt")
        with open(path, "w") as f:
            f.write(runner.lower(prepared).compile().as_text())

    def replay(_: int) -> None:
        runner.execute(prepared)
        jax.block_until_ready((runner.kv, runner.prev_sampled))

    for _ in range(3):
        runner.execute(prepared)
    jax.block_until_ready((runner.kv, runner.prev_sampled))
    t0 = time.perf_counter()
    for _ in range(repeats):
        runner.execute(prepared)
    jax.block_until_ready((runner.kv, runner.prev_sampled))
    wall_ms = (time.perf_counter() - t0) / repeats * 1e3
    us, count = kernel_times(replay, repeats)
    bo._drain(llm, batch, "prof")
    by_kind: dict[str, float] = collections.Counter()
    for name, v in us.items():
        by_kind[kind(name)] += v
    largest = sorted(us.items(), key=lambda kv: -kv[1])[:top]
    return {
        "batch": batch,
        "context": context,
        "wall_ms": wall_ms,
        "device_ms": sum(us.values()) / 1e3,
        "kernels_per_step": sum(count.values()),
        "by_kind_us": dict(by_kind),
        "largest": [{"name": n, "us": v, "per_step": count[n]} for n, v in largest],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3-8b", help="preset with random weights")
    ap.add_argument("--cases", default="1x1024,64x1024,1x8192", help="BATCHxCONTEXT,...")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--top", type=int, default=20, help="largest kernels to list")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--kv-cache-memory-fraction", type=float, default=0.5)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--hlo-dir", default=None, help="write each case's compiled HLO here")
    args = ap.parse_args(argv)
    try:
        cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",") if c]
        if any(len(c) != 2 or min(c) < 1 for c in cases):
            raise ValueError
    except ValueError:
        ap.error(f"--cases={args.cases!r} must be BATCHxCONTEXT pairs like 1x1024,64x1024")
    longest = max(ctx for _, ctx in cases)
    ns = argparse.Namespace(
        model="random:" + args.model,
        max_model_len=args.max_model_len or longest + 512,
        max_num_seqs=max(b for b, _ in cases),
        max_num_batched_tokens=2048,
        dtype="auto",
        tensor_parallel_size=1,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        num_scheduler_steps=1,
        cudnn_prefill=False,
    )
    llm = bo.build(ns)
    results = []
    for batch, context in cases:
        r = profile_case(llm, batch, context, args.repeats, args.top, args.hlo_dir)
        results.append(r)
        print(
            f"== batch {batch} x context {context}: wall {r['wall_ms']:.3f} ms/step, device "
            f"{r['device_ms']:.3f} ms/step in {r['kernels_per_step']:.0f} kernels",
            flush=True,
        )
        kinds = sorted(r["by_kind_us"].items(), key=lambda kv: -kv[1])
        print("   by kind (µs/step): " + ", ".join(f"{k} {v:.0f}" for k, v in kinds))
        for k in r["largest"]:
            print(f"   {k['us']:9.1f} µs  x{k['per_step']:5.1f}  {k['name'][:100]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": bo.env_info(), "model": args.model, "cases": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
