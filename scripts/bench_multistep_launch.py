"""Host cost of one engine launch with K decode iterations (multi-step decode, issue 3).

Builds the engine on a random model, decodes `--batch` sequences until a launch covers every row
with `--num-scheduler-steps` iterations, then launches that prepared step again and again and
times `ModelRunner.execute` on the host: with the device idle, with 10 launches queued, and "one
ahead" (launch N + 1, then wait for N's outputs, as LLMEngine.step does). Also the device time per
decode iteration. Run once per XLA setting, each in a fresh process:

    python scripts/bench_multistep_launch.py --model llama3-8b --batch 256 --num-scheduler-steps 8
    RTPJAX_LOOP_GRAPHS=0 python scripts/bench_multistep_launch.py ...   # loop bodies launched
                                                                        # iteration by iteration
Prints one JSON line. `--check` first compares multi-step against single-step outputs on the same
weights: 8 prompts prefilled in one step and decoded in lockstep (equal max_tokens), so both runs
see the same step shapes and must give the same tokens, greedy and seeded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rtpjax import env

env.configure_xla()  # before jax starts: loop graphs unless RTPJAX_LOOP_GRAPHS=0

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rtpjax import LLM, SamplingParams  # noqa: E402
from rtpjax.models.presets import preset, random_params  # noqa: E402
from rtpjax.sharding.mesh import make_mesh  # noqa: E402
from rtpjax.weights.checkpoint import LoadedModel  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-1b", help="preset name (random bf16 weights)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--num-scheduler-steps", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--check", action="store_true", help="multi-step vs single-step outputs")
    args = ap.parse_args(argv)
    K, B = args.num_scheduler_steps, args.batch

    cfg = preset(args.model)
    mesh = make_mesh(1)
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    params = random_params(cfg, dtype, mesh)
    loaded = LoadedModel(args.model, f"random:{args.model}", cfg, params, None, mesh, dtype)
    checked = check(loaded, K) if args.check else None
    gc.collect()  # the check's engines and their KV pages
    # Long enough for every row to be decoding at once (the first rows' decode overlaps the last
    # rows' prefill) and for a few launches of K.
    max_tokens = B + 16 * K + 32
    pages_per_seq = -(-(args.context + max_tokens + 16) // 16)
    llm = LLM(
        loaded,
        max_model_len=args.context + max_tokens + 16,
        max_num_seqs=B,
        num_pages=B * pages_per_seq + 1,
        num_scheduler_steps=K,
        progress=False,
    )
    engine = llm.engine
    rng = np.random.default_rng(0)
    for i in range(B):
        prompt = [int(t) for t in rng.integers(10, cfg.vocab_size - 10, args.context)]
        sp = SamplingParams(
            temperature=args.temperature,
            seed=i,
            max_tokens=max_tokens,
            ignore_eos=True,
            detokenize=False,
        )
        engine.add_request(str(i), None, prompt, sp)
    t0 = time.perf_counter()
    prepared = None
    for _ in range(10_000):
        engine.step()
        p = engine._inflight.prepared if engine._inflight else None
        if p is not None and len(p.chunks) == B and p.static.num_steps == K:
            prepared = p
            break
    if prepared is None:
        raise SystemExit("bench_multistep_launch: never reached a full multi-step launch")
    reach_s = time.perf_counter() - t0
    runner = engine.runner

    def done() -> None:
        jax.block_until_ready((runner.kv, runner.prev_sampled))

    done()
    idle = []
    for _ in range(5):
        done()
        t = time.perf_counter()
        runner.execute(prepared)
        idle.append(time.perf_counter() - t)
    done()
    queued = []
    t1 = time.perf_counter()
    for _ in range(10):
        t = time.perf_counter()
        runner.execute(prepared)
        queued.append(time.perf_counter() - t)
    done()
    per_launch = (time.perf_counter() - t1) / 10
    ahead, prev = [], None
    for _ in range(8):
        t = time.perf_counter()
        cur = runner.execute(prepared)
        ahead.append(time.perf_counter() - t)
        if prev is not None:
            np.asarray(prev.outputs)
        prev = cur
    done()
    ms = lambda xs: round(float(np.median(xs)) * 1e3, 3)
    print(
        json.dumps(
            dict(
                model=args.model,
                batch=B,
                context=args.context,
                num_scheduler_steps=K,
                temperature=args.temperature,
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                device=jax.devices()[0].device_kind,
                reach_s=round(reach_s, 1),
                launch_idle_ms=ms(idle),
                launch_10_queued_ms=ms(queued[2:]),
                launch_one_ahead_ms=ms(ahead[2:]),
                device_ms_per_iteration=round(per_launch * 1e3 / K, 3),
                check=checked,
            )
        )
    )
    return 0


def check(loaded: LoadedModel, K: int) -> dict:
    """Tokens of single-step and K-step runs over the same lockstep workload: equal counts."""
    rng = np.random.default_rng(1)
    vocab = loaded.config.vocab_size
    prompts = [
        [int(t) for t in rng.integers(10, vocab - 10, int(n))] for n in rng.integers(20, 200, 8)
    ]
    runs = {}
    for k in (1, K):
        llm = LLM(
            loaded,
            max_model_len=1024,
            max_num_seqs=8,
            num_pages=600,
            num_scheduler_steps=k,
            max_num_batched_tokens=2048,
            progress=False,
        )
        greedy = SamplingParams(
            temperature=0.0, max_tokens=6 * K, ignore_eos=True, detokenize=False
        )
        outs = llm.generate(prompts, greedy)
        seeded = [
            SamplingParams(
                temperature=0.8,
                top_p=0.9,
                seed=i,
                max_tokens=6 * K,
                ignore_eos=True,
                detokenize=False,
                logprobs=1,
            )
            for i in range(len(prompts))
        ]
        outs_s = llm.generate(prompts, seeded)
        runs[k] = (
            [o.outputs[0].token_ids for o in outs],
            [o.outputs[0].token_ids for o in outs_s],
            [
                [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                for o in outs_s
            ],
            sorted({r[7] for r in llm.engine.stats.step_log}),
        )
        del llm
    (g1, s1, l1, k1), (gk, sk, lk, kk) = runs[1], runs[K]
    diff = max(abs(a - b) for x, y in zip(l1, lk) for a, b in zip(x, y))
    return dict(
        greedy_equal=f"{sum(a == b for a, b in zip(g1, gk))}/{len(g1)}",
        seeded_equal=f"{sum(a == b for a, b in zip(s1, sk))}/{len(s1)}",
        max_logprob_diff=diff,
        steps_per_launch=(k1, kk),
    )


if __name__ == "__main__":
    sys.exit(main())
