"""AsyncLLMEngine's threading contract, with a scripted stand-in for LLMEngine (no model, fast).

Checked: every engine call happens on the one engine thread; an idle engine blocks (no steps);
validation errors and a full waiting queue reach the caller before anything runs; aborts end the
stream; shutdown drains, then aborts what is left; a failing step fails its requests only.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from rtpjax.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from rtpjax.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from rtpjax.sampling_params import SamplingParams


class FakeEngine:
    """LLMEngine's surface as AsyncLLMEngine uses it: each step gives every running request one
    token ("a"); `max_num_seqs` run at once, the rest wait; each running request holds 2 pages."""

    def __init__(self, max_num_seqs: int = 4, step_delay: float = 0.0):
        self.config = SimpleNamespace(max_num_seqs=max_num_seqs)
        self.step_delay = step_delay
        self.threads: set[int] = set()
        self.waiting: list[str] = []
        self.running: list[str] = []
        self.reqs: dict[str, tuple[SamplingParams, list[int], RequestMetrics]] = {}
        self.fail_next_step = False
        self.kinds: dict[str, str] = {}  # request id → output_kind ("final": finished only)
        self.runner = SimpleNamespace(num_compiled_variants=0)
        self.stats = SimpleNamespace(steps=0, prefill_tokens=0, decode_tokens=0)

    def _touch(self) -> None:
        self.threads.add(threading.get_ident())

    @property
    def scheduler(self):
        self._touch()
        return SimpleNamespace(num_running=len(self.running), num_waiting=len(self.waiting))

    @property
    def block_manager(self):
        self._touch()
        used = 2 * len(self.running)
        return SimpleNamespace(num_used_pages=used, num_free_pages=100 - used, num_pages=101)

    def kv_usage(self) -> float:
        return self.block_manager.num_used_pages / 100

    def prefix_cache_hit_rate(self) -> float:
        return 0.0

    @property
    def num_unfinished_requests(self) -> int:
        self._touch()
        return len(self.reqs)

    def has_unfinished_requests(self) -> bool:
        self._touch()
        return bool(self.reqs)

    def validate(self, prompt_token_ids, params) -> None:
        self._touch()
        if not prompt_token_ids:
            raise ValueError("prompt is empty: at least one token is needed")

    def add_request(
        self,
        request_id,
        prompt,
        prompt_token_ids,
        params,
        *,
        arrival_time=None,
        priority=0,
        cache_salt=None,
        output_kind="cumulative",
    ) -> None:
        self._touch()
        self.kinds[request_id] = output_kind
        self.reqs[request_id] = (params, [], RequestMetrics(arrival_time=time.monotonic()))
        self.waiting.append(request_id)

    def abort_request(self, request_id: str) -> bool:
        self._touch()
        if self.reqs.pop(request_id, None) is None:
            return False
        for q in (self.waiting, self.running):
            if request_id in q:
                q.remove(request_id)
        return True

    def step(self) -> list[RequestOutput]:
        self._touch()
        self.stats.steps += 1
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("device fell over")
        time.sleep(self.step_delay)
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            self.running.append(self.waiting.pop(0))
        outs = []
        for rid in list(self.running):
            params, tokens, metrics = self.reqs[rid]
            tokens.append(7)
            done = len(tokens) >= params.max_tokens
            if done:
                self.running.remove(rid)
                del self.reqs[rid]
            elif self.kinds.get(rid) == "final":
                continue
            outs.append(
                RequestOutput(
                    rid,
                    None,
                    [1],
                    None,
                    [
                        CompletionOutput(
                            0,
                            "a" * len(tokens),
                            list(tokens),
                            None,
                            None,
                            "length" if done else None,
                        )
                    ],
                    done,
                    metrics,
                )
            )
        return outs


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture
def fake():
    return FakeEngine()


@pytest.fixture
def engine(fake):
    e = AsyncLLMEngine(fake, max_waiting=2)
    e.start()
    yield e
    e.stop()
    e.join(5)


async def _collect(stream) -> list[RequestOutput]:
    return [o async for o in stream]


def test_outputs_arrive_and_every_call_is_on_the_engine_thread(engine, fake):
    async def main():
        streams = [
            await engine.add_request(f"r{i}", None, [1, 2], SamplingParams(max_tokens=i))
            for i in (1, 3, 5)
        ]
        return await asyncio.gather(*(_collect(s) for s in streams))

    results = _run(main())
    for n, outs in zip((1, 3, 5), results):
        assert outs[-1].finished and outs[-1].outputs[0].text == "a" * n
        assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, n + 1))
    assert fake.threads == {engine._thread.ident}
    assert threading.get_ident() not in fake.threads


def test_final_output_kind_reaches_the_engine(engine, fake):
    """Non-streaming requests ask for "final": one output, the finished one."""

    async def main():
        s = await engine.add_request(
            "f", None, [1], SamplingParams(max_tokens=4), output_kind="final"
        )
        return await _collect(s)

    outs = _run(main())
    assert fake.kinds["f"] == "final"
    assert len(outs) == 1 and outs[0].finished and outs[0].outputs[0].text == "aaaa"


def test_idle_engine_blocks_instead_of_stepping(engine, fake):
    async def main():
        s = await engine.add_request("r", None, [1], SamplingParams(max_tokens=2))
        await _collect(s)

    _run(main())
    time.sleep(0.1)
    steps = fake.stats.steps
    time.sleep(0.5)
    assert fake.stats.steps == steps  # no busy loop
    assert engine.is_running and engine.snapshot.unfinished_requests == 0


def test_validation_error_reaches_the_caller(engine, fake):
    with pytest.raises(ValueError, match="prompt is empty"):
        _run(engine.add_request("bad", None, [], SamplingParams()))
    assert fake.reqs == {}


def test_full_waiting_queue_is_refused(fake):
    fake.config.max_num_seqs = 1
    fake.step_delay = 0.002
    engine = AsyncLLMEngine(fake, max_waiting=1)
    engine.start()

    async def main():
        long = SamplingParams(max_tokens=10_000)
        a = await engine.add_request("a", None, [1], long)
        await a.__aiter__().__anext__()  # "a" holds the only running slot
        await engine.add_request("b", None, [1], long)  # one may wait
        with pytest.raises(QueueFullError, match="max_waiting_requests=1"):
            await engine.add_request("c", None, [1], long)
        engine.abort("a")
        engine.abort("b")

    _run(main())
    engine.stop()
    engine.join(5)
    assert "c" not in fake.reqs and fake.reqs == {}


def test_abort_ends_the_stream_and_frees_pages(engine, fake):
    async def main():
        s = await engine.add_request("r", None, [1], SamplingParams(max_tokens=10_000))
        it = s.__aiter__()
        await it.__anext__()
        engine.abort("r")
        rest = [o async for o in it]
        return rest[-1]

    last = _run(main())
    assert last.finished and last.outputs[0].finish_reason == "abort"
    deadline = time.monotonic() + 5
    while engine.snapshot.used_pages and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.snapshot.used_pages == 0 and fake.reqs == {}


def test_shutdown_drains_in_flight_requests(fake):
    fake.step_delay = 0.01
    engine = AsyncLLMEngine(fake)
    engine.start()

    async def main():
        s = await engine.add_request("r", None, [1], SamplingParams(max_tokens=20))
        outs = asyncio.ensure_future(_collect(s))
        aborted = await engine.shutdown(drain_timeout=10)
        with pytest.raises(EngineDeadError):
            await engine.add_request("late", None, [1], SamplingParams())
        return aborted, await outs

    aborted, outs = _run(main())
    assert aborted == 0 and outs[-1].outputs[0].finish_reason == "length"
    assert not engine.is_running


def test_shutdown_aborts_what_outlives_the_deadline(fake):
    fake.step_delay = 0.01
    engine = AsyncLLMEngine(fake)
    engine.start()

    async def main():
        s = await engine.add_request("r", None, [1], SamplingParams(max_tokens=10_000))
        outs = asyncio.ensure_future(_collect(s))
        t0 = time.monotonic()
        aborted = await engine.shutdown(drain_timeout=0.2)
        return aborted, time.monotonic() - t0, await outs

    aborted, seconds, outs = _run(main())
    assert aborted == 1 and seconds < 5
    assert outs[-1].outputs[0].finish_reason == "abort"


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine, fake):
    async def main():
        s = await engine.add_request("r", None, [1], SamplingParams(max_tokens=10_000))
        fake.fail_next_step = True
        with pytest.raises(RuntimeError, match="device fell over"):
            await _collect(s)
        s2 = await engine.add_request("r2", None, [1], SamplingParams(max_tokens=2))
        return await _collect(s2)

    outs = _run(main())
    assert outs[-1].outputs[0].text == "aa"
    assert engine.error is not None and "device fell over" in engine.error
