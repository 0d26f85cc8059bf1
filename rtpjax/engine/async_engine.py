"""AsyncLLMEngine: the LLMEngine loop on its own thread, fed and read from an asyncio event loop.

LLMEngine is not thread-safe, so every call into it happens on one background thread. Handlers on
the event loop talk to that thread through two one-way channels:

- commands in: a thread-safe queue of add / abort / call / stop commands. When the engine has no
  unfinished work the thread blocks on this queue (no busy loop); otherwise it takes every queued
  command, runs one `step()`, and repeats.
- outputs out: each request has an asyncio.Queue on the caller's loop; after each step the thread
  hands that step's outputs to the loop in one `loop.call_soon_threadsafe` batch.

Admission is decided on the engine thread, so it sees the true queue: a request is validated first
(ValueError → the caller's 400), then refused with QueueFullError when the sequences that would have
to wait for a free running slot exceed `max_waiting`. The handler awaits that decision before it
answers, so a streaming client gets its status code before any token.

Readers that must not call into the engine (metrics, /debug/engine) read `snapshot`, an immutable
EngineSnapshot the thread republishes after every command batch and step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from typing import Any, NamedTuple

from rtpjax.engine.engine import EngineConfig, LLMEngine
from rtpjax.engine.outputs import RequestOutput
from rtpjax.sampling_params import SamplingParams

logger = logging.getLogger("rtpjax.engine")


class QueueFullError(RuntimeError):
    """The waiting queue is full; retry later (HTTP 429 with Retry-After)."""


class EngineDeadError(RuntimeError):
    """The engine thread is stopping or has stopped; no new requests (HTTP 503)."""


class EngineSnapshot(NamedTuple):
    """Engine counters as of the engine thread's last loop iteration (safe to read anywhere)."""

    running: int  # sequences
    waiting: int  # sequences
    unfinished_requests: int
    used_pages: int
    free_pages: int
    num_pages: int  # allocatable pages (page 0 is reserved)
    kv_usage: float  # used / allocatable
    prefix_cache_hit_rate: float
    compiled_variants: int
    steps: int
    prefill_tokens: int
    decode_tokens: int
    time: float  # time.monotonic() when taken


class RequestStream:
    """The caller's end of one request: `await accepted()`, then iterate RequestOutputs.

    Outputs are cumulative (text and token ids so far); the last one has `finished` set. Several
    streams may share one asyncio.Queue (a multi-prompt completion); items are then told apart by
    `request_id`, and the caller iterates the queue itself.
    """

    def __init__(
        self,
        request_id: str,
        n: int,
        loop: asyncio.AbstractEventLoop,
        out_queue: asyncio.Queue | None = None,
    ):
        self.request_id = request_id
        self.n = n
        self.queue: asyncio.Queue = out_queue if out_queue is not None else asyncio.Queue()
        self.finished = False
        self._accepted: asyncio.Future = loop.create_future()

    async def accepted(self) -> None:
        """Return once the engine queued the request; raise ValueError, QueueFullError or
        EngineDeadError when it refused it."""
        await self._accepted

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    # Called on the event loop (scheduled by the engine thread).
    def _resolve(self, error: BaseException | None) -> None:
        if self._accepted.done():
            return
        if error is None:
            self._accepted.set_result(None)
        else:
            self.finished = True
            self._accepted.set_exception(error)

    def _deliver(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException) or item.finished:
            self.finished = True
        self.queue.put_nowait(item)


@dataclasses.dataclass
class _Add:
    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival_time: float
    output_kind: str = "cumulative"


_STOP = object()


