"""Offline engine benchmark: throughput, host overhead, GPU idle time, decode latency, prefill rate.

    python scripts/bench_offline.py                         # CPU-sized, the embedded default model
    python scripts/bench_offline.py --model random:llama3-8b --num-requests 512 --input-len 1024 \
        --output-len 256 --max-num-seqs 256 --json out.json  # the H100 run

Phases (each printed as a table row and written to JSON):
  throughput   N requests, random input tokens, ignore_eos, temperature 1 (as vLLM's benchmark)
  host         host milliseconds per steady-decode step at the largest batch (schedule + prepare
               + launch + update; the time blocked on the device is excluded)
  idle         fraction of steady-decode wall time the device sits idle: 1 − t_device / t_wall,
               where t_device is the same decode step replayed back to back with no host work
  decode_bN    steady decode at batch N: ms per step and output tokens/s, beside the streaming
               floor (weights + live KV bytes / HBM bandwidth)
  launch       the host cost of dispatching one decode step at the largest batch, split into
               input transfer, the jitted call, and a launch behind a busy device; the compiled
               step's top-level operation count (kernels, or command buffers)
  prefill      one prompt of --prefill-len tokens: time and model TFLOP/s (2 x non-embedding
               parameters x tokens + attention) beside the GEMM rate of this device, and its
               chunks (one step each, with each step's time; --cudnn-prefill: the chunks after
               the first run over their cached prefix through cuDNN)
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax
import jax.numpy as jnp

from rtpjax import LLM, SamplingParams, env
from rtpjax.engine import packing
from rtpjax.engine.async_engine import warm_up
from rtpjax.kernels import ragged_paged_attention as rpa
from rtpjax.models import llama
from rtpjax.models.params import num_bytes
from rtpjax.models.presets import preset, random_params
from rtpjax.sharding.mesh import make_mesh
from rtpjax.weights.checkpoint import LoadedModel
from rtpjax.weights.loader import resolve_dtype


def build(args) -> LLM:
    if args.model and args.model.startswith("random:"):
        name = args.model.split(":", 1)[1]
        cfg = preset(name).with_tensor_parallel(args.tensor_parallel_size)
        mesh = make_mesh(args.tensor_parallel_size)
        dtype = resolve_dtype(args.dtype)
        params = random_params(cfg, dtype, mesh)
        loaded = LoadedModel(name, args.model, cfg, params, None, mesh, dtype)
    else:
        loaded = args.model  # None → default model
    return LLM(
        loaded,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_prefix_caching=False,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        num_scheduler_steps=args.num_scheduler_steps,
        cudnn_prefill=args.cudnn_prefill,
        attention_impl=getattr(args, "attention_impl", "auto"),
        progress=False,
    )


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"prompt_token_ids": [int(t) for t in rng.integers(10, vocab - 10, length)]}
        for _ in range(n)
    ]


def params_for(output_len: int, temperature: float = 1.0) -> SamplingParams:
    return SamplingParams(
        temperature=temperature, max_tokens=output_len, ignore_eos=True, detokenize=False
    )


def run_batch(llm: LLM, prompts, sp) -> tuple[float, list]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    errors = [o.error for o in outs if o.error]
    if errors:
        raise SystemExit(f"bench_offline: {len(errors)} requests failed, e.g.: {errors[0]}")
    return time.perf_counter() - t0, outs


def device_step_time(llm: LLM, batch: int, context: int, repeats: int) -> float:
    """Seconds of one steady decode step at `batch` x `context`, replayed with no host work."""
    prepared = _full_decode_step(llm, batch, context, "dev")
    runner = llm.engine.runner
    jax.block_until_ready(runner.kv)
    t0 = time.perf_counter()
    for _ in range(repeats):
        runner.execute(prepared)
    jax.block_until_ready((runner.kv, runner.prev_sampled))
    dt = (time.perf_counter() - t0) / repeats / prepared.static.num_steps  # per decode iteration
    _drain(llm, batch, "dev")
    return dt


def _full_decode_step(llm: LLM, batch: int, context: int, tag: str):
    """Add `batch` long requests and step until one step decodes all of them; that step."""
    engine = llm.engine
    vocab = llm.model.config.vocab_size
    for i, p in enumerate(random_prompts(batch, context, vocab, 99)):
        engine.add_request(f"{tag}{i}", None, p["prompt_token_ids"], params_for(10_000))
    for _ in range(10_000):
        engine.step()
        chunks = engine._inflight.prepared.chunks if engine._inflight else []
        if len(chunks) == batch and all(c.num_tokens == 1 for c in chunks):
            return engine._inflight.prepared
    raise SystemExit("bench_offline: never reached a full decode batch")


def _drain(llm: LLM, batch: int, tag: str) -> None:
    engine = llm.engine
    for i in range(batch):
        engine.abort_request(f"{tag}{i}")
    while engine.has_unfinished_requests():
        engine.step()


def launch_breakdown(llm: LLM, batch: int, context: int, repeats: int = 20) -> dict:
    """Host milliseconds of dispatching one decode step, split: the input transfer alone, the
    jitted call with inputs already on the device, and a whole `execute` with the device idle and
    with the previous step still running (a full launch queue can block the host). Also counts the
    top-level operations of the compiled step (kernels enqueued one by one unless XLA records them
    into a command buffer)."""
    prepared = _full_decode_step(llm, batch, context, "launch")
    runner = llm.engine.runner
    x = prepared.inputs
    jax.block_until_ready(runner.kv)

    def ms(f) -> float:
        t = []
        for _ in range(repeats):
            jax.block_until_ready((runner.kv, runner.prev_sampled))
            t0 = time.perf_counter()
            out = f()
            t.append(time.perf_counter() - t0)
            jax.block_until_ready(out)
        return float(np.median(t) * 1e3)

    put_ms = ms(lambda: jax.device_put(x))
    buf, layout = packing.pack(x)
    pack_put_ms = ms(lambda: jax.device_put(packing.pack(x)[0]))
    buf_dev = jax.block_until_ready(jax.device_put(buf))

    def call_dev():  # execute()'s call, with the inputs already on the device
        with jax.set_mesh(runner.mesh):
            step = runner.call(runner._step, buf_dev, layout, prepared)
            runner.kv, out, runner.prev_sampled = step
        return out

    call_ms = ms(call_dev)
    # The same arguments into a jitted function that does nothing with them: the dispatch cost of
    # the step's ~260 argument arrays alone, without its kernels.
    noop = jax.jit(lambda params, kv, buf: buf[0])
    noop_ms = ms(lambda: noop(runner.params, runner.kv, buf_dev))
    idle_ms = ms(lambda: runner.execute(prepared).outputs)
    busy = []
    jax.block_until_ready(runner.kv)
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.execute(prepared)
        busy.append(time.perf_counter() - t0)
    jax.block_until_ready((runner.kv, runner.prev_sampled))
    hlo = runner.lower(prepared).compile().as_text()
    _drain(llm, batch, "launch")
    ops = _entry_ops(hlo)
    return {
        "batch": batch,
        "put_inputs_ms": put_ms,
        "put_packed_inputs_ms": pack_put_ms,
        "noop_same_args_ms": noop_ms,
        "call_device_inputs_ms": call_ms,
        "execute_idle_ms": idle_ms,
        "execute_busy_ms": float(np.median(busy[2:]) * 1e3),
        "entry_ops": ops,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _entry_ops(hlo: str) -> dict:
    """Count the compiled module's top-level operations by kind (ENTRY computation)."""
    entry = hlo[hlo.find("\nENTRY ") :]
    entry = entry[: entry.find("\n}\n")]
    skip = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
    counts: dict[str, int] = {}
    for line in entry.splitlines()[1:]:
        m = re.search(r"= \S+ ([a-z][a-z0-9-]*)\(", line)
        if m and m.group(1) not in skip:
            k = m.group(1)
            if k == "call" and "command_buffer" in line:
                k = "command_buffer"
            counts[k] = counts.get(k, 0) + 1
    counts["total"] = sum(counts.values())
    return counts


