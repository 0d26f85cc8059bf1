"""CPU microbenchmark of the engine's host phases in steady decode: schedule, post and outputs.

    python scripts/bench_host.py                  # batch 256, tiny model, 200 timed steps, top 10
    python scripts/bench_host.py --no-device      # the same host work with the device stubbed out
    python scripts/bench_host.py --stop "<|stop|>" --output-kind delta --json out.json

An LLMEngine on the tiny preset (random weights) takes --batch requests of --prompt-len random
tokens: greedy, ignore_eos, max_tokens large, detokenize on (the smollm2 tokenizer), outputs
"cumulative" (what the server asks for today). The tokenizer's per-id byte cache is filled first,
as in a server that has run a while. Once every sequence decodes, --steps steps are timed; the
table gives percentiles of StepTiming.schedule_s (Scheduler.schedule), StepTiming.post_s
(LLMEngine._process_result: scheduler.update, bookkeeping, detokenization, stop strings),
StepTiming.prepare_s (ModelRunner.prepare: the step's input arrays), `batch`, the part of prepare
spent in its InputBatch (slots and page-table rows, sampling rows, flags; timed around those
methods), `output`, the RequestOutputs step() builds after post (timed here around
LLMEngine._output; no StepTiming phase holds it), `record` (EngineStats.record_step, likewise
outside every phase), `fetch` (StepTiming.wait_s: ModelRunner.fetch, which under --no-device
only unpacks a ready buffer) and `step`, the wall time of the whole engine.step() call.

The device step is kept out of the figures. Unless --overlap, each step is waited for right after
its launch, so the XLA threads computing it do not compete with the host phases for this
machine's cores; its caches are still cold after each step (the logits alone are 0.5 MB at the
tiny preset's 512 ids; --vocab 0 takes the tokenizer's 49152, 50 MB). --no-device replaces the
runner's execute with a stub whose packed outputs hold ids of the whole tokenizer vocabulary in
Zipf proportions: the host work of a GPU machine, where the device is elsewhere (prepare and
fetch, numpy only, stay the runner's own).

A second pass of the same length runs under cProfile, switched on in step() except inside the
runner's prepare / execute / fetch, and prints the top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax
import jax.numpy as jnp

from rtpjax.engine.engine import EngineConfig, LLMEngine
from rtpjax.engine.model_runner import InflightStep, output_layout
from rtpjax.models.presets import preset, random_params
from rtpjax.sampling_params import SamplingParams
from rtpjax.sharding.mesh import make_mesh
from rtpjax.tokenizer import Tokenizer

# The InputBatch methods ModelRunner.prepare calls (timed together as the `batch` part of prepare).
BATCH_METHODS = ("slots_of", "sampling", "any_flag")
ROOT = os.path.join(os.path.dirname(__file__), "..")
TOKENIZER_DIR = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "smollm2")


class Clock:
    """Wraps an engine method and adds up the seconds spent in it."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


class Paused:
    """Wraps a runner method so the profiler skips it (device work: prepare, launch, fetch)."""

    def __init__(self, fn, profile: cProfile.Profile) -> None:
        self.fn = fn
        self.profile = profile

    def __call__(self, *args, **kwargs):
        self.profile.disable()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.profile.enable()


