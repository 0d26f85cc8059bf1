"""Scheduler: one deterministic test per rule (budget, chunks, order, preemption, async, cache)."""

import pytest

from rtpjax.engine.block_manager import BlockManager
from rtpjax.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from rtpjax.engine.sequence import FinishReason, Sequence, SequenceStatus


def make(num_pages: int = 64, page_size: int = 4, caching: bool = True, **cfg) -> Scheduler:
    cfg.setdefault("max_model_len", 64)
    bm = BlockManager(num_pages, page_size, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(page_size=page_size, **cfg), bm)


def seq(prompt, max_tokens: int = 8, request_id: str = "r", **kw) -> Sequence:
    tokens = list(range(100, 100 + prompt)) if isinstance(prompt, int) else list(prompt)
    return Sequence(request_id, tokens, max_tokens=max_tokens, **kw)


def step(s: Scheduler, token: int = 5):
    """A synchronous step: schedule, then return a token for every sampling chunk."""
    out = s.schedule()
    s.update({c.seq.seq_id: [token] for c in out.chunks if c.samples})
    return out


def spans(out) -> list[tuple[int, int, int, bool, bool]]:
    return [(c.seq.seq_id, c.start, c.num_tokens, c.samples, c.from_device) for c in out.chunks]


def test_budget_mixes_decodes_and_prefill_chunks():
    s = make(max_num_batched_tokens=10)
    short = [seq(2) for _ in range(3)]
    for q in short:
        s.add(q)
    out = step(s)
    assert [(c.start, c.num_tokens, c.samples) for c in out.chunks] == [(0, 2, True)] * 3
    long = seq(20)
    s.add(long)
    a, b, c = (q.seq_id for q in short)
    out = step(s)
    assert spans(out) == [
        (a, 2, 1, True, False),
        (b, 2, 1, True, False),
        (c, 2, 1, True, False),
        (long.seq_id, 0, 7, False, False),
    ]
    assert out.num_batched_tokens == 10 and long.num_pending == 0
    assert spans(step(s))[3] == (long.seq_id, 7, 7, False, False)
    assert spans(step(s))[3] == (long.seq_id, 14, 6, True, False)
    assert long.output_token_ids == [5] and long.num_computed_tokens == 20


def test_budget_exhausted_by_running_leaves_others_for_next_step():
    s = make(max_num_batched_tokens=3)
    qs = [seq(1) for _ in range(5)]
    for q in qs:
        s.add(q)
    out = step(s)
    assert [c.seq for c in out.chunks] == qs[:3] and s.num_waiting == 2
    out = step(s)  # the three decodes use the whole budget
    assert [c.seq for c in out.chunks] == qs[:3] and s.num_waiting == 2


def test_long_prefill_threshold_caps_chunks():
    s = make(max_num_batched_tokens=100, long_prefill_token_threshold=3)
    q = seq(10)
    s.add(q)
    got = [spans(step(s))[0][1:4] for _ in range(4)]
    assert got == [(0, 3, False), (3, 3, False), (6, 3, False), (9, 1, True)]


def test_chunked_prefill_disabled_schedules_whole_prompts():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_model_len=32, max_num_batched_tokens=16, enable_chunked_prefill=False)
    s = make(max_model_len=16, max_num_batched_tokens=16, enable_chunked_prefill=False)
    a, b = seq(10, max_tokens=2), seq(range(10), max_tokens=2)
    s.add(a)
    s.add(b)
    assert spans(step(s)) == [(a.seq_id, 0, 10, True, False)]  # b's 10 do not fit in 6
    assert spans(step(s)) == [(a.seq_id, 10, 1, True, False), (b.seq_id, 0, 10, True, False)]


def test_fcfs_order_and_max_num_seqs():
    s = make(max_num_seqs=2)
    a, b, c = seq(3), seq(3), seq(3)
    for q in (a, b, c):
        s.add(q)
    assert [ch.seq for ch in step(s).chunks] == [a, b]
    assert s.num_running == 2 and s.num_waiting == 1 and c.status is SequenceStatus.WAITING
    s.finish(a, FinishReason.STOP)
    assert [ch.seq for ch in step(s).chunks] == [b, c]


