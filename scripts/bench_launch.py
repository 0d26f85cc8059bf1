"""Host cost of launching the engine's decode step under XLA runtime settings (issue 3).

XLA replays each compiled step as a CUDA graph and re-records the graph's commands whose buffers
moved since the last launch; this script measures what that costs and what changes it. Run it
once per setting, each in a fresh process (XLA reads its flags when jax starts):

    python scripts/bench_launch.py --model random:llama3-8b                # XLA's defaults
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python scripts/bench_launch.py ...  # no graphs
    RTPJAX_STABLE_GRAPHS=1 python scripts/bench_launch.py ...  # SKIP_TEMP + resident inputs
    TF_CPP_VMODULE=command_executor=1 ...  # XLA logs "Updated N commands ... (skipped K)"

Prints one JSON line: the launch split of bench_offline's `launch` phase at --batch, steady decode
at --batch and at batch 1 (ms per step and the engine's host phases), and greedy / seeded-sample
fingerprints (equal across settings when the setting does not change results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rtpjax import env

env.configure_xla()  # RTPJAX_STABLE_GRAPHS=1 only; before jax starts

import bench_offline as bo  # noqa: E402
import jax  # noqa: E402

from rtpjax import SamplingParams  # noqa: E402


def fingerprint(outs) -> str:
    ids = [list(o.outputs[0].token_ids) for o in outs]
    return hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:12]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    build = types.SimpleNamespace(
        model=args.model,
        tensor_parallel_size=1,
        dtype="auto",
        max_model_len=2 * args.context + 2 * args.steps,
        max_num_seqs=args.batch,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_fraction=0.85,
    )
    llm = bo.build(build)
    runner = llm.engine.runner
    res: dict = {
        "device": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "stable_inputs": runner.stable_inputs,
        "kv_pages": runner.num_pages,
        "build_s": time.perf_counter() - t0,
    }
    vocab = llm.model.config.vocab_size
    prompts = bo.random_prompts(8, 100, vocab, 5)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, detokenize=False)
    res["greedy"] = fingerprint(llm.generate(prompts, greedy))
    seeded = SamplingParams(
        temperature=1.0, seed=3, max_tokens=16, ignore_eos=True, detokenize=False
    )
    res["seeded"] = fingerprint(llm.generate(prompts[:4], seeded))
    launch = bo.launch_breakdown(llm, args.batch, args.context, repeats=20)
    launch.pop("xla_flags", None)
    res["launch"] = launch
    for b in (args.batch, 1):
        r = bo.steady_decode(llm, b, args.context, args.steps if b > 1 else args.steps + 16)
        res[f"decode_b{b}"] = {"ms_per_step": r["ms_per_step"], "host": r["host_ms"]}
    res["total_s"] = time.perf_counter() - t0
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