class Settled:
    """Wraps runner.execute to wait for the step it launched: on CPU the device is the same two
    cores, and a step computing behind the host phases would be timed as host work."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        inflight = self.fn(*args, **kwargs)
        jax.block_until_ready(inflight.outputs)
        return inflight


class NoDevice:
    """Stands in for the runner's execute: nothing runs on the device (so the XLA step neither
    takes time nor evicts the host's caches between the host phases, as on a GPU machine). Its
    packed output buffer (zeros but the sampled ids) goes to the runner's own fetch; every row
    gets an id of the tokenizer's vocabulary drawn with Zipf's law (probability ~ 1 / rank over a
    shuffled vocabulary), roughly as text uses its tokens, drawn ahead of time."""

    def __init__(self, runner, vocab_size: int, seed: int) -> None:
        self.runner = runner
        rng = np.random.default_rng(seed)
        ids = rng.permutation(np.arange(100, vocab_size - 100, dtype=np.int32))
        weights = 1.0 / np.arange(1, len(ids) + 1)
        cdf = np.cumsum(weights / weights.sum())
        ranks = np.minimum(np.searchsorted(cdf, rng.random(1 << 20)), len(ids) - 1)
        self.draws = ids[ranks]  # i32[2**20]
        self.next = 0

    def execute(self, prepared):
        # As ModelRunner.execute: the next step's from_device chunks read the rows sampled here.
        chunks = prepared.chunks
        self.runner._prev_rows = {c.seq.seq_id: b for b, c in enumerate(chunks) if c.samples}
        x = prepared.inputs
        layout = output_layout(x.kv_lens.shape[0], x.tokens.shape[0], prepared.static)
        buf = np.zeros(layout.size, np.int32)  # the token ids are the layout's first leaf
        rows = layout.leaves[0][0][0]
        if self.next + rows > len(self.draws):
            self.next = 0
        buf[:rows] = self.draws[self.next : self.next + rows]
        self.next += rows
        return InflightStep(prepared, buf, layout)


def build_engine(args) -> LLMEngine:
    tokenizer = Tokenizer.from_dir(TOKENIZER_DIR)
    cfg = preset("tiny", vocab_size=args.vocab or tokenizer.vocab_size)
    mesh = make_mesh(1)
    warm_steps = 4
    max_len = args.prompt_len + warm_steps + 2 * args.steps + 16
    pages_per_seq = -(-max_len // args.page_size)
    num_pages = args.batch * pages_per_seq + 16
    config = EngineConfig(
        max_model_len=max_len,
        max_num_seqs=args.batch,
        max_num_batched_tokens=max(args.batch * args.prompt_len, 256),
        page_size=args.page_size,
        num_pages=num_pages,
        enable_prefix_caching=True,
    )
    pieces = tokenizer.byte_level_pieces()
    if pieces is not None and not args.cold_pieces:
        # A long-running server has met its frequent ids; greedy decoding of random weights keeps
        # meeting new ones (thousands per pass), whose first decode converts the token's string.
        for token_id in range(tokenizer.vocab_size):
            pieces.get(token_id, True)
    params = random_params(cfg, jnp.float32, mesh)
    engine = LLMEngine(cfg, params, tokenizer, mesh, config, num_pages=num_pages)
    if args.no_device:
        fake = NoDevice(engine.runner, tokenizer.vocab_size, args.seed)
        engine.runner.execute = fake.execute
    elif not args.overlap:
        engine.runner.execute = Settled(engine.runner.execute)
    return engine


def add_requests(engine: LLMEngine, args, tag: str) -> None:
    rng = np.random.default_rng([args.seed, len(tag)])  # each pass its own prompts: no cache hits
    vocab = engine.model_config.vocab_size
    stop = tuple(args.stop) if args.stop else None
    params = SamplingParams(
        temperature=0.0,
        ignore_eos=True,
        max_tokens=engine.config.max_model_len - args.prompt_len,
        detokenize=True,
        stop=stop,
        logprobs=args.logprobs,
    )
    for i in range(args.batch):
        prompt = [int(t) for t in rng.integers(100, vocab - 100, args.prompt_len)]
        engine.add_request(f"{tag}-{i}", None, prompt, params, output_kind=args.output_kind)


def run_pass(engine: LLMEngine, args, profile: cProfile.Profile | None, tag: str) -> dict:
    """Add the batch, step until every sequence decodes, time args.steps steps, abort the batch."""
    add_requests(engine, args, tag)
    while engine.scheduler.num_waiting or len(engine.stats.step_log) == 0:
        engine.step()
    for _ in range(3):  # the first decode steps compile and fill the overlap pipeline
        engine.step()

    first = len(engine.stats.step_log)
    out_s, batch_s, record_s, step_s = [], [], [], []
    if profile is None:
        out_clock = engine._output = Clock(engine._output)
        record_clock = engine.stats.record_step = Clock(engine.stats.record_step)
        batch = engine.runner.batch
        batch_clocks = [Clock(getattr(batch, name)) for name in BATCH_METHODS]
        for name, clock in zip(BATCH_METHODS, batch_clocks):
            setattr(batch, name, clock)
        for _ in range(args.steps):
            before = out_clock.seconds
            batch_before = sum(c.seconds for c in batch_clocks)
            record_before = record_clock.seconds
            t0 = time.perf_counter()
            engine.step()
            step_s.append(time.perf_counter() - t0)
            out_s.append(out_clock.seconds - before)
            batch_s.append(sum(c.seconds for c in batch_clocks) - batch_before)
            record_s.append(record_clock.seconds - record_before)
        del engine._output, engine.stats.record_step
        for name in BATCH_METHODS:
            delattr(batch, name)
    else:
        runner = engine.runner
        saved = {name: getattr(runner, name) for name in ("prepare", "execute", "fetch")}
        for name, fn in saved.items():
            setattr(runner, name, Paused(fn, profile))
        for _ in range(args.steps):
            profile.enable()
            engine.step()
            profile.disable()
        for name, fn in saved.items():
            setattr(runner, name, fn)
    rows = engine.stats.step_log[first:]
    if not all(r[0] == args.batch and r[1] for r in rows):
        raise RuntimeError(
            "a timed step was not a full decode-only step: a request ended early (a --stop string "
            "met?) or the KV pages ran out"
        )
    for i in range(args.batch):
        engine.abort_request(f"{tag}-{i}")
    while engine.has_unfinished_requests():
        engine.step()
    sched = np.array([r[2] for r in rows]) * 1e3
    post = np.array([r[5] for r in rows]) * 1e3
    fetch = np.array([r[4] for r in rows]) * 1e3
    prep = np.array([r[6] for r in rows]) * 1e3
    batch = np.array(batch_s or [0.0]) * 1e3
    out = np.array(out_s or [0.0]) * 1e3
    record = np.array(record_s or [0.0]) * 1e3
    whole = np.array(step_s or [0.0]) * 1e3

    def pct(a: np.ndarray) -> dict:
        return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}

    return {
        "schedule_ms": pct(sched),
        "post_ms": pct(post),
        "prepare_ms": pct(prep),
        "batch_ms": pct(batch),
        "output_ms": pct(out),
        "record_ms": pct(record),
        "fetch_ms": pct(fetch),
        "step_ms": pct(whole),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200, help="timed steady decode steps per pass")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument(
        "--vocab",
        type=int,
        default=512,
        help="model vocabulary (the tiny preset's 512; 0: the tokenizer's 49152, whose 50 MB of "
        "logits per CPU step evict the host's caches)",
    )
    ap.add_argument("--output-kind", default="cumulative", choices=("cumulative", "delta", "final"))
    ap.add_argument(
        "--stop",
        action="append",
        help="a stop string (repeatable; none by default): pick ones the text never holds, so the "
        "batch stays full and every step pays for the search",
    )
    ap.add_argument("--logprobs", type=int, default=None)
    ap.add_argument(
        "--no-device",
        action="store_true",
        help="no model: the runner's execute is a stub whose outputs are random ids of the "
        "tokenizer (prepare and fetch are its own)",
    )
    ap.add_argument(
        "--overlap",
        action="store_true",
        help="let the CPU device step run behind the host phases (timings then include contention)",
    )
    ap.add_argument(
        "--cold-pieces",
        action="store_true",
        help="leave the tokenizer's per-id byte cache cold (the default fills it first)",
    )
    ap.add_argument("--top", type=int, default=10, help="cProfile rows to print (0: no profile)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--seed", type=int, default=0, help="prompts and stub tokens")
    args = ap.parse_args()
    if args.stop:
        args.stop = [s.encode().decode("unicode_escape") for s in args.stop]

    engine = build_engine(args)
    timing = run_pass(engine, args, None, "timed")
    print(f"steady decode, batch {args.batch}, {args.steps} steps, host ms per step (CPU)")
    print(f"{'phase':<10}{'p50':>9}{'p90':>9}{'p99':>9}")
    for name in ("schedule", "post", "prepare", "batch", "output", "record", "fetch", "step"):
        row = timing[f"{name}_ms"]
        print(f"{name:<10}{row['p50']:>9.3f}{row['p90']:>9.3f}{row['p99']:>9.3f}")

    top: list[str] = []
    if args.top:
        profile = cProfile.Profile()
        run_pass(engine, args, profile, "profiled")
        stats = pstats.Stats(profile)
        rows = sorted(
            ((k, v) for k, v in stats.stats.items() if "_lsprof" not in k[2]),
            key=lambda kv: -kv[1][2],
        )[: args.top]
        title = f"cProfile of step() but the runner, {args.steps} steps, top {args.top} by own time"
        print(f"\n{title}")
        print(f"{'own ms/step':>11}{'cum ms/step':>12}{'calls/step':>11}  function")
        for (file, line, fn), (_, nc, tt, ct, _) in rows:
            where = f"{os.path.relpath(file, ROOT) if file.startswith('/') else file}:{line}({fn})"
            text = (
                f"{tt / args.steps * 1e3:>11.3f}{ct / args.steps * 1e3:>12.3f}"
                f"{nc / args.steps:>11.1f}  {where}"
            )
            top.append(text)
            print(text)

    if args.json:
        commit = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        record = {
            "bench": "host",
            "date": datetime.date.today().isoformat(),
            "commit": commit,
            "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "args": vars(args),
            **timing,
            "profile_top": top,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