def test_priority_order_admission_and_running():
    s = make(max_num_seqs=2, policy="priority")
    a = seq(3, priority=2, arrival_time=0.0)
    b = seq(3, priority=0, arrival_time=1.0)
    c = seq(3, priority=1, arrival_time=2.0)
    d = seq(3, priority=1, arrival_time=1.5)
    for q in (a, b, c, d):
        s.add(q)
    assert [ch.seq for ch in step(s).chunks] == [b, d]  # lower value first; ties by arrival
    s.finish(b, FinishReason.STOP)
    assert [ch.seq for ch in step(s).chunks] == [d, c]
    assert s.waiting == [a]


def test_preemption_evicts_last_admitted_and_recomputes():
    # 4 usable pages of 2 tokens; a and b hold 2 pages each after their prompts.
    s = make(num_pages=5, page_size=2, caching=False, max_model_len=8)
    a, b = seq(3, max_tokens=4), seq(3, max_tokens=4)
    s.add(a)
    s.add(b)
    step(s, token=1)  # prefills; each now has 4 tokens, 3 computed
    out = step(s, token=2)  # position 3 still fits in each second page
    assert not out.preempted and s.block_manager.num_free_pages == 0
    out = s.schedule()  # a needs a page for position 4: b, the last admitted, is preempted
    assert out.preempted == [b] and spans(out) == [(a.seq_id, 4, 1, True, False)]
    assert b.status is SequenceStatus.WAITING and s.waiting == [b] and s.running == [a]
    assert b.page_ids == [] and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.output_token_ids == [1, 2]  # outputs are kept and recomputed later
    s.update({a.seq_id: [3]})
    step(s, token=4)  # a reaches max_tokens and frees its pages
    assert a.finish_reason is FinishReason.LENGTH and a.page_ids == []
    out = s.schedule()
    assert spans(out) == [(b.seq_id, 0, 5, True, False)]  # prompt + both outputs recomputed
    assert b.all_token_ids[:5] == [100, 101, 102, 1, 2]
    assert b.num_cached_tokens == 0 and b.num_preemptions == 1


def test_preemption_of_the_sequence_being_scheduled():
    s = make(num_pages=5, page_size=2, caching=False, max_model_len=8)
    a, b = seq(4, max_tokens=3), seq(2, max_tokens=3)
    s.add(a)
    s.add(b)
    step(s)  # a: 2 pages (positions 0-3), b: 1 page; 1 page left
    out = step(s)  # a takes the last page (position 4); b needs one for position 2: own victim
    assert out.preempted == [b] and [c.seq for c in out.chunks] == [a]
    assert s.running == [a] and s.waiting == [b]


def test_priority_preemption_victim_is_lowest_priority():
    s = make(num_pages=7, page_size=2, caching=False, max_model_len=8, policy="priority")
    low = seq(3, max_tokens=4, priority=5, arrival_time=0.0)
    s.add(low)
    step(s)
    hi = seq(4, max_tokens=4, priority=0, arrival_time=1.0)
    mid = seq(4, max_tokens=4, priority=1, arrival_time=2.0)
    s.add(mid)
    s.add(hi)
    step(s)  # all 6 pages in use; running in priority order
    assert s.running == [hi, mid, low]
    out = step(s)  # hi needs a page at position 4: low goes although mid was admitted last
    assert out.preempted == [low] and [c.seq for c in out.chunks] == [hi, mid]


def test_async_decode_takes_the_pending_token_from_device():
    s = make()
    q = seq(4, max_tokens=3)
    s.add(q)
    assert spans(s.schedule()) == [(q.seq_id, 0, 4, True, False)] and q.num_pending == 1
    # Step 1 is scheduled before step 0's token is back: its input is that token.
    assert spans(s.schedule()) == [(q.seq_id, 4, 1, True, True)] and q.num_pending == 2
    assert s.schedule().chunks == []  # the next input would be a second unknown token
    s.update({q.seq_id: [7]})
    assert q.output_token_ids == [7] and q.num_pending == 1
    assert spans(s.schedule()) == [(q.seq_id, 5, 1, True, True)]
    s.update({q.seq_id: [8]})
    # The pending token is the third and last output: it is never fed back.
    assert s.schedule().chunks == [] and q.num_computed_tokens == 6
    up = s.update({q.seq_id: [9]})
    assert up.finished == [q] and q.finish_reason is FinishReason.LENGTH
    assert q.output_token_ids == [7, 8, 9] and not s.has_work()