class AsyncLLMEngine:
    """Runs `engine.step()` on one background thread; see the module docstring for the contract."""

    def __init__(self, engine: LLMEngine, *, max_waiting: int = 1024):
        if not (isinstance(max_waiting, int) and max_waiting >= 0):
            raise ValueError(f"max_waiting={max_waiting!r} must be an int >= 0")
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._accepting = True
        self.error: str | None = None  # set when a step failed (the last failure's message)
        # Zeros until the engine thread publishes its first snapshot (it does so at once).
        self.snapshot = EngineSnapshot(*(0,) * len(EngineSnapshot._fields))

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncLLMEngine.start() called twice")
        self._thread = threading.Thread(target=self._run, name="rtpjax-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting and self.is_running

    async def shutdown(self, drain_timeout: float = 30.0) -> int:
        """Stop taking requests, let in-flight ones finish for up to `drain_timeout` seconds, abort
        the rest and stop the thread. Returns how many requests were aborted."""
        self._accepting = False
        deadline = time.monotonic() + max(0.0, drain_timeout)
        # Ask the thread (the snapshot may predate a request accepted a moment ago).
        while self.is_running and time.monotonic() < deadline:
            if not await self.call(lambda e: e.num_unfinished_requests):
                break
            await asyncio.sleep(0.05)
        aborted = 0
        if self.is_running:
            aborted = await self.call(self._abort_all)
        self.stop()
        await asyncio.to_thread(self.join, 10.0)
        return aborted

    def stop(self) -> None:
        """Ask the thread to exit after the commands queued before this one (non-blocking)."""
        self._accepting = False
        self._commands.put(_STOP)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- requests (call these on the event loop) --------------------------------------------------

    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        out_queue: asyncio.Queue | None = None,
        output_kind: str = "cumulative",
    ) -> RequestStream:
        """Queue a request and wait for the engine to accept it; raises ValueError (bad request),
        QueueFullError or EngineDeadError. The caller must `abort()` it if it stops listening.
        output_kind as `LLMEngine.add_request` ("final": only the finished output arrives)."""
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, params.n, loop, out_queue)
        if not self.accepting:
            raise EngineDeadError(
                "the engine is shutting down" if self.is_running else "the engine is not running"
            )
        self._commands.put(
            _Add(
                stream,
                loop,
                prompt,
                list(prompt_token_ids),
                params,
                priority,
                time.monotonic(),
                output_kind,
            )
        )
        try:
            await stream.accepted()
        except asyncio.CancelledError:  # the caller went away: the engine may have queued it
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent, non-blocking, any thread)."""
        self._commands.put(("abort", request_id))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps and return its result."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, fut))
        return await asyncio.wrap_future(fut)

    def call_sync(self, fn: Callable[[LLMEngine], Any], timeout: float | None = None) -> Any:
        """`call` for code outside an event loop (start-up): blocks until fn has run."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, fut))
        return fut.result(timeout)

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.snapshot = self._take_snapshot()
            while True:
                busy = self.engine.has_unfinished_requests()
                if not self._apply_commands(block=not busy):
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
                self.snapshot = self._take_snapshot()
        except BaseException as e:  # the loop itself failed: fail every request, then stop
            logger.error("engine thread died: %s\n%s", e, traceback.format_exc())
            self.error = f"engine thread died: {e}"
            self._fail_all(EngineDeadError(self.error))
        finally:
            self._accepting = False
            with contextlib.suppress(Exception):  # a broken engine may fail here too
                self.snapshot = self._take_snapshot()
            self._drain_after_stop()

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when `block`); False once told to stop."""
        try:
            cmd = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd is _STOP:
                return False
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, cmd) -> None:
        if isinstance(cmd, _Add):
            self._admit(cmd)
        elif cmd[0] == "abort":
            rid = cmd[1]
            if self.engine.abort_request(rid):
                stream = self._streams.pop(rid, None)
                loop = self._loops.pop(rid, None)
                if stream is not None and loop is not None:
                    _post(loop, stream._deliver, _aborted_output(rid))
        elif cmd[0] == "call":
            _, fn, fut = cmd
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as e:
                    fut.set_exception(e)

    def _admit(self, cmd: _Add) -> None:
        stream, rid, e = cmd.stream, cmd.stream.request_id, self.engine
        try:
            e.validate(cmd.prompt_token_ids, cmd.params)
            free_slots = max(0, e.config.max_num_seqs - e.scheduler.num_running)
            must_wait = e.scheduler.num_waiting + cmd.params.n - free_slots
            if must_wait > self.max_waiting:
                raise QueueFullError(
                    f"the waiting queue is full ({e.scheduler.num_waiting} sequences waiting, "
                    f"max_waiting_requests={self.max_waiting}); retry later"
                )
            if not self._accepting:
                raise EngineDeadError("the engine is shutting down")
            e.add_request(
                rid,
                cmd.prompt,
                cmd.prompt_token_ids,
                cmd.params,
                arrival_time=cmd.arrival_time,
                priority=cmd.priority,
                output_kind=cmd.output_kind,
            )
        except Exception as err:  # ValueError / QueueFullError / EngineDeadError go to the caller
            _post(cmd.loop, stream._resolve, err)
            return
        self._streams[rid] = stream
        self._loops[rid] = cmd.loop
        _post(cmd.loop, stream._resolve, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:
            # One bad step must not take the server down: fail what was in flight and go on.
            logger.error("engine step failed: %s\n%s", err, traceback.format_exc())
            self.error = f"engine step failed: {err}"
            self._abort_all(self.engine, RuntimeError(f"internal engine error: {err}"))
            return
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            loop = self._loops[out.request_id]
            if out.finished:
                del self._streams[out.request_id], self._loops[out.request_id]
            batches.setdefault(loop, []).append((stream, _detach(out)))
        for loop, items in batches.items():
            _post(loop, _deliver_all, items)

    def _abort_all(self, engine: LLMEngine, error: BaseException | None = None) -> int:
        rids = list(self._streams)
        for rid in rids:
            try:
                engine.abort_request(rid)
            except Exception as err:  # a broken engine must not stop the others' release
                logger.error("abort_request(%r) failed: %s", rid, err)
            stream, loop = self._streams.pop(rid), self._loops.pop(rid)
            _post(loop, stream._deliver, error if error is not None else _aborted_output(rid))
        return len(rids)

    def _fail_all(self, error: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            _post(self._loops[rid], stream._deliver, error)
        self._streams.clear()
        self._loops.clear()

    def _drain_after_stop(self) -> None:
        """Refuse whatever was queued after the stop, so no caller waits forever."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                _post(cmd.loop, cmd.stream._resolve, EngineDeadError("the engine has stopped"))
            elif isinstance(cmd, tuple) and cmd[0] == "call":
                cmd[2].set_exception(EngineDeadError("the engine has stopped"))

    def _take_snapshot(self) -> EngineSnapshot:
        e = self.engine
        bm = e.block_manager
        return EngineSnapshot(
            running=e.scheduler.num_running,
            waiting=e.scheduler.num_waiting,
            unfinished_requests=e.num_unfinished_requests,
            used_pages=bm.num_used_pages,
            free_pages=bm.num_free_pages,
            num_pages=bm.num_pages - 1,
            kv_usage=e.kv_usage(),
            prefix_cache_hit_rate=e.prefix_cache_hit_rate(),
            compiled_variants=e.runner.num_compiled_variants,
            steps=e.stats.steps,
            prefill_tokens=e.stats.prefill_tokens,
            decode_tokens=e.stats.decode_tokens,
            time=time.monotonic(),
        )