def steady_decode(llm: LLM, batch: int, context: int, steps: int) -> dict:
    """Wall ms per decode step with `batch` sequences decoding, and the engine's host time."""
    engine = llm.engine
    vocab = llm.model.config.vocab_size
    engine.stats.step_log.clear()
    prompts = random_prompts(batch, context, vocab, 7)
    for i, p in enumerate(prompts):
        engine.add_request(f"dec{batch}-{i}", None, p["prompt_token_ids"], params_for(steps + 8))
    times, steps = [], []
    while engine.has_unfinished_requests():
        engine.step()
        log = engine.stats.step_log[-1] if engine.stats.step_log else None
        # Steady decode: every sequence decoding (a few may have finished a step early).
        if log and log[0] >= max(1, int(0.9 * batch)) and log[1]:
            times.append(time.perf_counter())
            steps.append(log[7])
    # Per decode step (one token per sequence): a multi-step launch of K counts K. The wall time
    # between two launches is the previous launch's device time (the pipeline runs one ahead).
    dts = np.diff(times) / np.asarray(steps[:-1]) if times else np.zeros(0)
    dts = dts[2:-2] if len(dts) > 8 else dts
    host = engine.stats.host_ms(min_batch=max(1, int(0.9 * batch)))
    ms = float(np.median(dts) * 1e3) if len(dts) else float("nan")
    return {
        "batch": batch,
        "context": context,
        "ms_per_step": ms,
        "tokens_per_s": batch / ms * 1e3,
        "host_ms": host,
    }