def test_async_preempted_sequence_waits_for_its_token():
    s = make(num_pages=5, page_size=2, caching=False, max_model_len=8)
    a, b = seq(3, max_tokens=5, request_id="a"), seq(3, max_tokens=5, request_id="b")
    s.add(a)
    s.add(b)
    s.schedule()  # prefills, 4 pages used
    s.schedule()  # both decode their device token at position 3
    s.update({a.seq_id: [1], b.seq_id: [1]})
    out = s.schedule()  # a's device token at position 4 needs a page: b is preempted
    assert out.preempted == [b] and b.num_pending == 1
    s.abort("a")
    assert s.block_manager.num_free_pages == 4
    assert s.schedule().chunks == []  # pages are free, but b's token is still on the device
    up = s.update({a.seq_id: [2], b.seq_id: [2]})
    assert up.updated == [b] and a.output_token_ids == [1]  # a's late token is dropped
    assert spans(s.schedule()) == [(b.seq_id, 0, 5, True, False)]


def test_prefix_hit_on_admission():
    s = make(page_size=4)
    a = seq(10, max_tokens=1)
    s.add(a)
    step(s)
    assert a.is_finished
    b = seq([*range(100, 108), 1, 2, 3])
    s.add(b)
    out = s.schedule()
    assert b.num_cached_tokens == 8 and spans(out) == [(b.seq_id, 8, 3, True, False)]
    assert s.block_manager.prefix_hit_tokens == 8
    assert s.block_manager.prefix_queried_tokens == 10 + 11


def test_full_prompt_hit_drops_last_page():
    s = make(page_size=4)
    a = seq(8, max_tokens=1)
    s.add(a)
    step(s)
    pages = s.block_manager.match_prefix([*range(100, 108), 0])
    assert len(pages) == 2
    b = seq(8)
    s.add(b)
    out = s.schedule()
    assert spans(out) == [(b.seq_id, 4, 4, True, False)] and b.num_cached_tokens == 4
    assert b.page_ids[0] == pages[0] and b.page_ids[1] != pages[1]


def test_only_full_computed_known_pages_are_registered():
    s = make(page_size=4)
    bm = s.block_manager
    q = seq(6)
    s.add(q)
    step(s)
    assert bm.num_cached_pages == 1  # positions 4-5 fill half a page
    step(s)  # computes position 6
    assert bm.num_cached_pages == 1
    s.schedule()  # computes position 7: page 2 is full and all its tokens known
    assert bm.num_cached_pages == 2


def test_page_completed_by_device_token_registers_after_update():
    s = make(page_size=4)
    bm = s.block_manager
    q = seq(7, max_tokens=4)
    s.add(q)
    s.schedule()  # 7 prompt tokens computed
    s.schedule()  # position 7 computed from the device: its id is not known yet
    assert q.num_computed_tokens == 8 and bm.num_cached_pages == 1
    s.update({q.seq_id: [42]})
    assert bm.num_cached_pages == 2
    probe = [*range(100, 107), 42, 0]
    assert bm.match_prefix(probe) == q.page_ids[:2]
    assert bm.match_prefix([*range(100, 107), 41, 0]) == q.page_ids[:1]


def test_extra_hash_keys_separate_adapters_and_salts():
    s = make(page_size=4)
    a = seq(9, max_tokens=1, extra_hash_keys=("lora-1",))
    s.add(a)
    step(s)
    other = seq(9, extra_hash_keys=("lora-2",))
    salted = seq(9, extra_hash_keys=("lora-1", "salt"))
    same = seq(9, extra_hash_keys=("lora-1",))
    for q in (other, salted, same):
        s.add(q)
    s.schedule()
    assert (other.num_cached_tokens, salted.num_cached_tokens, same.num_cached_tokens) == (0, 0, 8)


