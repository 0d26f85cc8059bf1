"""Scheduler + BlockManager driven by a fake device over random workloads (hypothesis).

The fake device keeps its own KV pages (token ids written at each position) and its own record of
every sequence's true tokens, samples random tokens (often EOS), and returns them either before the
next schedule() (synchronous) or after it (asynchronous: schedule N+1 before update N); with
num_steps > 1 it runs multi-step decode chunks (K positions, each input the previous sample).
After every schedule() and update() the page accounting invariants hold; at the end every
sequence finished with the outputs and finish reason its stop rules demand, and every page is
free or cached with ref 0.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtpjax.engine.block_manager import BlockManager
from rtpjax.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from rtpjax.engine.sequence import FinishReason, Sequence, SequenceStatus

VOCAB = 12
EOS = 0
USER_STOP = 1
MAX_STEPS = 20_000


@dataclasses.dataclass
class Req:
    arrival_step: int
    prefix_id: int  # which shared prefix the prompt starts with
    prefix_len: int
    tail_len: int
    max_tokens: int
    min_tokens: int
    ignore_eos: bool
    user_stop: bool
    priority: int
    adapter: int  # an extra hash key: requests on different adapters never share pages
    n: int
    abort_step: int | None
    text_stop_prob: float  # chance per update that the caller ends it with a "stop string"


@dataclasses.dataclass
class Workload:
    page_size: int
    extra_pages: int  # pages beyond what one max_model_len sequence needs: small forces preemption
    max_model_len: int
    budget: int
    max_num_seqs: int
    threshold: int
    chunked: bool
    policy: str
    caching: bool
    asynchronous: bool
    reqs: list[Req]
    seed: int
    num_steps: int = 1  # schedule(num_steps): multi-step decode when > 1


@st.composite
def workloads(draw, max_reqs: int = 8) -> Workload:
    page_size = draw(st.sampled_from([1, 2, 3, 4, 8]))
    max_model_len = draw(st.integers(8, 48))
    chunked = draw(st.booleans())
    if chunked:
        budget = draw(st.integers(1, 64))
        threshold = draw(st.sampled_from([0, 0, 1, 3, 7]))
    else:
        budget = draw(st.integers(max_model_len, max_model_len + 16))
        threshold = 0
    reqs = []
    for _ in range(draw(st.integers(1, max_reqs))):
        prefix_len = draw(st.integers(0, max_model_len - 1))
        tail_len = draw(st.integers(0 if prefix_len else 1, max_model_len - prefix_len))
        prompt_len = prefix_len + tail_len
        if prompt_len >= max_model_len:
            tail_len -= prompt_len - max_model_len + 1
            prompt_len = prefix_len + tail_len
        max_tokens = draw(st.integers(1, max_model_len - prompt_len))
        reqs.append(
            Req(
                arrival_step=draw(st.integers(0, 30)),
                prefix_id=draw(st.integers(0, 2)),
                prefix_len=prefix_len,
                tail_len=tail_len,
                max_tokens=max_tokens,
                min_tokens=draw(st.integers(0, max_tokens)),
                ignore_eos=draw(st.booleans()),
                user_stop=draw(st.booleans()),
                priority=draw(st.integers(0, 3)),
                adapter=draw(st.integers(0, 1)),
                n=draw(st.integers(1, 2)),
                abort_step=draw(st.none() | st.integers(0, 60)),
                text_stop_prob=draw(st.sampled_from([0.0, 0.0, 0.1])),
            )
        )
    return Workload(
        page_size=page_size,
        extra_pages=draw(st.integers(0, 6)),
        max_model_len=max_model_len,
        budget=budget,
        max_num_seqs=draw(st.integers(1, 6)),
        threshold=threshold,
        chunked=chunked,
        policy=draw(st.sampled_from(["fcfs", "priority"])),
        caching=draw(st.booleans()),
        asynchronous=draw(st.booleans()),
        reqs=reqs,
        seed=draw(st.integers(0, 2**32 - 1)),
        num_steps=draw(st.sampled_from([1, 1, 3])),
    )


class FakeDevice:
    """Writes token ids into its own KV pages and samples random tokens, checking every chunk."""

    def __init__(self, num_pages: int, page_size: int, rng: random.Random) -> None:
        self.kv = np.full((num_pages, page_size), -1, dtype=np.int64)  # i64[P, page_size]
        self.page_size = page_size
        self.rng = rng
        self.truth: dict[int, list[int]] = {}  # seq_id -> prompt + every token sampled for it

    def run(self, out: SchedulerOutput) -> dict[int, list[int]]:
        """{seq_id: sampled tokens}; a multi-step chunk's list holds its num_steps tokens."""
        ps = self.page_size
        sampled: dict[int, list[int]] = {}
        for chunk in out.chunks:
            seq = chunk.seq
            truth = self.truth.setdefault(seq.seq_id, list(seq.prompt_token_ids))
            end = chunk.start + chunk.num_tokens
            assert seq.status is SequenceStatus.RUNNING and chunk.num_tokens >= 1
            assert 0 not in seq.page_ids and len(seq.page_ids) * ps >= end
            if chunk.num_steps > 1:
                assert chunk.samples and chunk.num_tokens == 1 and chunk.start == len(truth) - 1
                assert len(seq.page_ids) * ps >= chunk.start + chunk.num_steps
                if chunk.from_device:  # its input: the newest sample, unknown to the host
                    assert seq.num_tokens <= chunk.start
                else:  # its input: the newest known token
                    assert seq.num_tokens == chunk.start + 1
                    assert seq.all_token_ids[chunk.start] == truth[chunk.start]
                sampled[seq.seq_id] = tokens = []
                for pos in range(chunk.start, chunk.start + chunk.num_steps):
                    self.kv[seq.page_ids[pos // ps], pos % ps] = truth[pos]
                    got = [int(self.kv[seq.page_ids[p // ps], p % ps]) for p in range(pos + 1)]
                    assert got == truth[: pos + 1], f"KV of seq {seq.seq_id} is corrupt"
                    tokens.append(EOS if self.rng.random() < 0.08 else self.rng.randrange(VOCAB))
                    truth.append(tokens[-1])
                continue
            if chunk.from_device:
                # The input token not yet known to the host: the newest device sample (behind a
                # multi-step chunk, the host may not know its earlier samples either).
                assert chunk.num_tokens == 1 and chunk.start == len(truth) - 1
                assert seq.num_tokens <= chunk.start
            else:
                assert end <= seq.num_tokens
                assert seq.all_token_ids[chunk.start : end] == truth[chunk.start : end]
            for pos in range(chunk.start, end):
                self.kv[seq.page_ids[pos // ps], pos % ps] = truth[pos]
            # Every position up to here (prefix-cache hits included) holds this sequence's tokens.
            got = [int(self.kv[seq.page_ids[p // ps], p % ps]) for p in range(end)]
            assert got == truth[:end], f"KV of seq {seq.seq_id} is corrupt"
            if chunk.samples:
                assert end == len(truth)  # samples only at the newest position
                token = EOS if self.rng.random() < 0.08 else self.rng.randrange(VOCAB)
                truth.append(token)
                sampled[seq.seq_id] = [token]
        return sampled


def check_invariants(
    s: Scheduler, seqs: list[Sequence], asynchronous: bool, num_steps: int = 1
) -> None:
    bm = s.block_manager
    bm.check_invariants()
    holders = [0] * bm.num_pages
    assert len(s.running) <= s.config.max_num_seqs
    for q in seqs:
        if q.status is SequenceStatus.RUNNING:
            assert q in s.running
            assert len(q.page_ids) == -(-q.num_computed_tokens // bm.page_size)
            assert len(set(q.page_ids)) == len(q.page_ids)
            for p in q.page_ids:
                holders[p] += 1
            assert q.num_computed_tokens <= q.num_tokens + q.num_pending - 1
        else:
            assert q.page_ids == []
            if q.status is SequenceStatus.WAITING:
                assert q in s.waiting and q.num_computed_tokens == 0
        # At most one token the host does not know is ever an input (a multi-step chunk's
        # inputs past its first are its own samples).
        if num_steps == 1:
            assert q.num_computed_tokens <= q.num_tokens + 1
        assert 0 <= q.num_pending <= (2 if asynchronous else 1) * num_steps
        assert q.num_output_tokens <= q.max_tokens
    for p in range(1, bm.num_pages):
        assert bm.ref_count(p) == holders[p], f"page {p}: ref {bm.ref_count(p)} != {holders[p]}"
        if holders[p] > 1:
            assert bm.is_cached(p), f"page {p} is shared but not through the cache"
    assert sorted(q.seq_id for q in s.running + s.waiting) == sorted(
        q.seq_id for q in seqs if not q.is_finished
    )


def expected_outputs(q: Sequence, sampled: list[int]) -> tuple[list[int], FinishReason]:
    """What the host stop rules must make of the device's samples for this sequence."""
    for i, token in enumerate(sampled):
        stops = (token == USER_STOP and USER_STOP in q.user_stop_token_ids) or (
            token == EOS and not q.ignore_eos
        )
        if stops and i >= q.min_tokens:
            return sampled[: i + 1], FinishReason.STOP
        if i + 1 == q.max_tokens:
            return sampled[: i + 1], FinishReason.LENGTH
    raise AssertionError(f"seq {q.seq_id} finished before its stop rules allow")


def run_workload(wl: Workload) -> tuple[Scheduler, list[Sequence]]:
    rng = random.Random(wl.seed)
    num_pages = -(-wl.max_model_len // wl.page_size) + 1 + wl.extra_pages
    bm = BlockManager(num_pages, wl.page_size, enable_prefix_caching=wl.caching)
    cfg = SchedulerConfig(
        max_num_seqs=wl.max_num_seqs,
        max_num_batched_tokens=wl.budget,
        max_model_len=wl.max_model_len,
        page_size=wl.page_size,
        long_prefill_token_threshold=wl.threshold,
        enable_chunked_prefill=wl.chunked,
        policy=wl.policy,
    )
    s = Scheduler(cfg, bm)
    device = FakeDevice(num_pages, wl.page_size, rng)
    prefixes = [[rng.randrange(2, VOCAB) for _ in range(wl.max_model_len)] for _ in range(3)]
    seqs: list[Sequence] = []
    req_of: dict[int, Req] = {}
    text_stopped: set[int] = set()
    inflight: dict[int, list[int]] | None = None

    for step in range(MAX_STEPS):
        for r_idx, r in enumerate(wl.reqs):
            if r.arrival_step == step:
                prompt = prefixes[r.prefix_id][: r.prefix_len]
                prompt += [rng.randrange(2, VOCAB) for _ in range(r.tail_len)]
                for _ in range(r.n):
                    q = Sequence(
                        f"req-{r_idx}",
                        prompt,
                        max_tokens=r.max_tokens,
                        arrival_time=float(step),
                        priority=r.priority,
                        extra_hash_keys=(f"adapter-{r.adapter}",),
                        stop_token_ids=[EOS],
                        user_stop_token_ids=[USER_STOP] if r.user_stop else [],
                        min_tokens=r.min_tokens,
                        ignore_eos=r.ignore_eos,
                    )
                    s.add(q)
                    seqs.append(q)
                    req_of[q.seq_id] = r
            if r.abort_step == step:
                s.abort(f"req-{r_idx}")
        check_invariants(s, seqs, wl.asynchronous, wl.num_steps)

        out = s.schedule(wl.num_steps)
        assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks) <= wl.budget
        assert len({c.seq.seq_id for c in out.chunks}) == len(out.chunks)
        assert out.num_steps == max((c.num_steps for c in out.chunks), default=1) or (
            out.num_steps == wl.num_steps
        )
        check_invariants(s, seqs, wl.asynchronous, wl.num_steps)
        results = device.run(out)

        if wl.asynchronous:
            results, inflight = inflight, results
        if results:
            single = {i: t for i, t in results.items() if len(t) == 1}
            updated = s.update(single).updated
            for seq_id, tokens in results.items():
                if len(tokens) > 1:  # a multi-step chunk's tokens, as LLMEngine gives them
                    q = s.take_tokens(seq_id, len(tokens))
                    if q is not None:
                        for t in tokens:
                            if s.accept(q, t) is not None:
                                break
                        s.cache_new_pages(q)
                        updated.append(q)
            for q in updated:
                if not q.is_finished and rng.random() < req_of[q.seq_id].text_stop_prob:
                    s.finish(q, FinishReason.STOP)  # a stop string, decided by the caller
                    text_stopped.add(q.seq_id)
            check_invariants(s, seqs, wl.asynchronous, wl.num_steps)

        arrivals_done = step >= max(r.arrival_step for r in wl.reqs)
        if arrivals_done and not s.has_work() and not inflight:
            break
    else:
        raise AssertionError(f"not finished after {MAX_STEPS} steps: {s.running + s.waiting}")

    bm.check_invariants()
    assert bm.num_used_pages == 0 and bm.num_free_pages == num_pages - 1
    assert all(bm.ref_count(p) == 0 for p in range(num_pages))
    for q in seqs:
        assert q.is_finished and q.num_pending == 0 and s.get(q.seq_id) is None
        sampled = device.truth.get(q.seq_id, q.prompt_token_ids)[q.num_prompt_tokens :]
        assert q.output_token_ids == sampled[: q.num_output_tokens]
        if q.finish_reason is FinishReason.ABORT or q.seq_id in text_stopped:
            continue
        want, reason = expected_outputs(q, sampled)
        assert (q.output_token_ids, q.finish_reason) == (want, reason)
    return s, seqs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_invariants(wl: Workload) -> None:
    run_workload(wl)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(max_reqs=16))
def test_random_workloads_keep_invariants_long(wl: Workload) -> None:
    run_workload(wl)


def test_tiny_pool_forces_preemption_and_all_finish() -> None:
    # A fixed workload that must preempt: 8 sequences, a pool that holds about one of them.
    reqs = [Req(0, i % 3, 6, 10, 12, 0, True, False, i % 2, 0, 1, None, 0.0) for i in range(8)]
    for asynchronous in (False, True):
        wl = Workload(4, 1, 32, 16, 4, 0, True, "fcfs", True, asynchronous, reqs, seed=7)
        _, seqs = run_workload(wl)
        assert sum(q.num_preemptions for q in seqs) > 0
        assert all(q.finish_reason is FinishReason.LENGTH for q in seqs)
        assert all(q.num_output_tokens == 12 for q in seqs)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_shared_1000_token_prefix_is_served_from_cache(asynchronous: bool) -> None:
    page_size = 16
    bm = BlockManager(num_pages=256, page_size=page_size)
    s = Scheduler(SchedulerConfig(max_model_len=2048, page_size=page_size), bm)
    rng = random.Random(0)
    prefix = [rng.randrange(VOCAB) for _ in range(1000)]
    first = Sequence("a", [*prefix, 3, 4, 5], max_tokens=4)
    s.add(first)
    pending = None
    while s.has_work() or pending:
        out = s.schedule()
        results = {c.seq.seq_id: [7] for c in out.chunks if c.samples}
        if asynchronous:
            results, pending = pending, results
        if results:
            s.update(results)
    assert first.finish_reason is FinishReason.LENGTH and bm.num_used_pages == 0

    second = Sequence("b", [*prefix, 9, 9, 9, 9, 9], max_tokens=4)
    s.add(second)
    out = s.schedule()
    hit = 1000 // page_size * page_size  # 992: the page holding tokens 992-1007 differs
    assert second.num_cached_tokens == hit
    assert [(c.seq, c.start, c.num_tokens, c.samples) for c in out.chunks] == [
        (second, hit, 1005 - hit, True)
    ]
    assert out.num_batched_tokens == 13
    assert bm.prefix_hit_tokens == hit and bm.prefix_queried_tokens == 1003 + 1005