def warm_up(
    engine: LLMEngine, prompt_len: int = 8, max_tokens: int = 2, full: bool = False
) -> float:
    """Compile step shapes before serving by running throw-away requests to completion; call on
    the engine thread. Always: prefill and decode of one row, greedy and sampled. `full` (what
    the server does on accelerators, like vLLM capturing its CUDA graphs for every batch size):
    also every decode batch bucket up to max_num_seqs and every prefill token bucket (fresh and,
    with cuDNN prefill, mixed with a decode and one chunk over a cached prefix), greedy and
    sampled, so no request waits on a compile later (penalties and logprobs variants, and
    prefix-prefill steps of more rows or a larger prefix bucket, still compile on first use).
    Returns seconds."""
    t0 = time.perf_counter()
    vocab = engine.model_config.vocab_size
    ids = [min(100 + i, vocab - 1) for i in range(prompt_len)]
    greedy = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
    )
    sampled = SamplingParams(
        temperature=1.0, max_tokens=max_tokens, seed=0, ignore_eos=True, detokenize=False
    )
    Group = list[tuple[list[int], SamplingParams]]
    # Each job: groups of requests, the first added at once, each next one a step later.
    jobs: list[list[Group]] = [[[(ids, greedy)]], [[(ids, sampled)]]]
    if full:
        runner, cfg = engine.runner, engine.config
        longest = cfg.max_model_len - max_tokens
        rows = [1 << k for k in range(cfg.max_num_seqs.bit_length()) if 1 << k < cfg.max_num_seqs]
        # Multi-step decode launches (num_scheduler_steps > 1) compile their own variant per row
        # bucket: decode long enough for one.
        steps = cfg.num_scheduler_steps
        for k, sp in enumerate((greedy, sampled)):
            dec = sp if steps == 1 else dataclasses.replace(sp, max_tokens=max_tokens + steps)
            for n in [*rows, cfg.max_num_seqs]:  # decode-only steps of n rows (every row bucket)
                jobs.append([[([100 + i % 1000], dec) for i in range(n)]])
            for t in runner.token_buckets:
                t = min(t, cfg.max_num_batched_tokens)
                jobs.append([_prompts(t, t + 20011 * k, longest, vocab, sp)])
                if runner.cudnn_prefill and t > 1:  # a decode beside t - 1 prompt tokens
                    decode = dataclasses.replace(sp, max_tokens=3)
                    rest = _prompts(t - 1, t + 7919 + 20011 * k, longest, vocab, sp)
                    jobs.append([[([100], decode)], rest])
                if runner.cudnn_prefill and t > 1 and longest > 2:
                    jobs.append([_prefix_chunk(t, t + 3571 + 20011 * k, cfg, longest, vocab, sp)])
    for b, job in enumerate(jobs):
        for g, group in enumerate(job):
            for r, (prompt, params) in enumerate(group):
                engine.add_request(f"__warmup-{b}-{g}-{r}", None, prompt, params)
            engine.step()
        while engine.has_unfinished_requests():
            engine.step()
    return time.perf_counter() - t0