def test_stop_rules():
    s = make()
    eos = seq(2, stop_token_ids=[0])
    ignore = seq(2, stop_token_ids=[0], ignore_eos=True, user_stop_token_ids=[9])
    min_tok = seq(2, stop_token_ids=[0], min_tokens=2)
    length = seq(2, max_tokens=2)
    multi = seq(2, stop_token_ids=[0])
    for q in (eos, ignore, min_tok, length, multi):
        s.add(q)
    s.schedule()
    up = s.update({q.seq_id: [0] for q in (eos, ignore, min_tok, length)} | {multi.seq_id: [3]})
    assert up.finished == [eos] and eos.finish_reason is FinishReason.STOP
    assert eos.output_token_ids == [0]  # the EOS id is kept; detokenisation hides it
    assert len(up.updated) == 5
    s.schedule()
    up = s.update(
        {ignore.seq_id: [9], min_tok.seq_id: [0], length.seq_id: [0]} | {multi.seq_id: [4, 0, 6]}
    )
    assert set(up.finished) == {ignore, length, multi}
    assert ignore.finish_reason is FinishReason.STOP  # the request's own stop id still counts
    assert length.finish_reason is FinishReason.LENGTH and length.output_token_ids == [0, 0]
    assert multi.output_token_ids == [3, 4, 0]  # tokens after the stop are dropped
    assert not min_tok.is_finished  # EOS at output index 1 < min_tokens=2
    s.schedule()
    s.update({min_tok.seq_id: [0]})
    assert min_tok.finish_reason is FinishReason.STOP and min_tok.output_token_ids == [0, 0, 0]


def test_stop_fields_default_from_params():
    class Params:
        min_tokens = 3
        ignore_eos = True
        stop_token_ids = (7,)

    q = seq(2, params=Params(), stop_token_ids=[0])
    assert (q.min_tokens, q.ignore_eos, q.user_stop_token_ids) == (3, True, frozenset({7}))


def test_abort_any_state_frees_pages_and_drops_late_tokens():
    s = make(max_num_seqs=2)
    r1 = [seq(5, request_id="r1"), seq(5, request_id="r1")]
    r2 = seq(5, request_id="r2")
    for q in (*r1, r2):
        s.add(q)
    s.schedule()  # r1's two sequences run, r2 waits
    assert s.abort("r1") == r1 and s.abort("r1") == []
    assert all(q.finish_reason is FinishReason.ABORT and q.page_ids == [] for q in r1)
    assert s.block_manager.num_used_pages == 0
    up = s.update({q.seq_id: [1] for q in r1})
    assert up == ([], []) and r1[0].output_token_ids == []
    assert s.abort(r2.seq_id) == [r2] and not s.has_work()
    assert s.abort(12345) == []
    with pytest.raises(ValueError, match="no sampled token in flight"):
        s.update({r1[0].seq_id: [1]})


def test_finish_by_caller_frees_pages_at_once():
    s = make()
    q = seq(6)
    s.add(q)
    step(s)
    s.finish(q, FinishReason.STOP)
    assert q.is_finished and q.page_ids == [] and s.block_manager.num_used_pages == 0
    assert s.num_running == 0 and not s.has_work()


def test_add_rejects_bad_sequences():
    s = make(max_model_len=16)
    with pytest.raises(ValueError, match="tokens"):
        s.add(seq([]))
    with pytest.raises(ValueError, match="max_model_len=16"):
        s.add(seq(17, max_tokens=1))
    with pytest.raises(ValueError, match="clamp max_tokens"):
        s.add(seq(10, max_tokens=7))
    with pytest.raises(ValueError, match="max_tokens"):
        s.add(seq(10, max_tokens=0))
    q = seq(4)
    s.add(q)
    with pytest.raises(ValueError, match="already scheduled"):
        s.add(q)


def test_config_and_pool_validation():
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(policy="lifo")
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        SchedulerConfig(long_prefill_token_threshold=-1)
    with pytest.raises(ValueError, match="num_pages=4 is too small"):
        Scheduler(SchedulerConfig(max_model_len=16, page_size=4), BlockManager(4, 4))
    with pytest.raises(ValueError, match="page_size"):
        Scheduler(SchedulerConfig(max_model_len=16, page_size=4), BlockManager(64, 8))


def test_chunk_is_a_named_tuple():
    s = make()
    q = seq(3)
    s.add(q)
    (chunk,) = s.schedule().chunks
    assert chunk == ScheduledChunk(q, 0, 3, True, False) and chunk.seq is q