def _chunk_times(log: list[tuple]) -> list[float]:
    """Seconds per launched step of a step log: its launch plus the wait for its results. With
    async scheduling a row waits for the previous row's launch (the last row launches nothing)."""
    launched = [r for r in log if r[0] > 0]
    if len(log) == len(launched) + 1:
        return [a[3] + b[4] for a, b in itertools.pairwise(log)]
    return [r[3] + r[4] for r in log]


def model_flops(cfg, tokens: int) -> float:
    # Linear layers only: the embedding is a lookup and prefill computes logits for one token.
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    per_token = 2 * (num_bytes(llama.spec(cfg, jnp.float32)) // 4 - embed)
    attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * tokens * (tokens + 1) / 2
    return per_token * tokens + attention


def gemm_rate(m: int, k: int, n: int, dtype) -> float:
    """TFLOP/s of XLA's matmul on this device (20 products in one jit, as DESIGN measured)."""
    a = jax.random.normal(jax.random.key(0), (m, k), dtype)
    bs = [jax.random.normal(jax.random.key(i + 1), (k, n), dtype) for i in range(20)]
    f = jax.jit(lambda a, bs: [a @ b for b in bs])
    jax.block_until_ready(f(a, bs))
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, bs))
    return 20 * 2 * m * k * n / (time.perf_counter() - t0) / 1e12


def copy_bandwidth() -> float:
    """Device copy bandwidth (bytes read + written per second) through XLA."""
    x = jnp.ones((256 * 2**20,), jnp.float32)  # 1 GiB
    f = jax.jit(lambda x: x * 2.0)
    jax.block_until_ready(f(x))
    t0 = time.perf_counter()
    for _ in range(10):
        y = f(x)
    jax.block_until_ready(y)
    return 10 * 2 * x.nbytes / (time.perf_counter() - t0)


