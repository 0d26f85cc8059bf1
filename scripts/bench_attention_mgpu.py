"""Benchmark the Mosaic GPU prefill kernel (ragged_paged_attention_mgpu) on an H100.

    python scripts/bench_attention_mgpu.py [--out bench_attention_mgpu.json] [--no-sweep]
                                           [--smoke]

For prefill of one sequence at 2k/4k/8k fresh tokens, a 2k chunk over 6k cached, 1k over 7k and
4 sequences x 512 over 1536 cached (Llama-3-8B attention: 32 query heads, 8 kv heads, head_dim
128, page_size 16, bf16, one layer): time per call (median of 5 runs of a jitted fori_loop of 10
chained calls, attention_bench_common.timed), TFLOP/s of the causal FLOPs actually needed
(4*N*H*sum of keys seen), the Triton-lowered paged kernel's figure and cuDNN's on the same work
(fresh: one causal call; over a prefix: a non-causal chunk x prefix call plus a causal chunk x
chunk call, on contiguous [B, S, K, H] inputs), the ratios, and the relative error against the
float32 reference. Then a correctness suite (GQA 1/4/8, head_dim 64/128, pages 16/64/128, f16,
window + soft cap, mixed batches; two tile shapes) and, unless --no-sweep, a few kernel configs
(block_m, block_s, stages, p_regs, pingpong) on two shapes. Every failure prints its traceback
and the run goes on. Tables last; JSON to --out.

--smoke: the same plumbing on CPU at tiny shapes, the kernel in Mosaic GPU interpret mode (P·V
through shared memory), XLA attention in place of cuDNN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

if "--smoke" in sys.argv:  # Mosaic GPU's interpreter can deadlock on one CPU device
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attention_bench_common as common
from attention_bench_common import LOG, attn_fn, check, make_problem, median_time, reference, say

from rtpjax.kernels import ragged_paged_attention_mgpu as mg

# (name, [(chunk, prefix) per sequence])
CASES = [
    ("2k fresh", [(2048, 0)]),
    ("4k fresh", [(4096, 0)]),
    ("8k fresh", [(8192, 0)]),
    ("2k over 6k", [(2048, 6144)]),
    ("1k over 7k", [(1024, 7168)]),
    ("4 x 512 over 1536", [(512, 1536)] * 4),
]
SMOKE_CASES = [("96 fresh", [(96, 0)]), ("2 x 40 over 50", [(40, 50)] * 2)]
SWEEP_CASES = ("4k fresh", "2k over 6k", "96 fresh")
SWEEP = [
    mg.MgpuConfig(block_m=64, block_s=128, stages=2),
    mg.MgpuConfig(block_m=64, block_s=128, stages=3),
    mg.MgpuConfig(block_m=64, block_s=64, stages=3),
    mg.MgpuConfig(block_m=64, block_s=64, stages=4),
    mg.MgpuConfig(block_m=64, block_s=128, stages=2, pingpong=False),
    mg.MgpuConfig(block_m=128, block_s=64, stages=2),
]
SMOKE_SWEEP = [mg.MgpuConfig(block_s=64, stages=3)]
# (name, q_lens, kv_lens, K, G, H, page_size, dtype, extra kwargs)
SUITE = [
    ("mixed G4 H128 ps16", [1, 37, 300, 513, 2], [700, 37, 1000, 600, 17], 8, 4, 128, 16,
     jnp.bfloat16, {}),
    ("mixed G1 H64 ps64", [7, 100, 1, 250], [7, 900, 3000, 333], 4, 1, 64, 64, jnp.bfloat16, {}),
    ("mixed G8 H128 ps128", [3, 250, 129], [3, 777, 2000], 2, 8, 128, 128, jnp.bfloat16, {}),
    ("f16 G2 H64 ps32", [64, 5, 200], [300, 200, 1500], 2, 2, 64, 32, jnp.float16, {}),
    ("window 256 + soft_cap 30", [200, 1, 33], [700, 50, 1200], 8, 4, 128, 16, jnp.bfloat16,
     dict(sliding_window=256, soft_cap=30.0)),
]  # fmt: skip
SMOKE_SUITE = [("smoke G4 H64 ps16 window", [30, 1], [77, 40], 1, 4, 64, 16, jnp.bfloat16,
                dict(sliding_window=50))]  # fmt: skip


def mgpu_fn(cfg, **kw):
    return lambda q, kv, kl, pt, cu, ns: mg.mgpu_ragged_paged_attention(
        q, kv, kl, pt, cu, ns, config=cfg, interpret=common.INTERPRET, **kw
    )


def cudnn_time(seqs, K, G, H, iters) -> float:
    """Seconds per call of cuDNN (XLA in --smoke) doing the same work on contiguous inputs."""
    impl = None if common.INTERPRET else "cudnn"
    n, (chunk, prefix) = len(seqs), seqs[0]
    key = jax.random.key(7)
    mk = lambda i, shape: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16)
    q, kc, vc = mk(0, (n, chunk, K * G, H)), mk(1, (n, chunk, K, H)), mk(2, (n, chunk, K, H))
    kp, vp = mk(3, (n, max(prefix, 1), K, H)), mk(4, (n, max(prefix, 1), K, H))

    @jax.jit
    def loop(q, kc, vc, kp, vp):
        def body(i, q):
            o = jax.nn.dot_product_attention(q, kc, vc, is_causal=True, implementation=impl)
            if prefix:
                o = o + jax.nn.dot_product_attention(q, kp, vp, implementation=impl)
            return q + o * jnp.zeros((), o.dtype)

        return lax.fori_loop(0, iters, body, q)

    return median_time(loop, q, kc, vc, kp, vp) / iters


def prefill_section(cases, results, sweep: bool, configs=()) -> None:
    smoke = common.INTERPRET
    K, G, H = (2, 2, 64) if smoke else (8, 4, 128)
    iters = 2 if smoke else 10
    kw = dict(sm_scale=H**-0.5)
    rng = np.random.default_rng(0)
    for name, seqs in cases:
        chunks, kv_lens = [c for c, _ in seqs], [c + p for c, p in seqs]
        flops = 4 * K * G * H * sum(c * p + c * (c + 1) / 2 for c, p in seqs)
        row = dict(case=name, seqs=len(seqs), chunk=chunks[0], prefix=seqs[0][1], flops=flops)
        say(f"{name}")
        try:
            pr = make_problem(rng, chunks, kv_lens, K=K, G=G, H=H, page_size=16)
            ref = reference(pr, **kw)
        except Exception:
            traceback.print_exc()
            row["error"] = "problem or reference failed"
            results["prefill"].append(row)
            continue
        try:
            t = common.timed(pr, attn_fn("gpu", None, max_q_len=max(chunks), **kw), iters)
            row.update(triton_us=t * 1e6, triton_tflops=flops / t / 1e12)
        except Exception as e:
            traceback.print_exc()
            row["triton_error"] = repr(e)[:300]
        try:
            t = cudnn_time(seqs, K, G, H, iters)
            row.update(cudnn_us=t * 1e6, cudnn_tflops=flops / t / 1e12)
        except Exception as e:
            traceback.print_exc()
            row["cudnn_error"] = repr(e)[:300]
        cfgs = configs if sweep else [None]
        for cfg in cfgs:
            r = dict(row, config=str(cfg or mg.choose_config(sum(chunks), H)))
            try:
                fn = mgpu_fn(cfg, **kw)
                r["rel_err"] = check(pr, fn, ref, **kw)
                t = common.timed(pr, fn, iters)
                r.update(time_us=t * 1e6, tflops=flops / t / 1e12)
                for other in ("cudnn", "triton"):
                    if f"{other}_us" in r:
                        r[f"vs_{other}"] = r[f"{other}_us"] / r["time_us"]
                say(f"  mgpu {r['time_us']:9.1f} us {r['tflops']:6.1f} TFLOP/s"
                    f"  cuDNN {r.get('cudnn_tflops', float('nan')):6.1f}"
                    f"  triton {r.get('triton_tflops', float('nan')):6.1f}"
                    f"  vs cuDNN {r.get('vs_cudnn', float('nan')):.2f}"
                    f"  err {r['rel_err']:.1e}  {r['config']}")  # fmt: skip
            except Exception as e:
                traceback.print_exc()
                r["error"] = repr(e)[:300]
                say(f"  mgpu ERROR {r['config']}: {e!r}"[:400])
            results["prefill_sweep" if cfg is not None else "prefill"].append(r)
        del pr, ref


def correctness_suite(results, suite) -> None:
    say("correctness suite (mgpu kernel vs reference)")
    rng = np.random.default_rng(1)
    # On the GPU P·V takes P from registers (p_regs=False deadlocked on the H100); the
    # interpreter runs the shared-memory form whatever the config says.
    cfgs = [None, mg.MgpuConfig(block_s=64, stages=3)]
    if common.INTERPRET:
        cfgs = cfgs[1:]
    for name, q_lens, kv_lens, K, G, H, ps, dtype, extra in suite:
        kw = dict(sm_scale=H**-0.5, **extra)
        try:
            pr = make_problem(rng, q_lens, kv_lens, K=K, G=G, H=H, page_size=ps, dtype=dtype,
                              B=len(q_lens) + 2, T=sum(q_lens) + 7)  # fmt: skip
            ref = reference(pr, **kw)
        except Exception:
            traceback.print_exc()
            continue
        for cfg in cfgs:
            r = dict(name=name, config=str(cfg or mg.DEFAULT_CONFIG))
            try:
                r["rel_err"] = check(pr, mgpu_fn(cfg, **kw), ref, **kw)
                r["ok"] = bool(r["rel_err"] < (2e-2 if dtype == jnp.bfloat16 else 5e-3))
                say(f"  {name:<28} err {r['rel_err']:.1e} {'ok' if r['ok'] else 'FAIL'}"
                    f"  {r['config']}")  # fmt: skip
            except Exception as e:
                traceback.print_exc()
                r.update(ok=False, error=repr(e)[:300])
                say(f"  {name} ERROR {e!r}"[:400])
            results["correctness"].append(r)


def print_tables(results) -> None:
    f = lambda r, k, fmt: format(r[k], fmt) if k in r else "-"
    print("\nprefill, TFLOP/s of causal FLOPs needed (time per call)")
    print("| case | mgpu | Triton | cuDNN | vs cuDNN | vs Triton | rel. error | config |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results["prefill"] + results["prefill_sweep"]:
        mine = f"{f(r, 'tflops', '.1f')} ({f(r, 'time_us', '.0f')} us)"
        print(f"| {r['case']} | {mine} | {f(r, 'triton_tflops', '.1f')} |"
              f" {f(r, 'cudnn_tflops', '.1f')} | {f(r, 'vs_cudnn', '.2f')} |"
              f" {f(r, 'vs_triton', '.2f')} | {f(r, 'rel_err', '.1e')} |"
              f" {r.get('config', '-')}{' ERROR' if 'error' in r else ''} |")  # fmt: skip
    bad = [r for r in results["correctness"] if not r.get("ok")]
    print(f"\ncorrectness suite: {len(results['correctness']) - len(bad)} ok, {len(bad)} failed")
    for r in bad:
        print(f"  FAILED {r['name']} {r['config']} {r.get('rel_err', r.get('error'))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_attention_mgpu.json")
    ap.add_argument("--no-sweep", action="store_true", help="skip the config sweep")
    ap.add_argument("--no-prefill", action="store_true", help="skip the main prefill table")
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script: interpret mode")
    args = ap.parse_args()
    common.INTERPRET = args.smoke
    results = dict(common.run_info(), prefill=[], prefill_sweep=[], correctness=[])
    say(f"{results['device']} jax {jax.__version__} commit {results['commit']}")

    def dump() -> None:
        results["log"] = LOG
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1, default=str)

    sweep_cases = [c for c in (SMOKE_CASES if args.smoke else CASES) if c[0] in SWEEP_CASES]
    sections = [lambda: correctness_suite(results, SMOKE_SUITE if args.smoke else SUITE)]
    if not args.no_prefill:
        cases = SMOKE_CASES if args.smoke else CASES
        sections.insert(0, lambda: prefill_section(cases, results, False))
    if not args.no_sweep:
        sweep = SMOKE_SWEEP if args.smoke else SWEEP
        sections.append(lambda: prefill_section(sweep_cases, results, True, sweep))
    for section in sections:
        try:
            section()
        except Exception:
            traceback.print_exc()
        dump()
    print_tables(results)


if __name__ == "__main__":
    main()