def _prefix_chunk(
    t: int, tag: int, cfg: EngineConfig, longest: int, vocab: int, params: SamplingParams
) -> list:
    """One group whose second step is a prefix-prefill step of one row: a chunk of t tokens (at
    most longest - 1) over a one-token cached prefix (the smallest prefix bucket). Prompts of
    max_num_batched_tokens - 1 tokens that sample once and finish take the first step's budget
    but one token, which starts the last prompt; its remaining t tokens are the second step."""
    once = dataclasses.replace(params, max_tokens=1)
    fill = _prompts(cfg.max_num_batched_tokens - 1, tag, longest, vocab, once)
    ((chunk, _),) = _prompts(1 + min(t, longest - 1), tag + 1, longest, vocab, params)
    return [*fill, (chunk, params)]


def _prompts(total: int, tag: int, longest: int, vocab: int, params: SamplingParams) -> list:
    """Prompts of at most `longest` tokens adding up to `total`, with tokens no other warm-up
    prompt shares (a prefix-cache hit would shrink the step)."""
    lens = [longest] * (total // longest) + ([total % longest] if total % longest else [])
    return [
        ([(100 + 131 * tag + 7 * r + j) % vocab for j in range(k)], params)
        for r, k in enumerate(lens)
    ]


def _detach(out: RequestOutput) -> RequestOutput:
    """Copy the lists the engine keeps appending to (logprobs), so the loop reads a stable view."""
    if all(o.logprobs is None for o in out.outputs):
        return out
    outs = [
        dataclasses.replace(o, logprobs=None if o.logprobs is None else list(o.logprobs))
        for o in out.outputs
    ]
    return dataclasses.replace(out, outputs=outs)


def _aborted_output(request_id: str) -> RequestOutput:
    from rtpjax.engine.outputs import CompletionOutput, RequestMetrics

    return RequestOutput(
        request_id,
        None,
        [],
        None,
        [CompletionOutput(0, "", [], None, None, "abort")],
        True,
        RequestMetrics(arrival_time=time.monotonic()),
    )


def _deliver_all(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in items:
        stream._deliver(out)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> None:
    # A closed loop raises RuntimeError: its caller is gone and nobody is listening any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)