def env_info() -> dict:
    # The device machine has no .git: the caller passes the commit.
    commit = os.environ.get("RTPJAX_COMMIT")
    if not commit:
        try:
            commit = subprocess.check_output(
                ["git", "rev-parse", "--short", "HEAD"], text=True, cwd=os.path.dirname(__file__)
            ).strip()
        except Exception:
            commit = "unknown"
    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", dev.platform),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "date": datetime.date.today().isoformat(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="rtpjax offline engine benchmark")
    ap.add_argument(
        "--model", default=None, help="path, or random:<preset> (e.g. random:llama3-8b)"
    )
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-memory-fraction", type=float, default=0.9)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--decode-batches", default="1,64", help="comma list of steady-decode batches")
    ap.add_argument("--decode-context", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument(
        "--attention-impl",
        default="auto",
        choices=rpa.IMPLS,
        help="the paged attention path (auto: on Hopper the Mosaic GPU kernel for prefill steps "
        "and the Triton kernel for decode; triton: the Triton kernel for all steps)",
    )
    ap.add_argument("--phases", default="throughput,decode,idle,prefill")
    ap.add_argument(
        "--num-scheduler-steps",
        type=int,
        default=1,
        help="multi-step decode: decode iterations per launch (1: off)",
    )
    ap.add_argument(
        "--cudnn-prefill",
        action="store_true",
        help="prefill steps with no decode row through cuDNN (LLM(cudnn_prefill=True); GPU)",
    )
    ap.add_argument(
        "--warmup",
        choices=("full", "quick"),
        default="full",
        help="full (GPU): compile every bucket first, as the server does; quick: only what a "
        "short run of the workload compiles (steady-state phases drop compile outliers)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    phases = set(args.phases.split(","))
    if not env.jax_started():
        env.configure_xla()  # what LLM and the server do: rtpjax/env.py

    info = env_info()
    t0 = time.perf_counter()
    llm = build(args)
    cfg = llm.model.config
    info["model"] = args.model or llm.model.name
    info["weights_gb"] = num_bytes(llama.spec(cfg, llm.model.dtype)) / 1e9
    info["load_s"] = time.perf_counter() - t0
    info["kv_pages"] = llm.engine.runner.num_pages
    stats = jax.devices()[0].memory_stats() or {}
    info["memory"] = {k: stats.get(k) for k in ("bytes_limit", "bytes_in_use", "bytes_reserved")}
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    info["stable_inputs"] = llm.engine.runner.stable_inputs
    results: dict = {"env": info, "args": vars(args)}
    rows = _Rows(args.json, results)
    is_gpu = jax.default_backend() == "gpu"
    bw = copy_bandwidth() if is_gpu else None
    results["copy_bandwidth_Bps"] = bw

    # Warm-up: compile the decode and prefill buckets this run will use.
    warm = random_prompts(
        min(args.max_num_seqs, args.num_requests), args.input_len, cfg.vocab_size, 1
    )
    t0 = time.perf_counter()
    run_batch(llm, warm, params_for(4))
    if is_gpu and args.warmup == "full":  # what the server does: every decode and prefill bucket
        warm_up(llm.engine, full=True)
    results["warmup_s"] = time.perf_counter() - t0
    results["variants_after_warmup"] = llm.engine.runner.num_compiled_variants

    if "throughput" in phases:
        prompts = random_prompts(args.num_requests, args.input_len, cfg.vocab_size, 2)
        llm.engine.stats.step_log.clear()
        before = llm.engine.runner.num_compiled_variants
        wall, outs = run_batch(llm, prompts, params_for(args.output_len))
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        log = llm.engine.stats.step_log
        # A step whose launch took over half a second compiled a new variant.
        slow = [r[3] for r in log if r[3] > 0.5]
        host = llm.engine.stats.host_ms(min_batch=max(1, int(0.8 * args.max_num_seqs)))
        results["throughput"] = {
            "wall_s": wall,
            "output_tokens": out_tokens,
            "output_tok_s": out_tokens / wall,
            "total_tok_s": (out_tokens + args.num_requests * args.input_len) / wall,
            "host_ms_steady_decode": host,
            "steps": len(log),
            "device_wait_s": sum(r[4] for r in log),
            "variants_compiled": llm.engine.runner.num_compiled_variants - before,
            "compile_s": sum(slow),
        }
        rows.append(
            (
                "throughput",
                f"{out_tokens / wall:,.0f} out tok/s",
                f"{wall:.1f} s for {args.num_requests} req x {args.input_len}+{args.output_len};"
                f" {len(log)} steps, {results['throughput']['variants_compiled']} compiles,"
                f" launches over 0.5 s: {sum(slow):.1f} s",
            )
        )
        if host:
            rows.append(
                (
                    "host/step",
                    f"p50 {host['p50']:.3f} ms  p99 {host['p99']:.3f} ms",
                    f"at batch >= {int(0.8 * args.max_num_seqs)} (goal <= 1 ms): schedule "
                    f"{host['schedule_p50']:.2f}, prepare {host['prepare_p50']:.2f}, launch "
                    f"{host['launch_p50']:.2f}, post {host['post_p50']:.2f} ms; "
                    f"{host['steps_per_launch']:.2f} steps per launch, "
                    f"{host['per_launch_p50']:.2f} ms per launch",
                )
            )

    weights = num_bytes(llama.spec(cfg, llm.model.dtype))
    kv_token = (
        2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(llm.model.dtype).itemsize
    )
    if "decode" in phases:
        results["decode"] = []
        for b in [int(x) for x in args.decode_batches.split(",")]:
            r = steady_decode(llm, b, args.decode_context, args.decode_steps)
            if bw:
                ctx = args.decode_context + args.decode_steps / 2
                r["floor_ms"] = (weights + b * ctx * kv_token) / bw * 1e3
            results["decode"].append(r)
            floor = (
                f"floor {r['floor_ms']:.2f} ms ({r['floor_ms'] / r['ms_per_step']:.0%})"
                if "floor_ms" in r
                else ""
            )
            rows.append(
                (
                    f"decode b={b}",
                    f"{r['ms_per_step']:.2f} ms/step, {r['tokens_per_s']:,.0f} tok/s",
                    floor,
                )
            )

    if "idle" in phases:
        b = max(int(x) for x in args.decode_batches.split(","))
        # The device step replayed at the steady run's mean context (its contexts grow by
        # decode_steps), or the idle fraction would count the growth as idle time.
        dev = device_step_time(llm, b, args.decode_context + args.decode_steps // 2, 20)
        r = steady_decode(llm, b, args.decode_context, args.decode_steps)
        idle = 1 - dev * 1e3 / r["ms_per_step"]  # NaN when too few steady steps were seen
        idle = idle if math.isnan(idle) else max(0.0, idle)
        results["idle"] = {
            "batch": b,
            "device_ms": dev * 1e3,
            "wall_ms": r["ms_per_step"],
            "idle_fraction": idle,
            "host_ms": r["host_ms"],
        }
        rows.append(
            (
                "gpu idle",
                f"{idle:.1%}",
                f"batch {b}: device {dev * 1e3:.2f} ms vs wall "
                f"{r['ms_per_step']:.2f} ms per step (goal <= 5%)",
            )
        )

    if "launch" in phases:
        b = max(int(x) for x in args.decode_batches.split(","))
        r = launch_breakdown(llm, b, args.decode_context)
        results["launch"] = r
        rows.append(
            (
                "launch",
                f"idle {r['execute_idle_ms']:.2f} ms, busy {r['execute_busy_ms']:.2f} ms",
                f"batch {b}: inputs put {r['put_inputs_ms']:.2f} ms (packed "
                f"{r['put_packed_inputs_ms']:.2f}), no-op with the same args "
                f"{r['noop_same_args_ms']:.2f} ms, call with device inputs "
                f"{r['call_device_inputs_ms']:.2f} ms; ops {r['entry_ops']}",
            )
        )

    if "prefill" in phases:
        n = args.prefill_len
        p = random_prompts(1, n, cfg.vocab_size, 3)
        run_batch(llm, p, params_for(1))  # compile this bucket
        times, per_step = [], []
        for i in range(3):
            p = random_prompts(1, n, cfg.vocab_size, 10 + i)
            llm.engine.stats.step_log.clear()
            run_batch(llm, p, params_for(1))
            log = llm.engine.stats.step_log
            # Prefill time: the steps that computed the prompt (launch → results back).
            times.append(sum(r[3] + r[4] for r in log))
            per_step.append(_chunk_times(log))
        t = float(np.median(times))
        flops = model_flops(cfg, n)
        # One step per chunk of the budget (no prefix caching here); each step's median time.
        b = args.max_num_batched_tokens
        chunks = [min(b, n - s) for s in range(0, n, b)]
        same = all(len(s) == len(chunks) for s in per_step)
        step_ms = [float(np.median(s)) * 1e3 for s in zip(*per_step)] if same else []
        r = {
            "tokens": n,
            "s": t,
            "tflops": flops / t / 1e12,
            "chunks": chunks,
            "step_ms": step_ms,
            "cudnn_prefill": llm.engine.runner.cudnn_prefill,
        }
        if is_gpu:
            r["xla_gemm_tflops"] = gemm_rate(
                n, cfg.hidden_size, cfg.intermediate_size, llm.model.dtype
            )
        results["prefill"] = r
        steps = (
            " + ".join(f"{c} ({ms:.1f} ms)" for c, ms in zip(chunks, step_ms))
            if same
            else f"{[len(s) for s in per_step]} steps per run"
        )
        extra = f"{len(chunks)} steps: {steps}, cuDNN prefill {r['cudnn_prefill']}" + (
            f"; XLA GEMM {r['xla_gemm_tflops']:.0f} TFLOP/s on {n}x{cfg.hidden_size}x"
            f"{cfg.intermediate_size}"
            if is_gpu
            else ""
        )
        rows.append((f"prefill {n}", f"{t * 1e3:.1f} ms, {r['tflops']:.1f} TFLOP/s", extra))

    results["compiled_variants"] = llm.engine.runner.num_compiled_variants
    print(
        f"\nrtpjax bench_offline: {info['model']} on {info['device']} ({info['backend']}), jax "
        f"{info['jax']}, commit {info['commit']}, weights {info['weights_gb']:.2f} GB"
    )
    if bw:
        print(f"measured copy bandwidth {bw / 1e12:.2f} TB/s")
    w = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{w}}  {value:<36} {note}")
    print(f"  compiled step variants: {results['compiled_variants']}")
    rows.save()
    return 0


class _Rows(list):
    """Table rows, each also printed (and the JSON rewritten) as soon as it is measured, so a run
    cut short still reports what it finished."""

    def __init__(self, path: str | None, results: dict):
        super().__init__()
        self.path, self.results = path, results

    def append(self, row) -> None:
        super().append(row)
        print("  ".join(row), flush=True)
        self.save()

    def save(self) -> None:
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.results, f, indent=1, default=float)


if __name__ == "__main__":
    sys.exit(main())
