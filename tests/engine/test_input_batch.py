"""InputBatch: the per-slot state a step gathers (page-table rows, sampling rows, flags) equals
what each sequence's own pages and SamplingParams say, however sequences come, go, grow pages and
are re-admitted."""

from __future__ import annotations

import random

import numpy as np

from rtpjax.engine.input_batch import InputBatch
from rtpjax.engine.sequence import Sequence
from rtpjax.sampling_params import SamplingParams

EOS = frozenset({2})
PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_k=20, seed=1),
    SamplingParams(temperature=1.0, top_p=0.9, presence_penalty=0.5),
    SamplingParams(temperature=0.0, logprobs=3),
    SamplingParams(temperature=0.8, min_tokens=2, stop_token_ids=[7], logit_bias={5: 1.0}),
]


def expected_flags(p: SamplingParams) -> list[bool]:
    return [
        not p.is_greedy(),
        p.uses_top_k_top_p(),
        p.uses_penalties(),
        bool(p.min_tokens or p.logit_bias),
        p.logprobs is not None,
    ]


def test_gathered_rows_match_each_sequence_through_churn():
    rng = random.Random(0)
    P = 12
    batch = InputBatch(P, EOS, capacity=2)  # small: slots grow while sequences are live
    live: dict[int, tuple[Sequence, SamplingParams]] = {}
    dirty: set[int] = set()  # sequences whose pages changed since their row was last written
    next_page = 1
    for step in range(300):
        if len(live) < 2 or rng.random() < 0.3:
            p = rng.choice(PARAMS)
            q = Sequence("r", [1, 2, 3], max_tokens=50, params=p)
            batch.add(q.seq_id, p, seed=q.seq_id)
            live[q.seq_id] = (q, p)
        if len(live) > 2 and rng.random() < 0.25:
            seq_id = rng.choice(sorted(live))
            batch.remove(seq_id)
            del live[seq_id]
        for q, _ in live.values():
            r = rng.random()
            if r < 0.1 or not q.num_admissions:  # (re-)admission: a whole new row
                q.num_admissions += 1
                q.page_ids = list(range(next_page, next_page + rng.randrange(1, 4)))
                next_page += 4
                dirty.add(q.seq_id)
            elif r < 0.4 and len(q.page_ids) < P:  # a page boundary crossed
                q.page_ids += [next_page]
                next_page += 1
                dirty.add(q.seq_id)
        step_seqs = rng.sample([q for q, _ in live.values()], rng.randrange(1, len(live) + 1))
        if step % 2:  # told which rows changed (as the scheduler tells), or finding out itself
            paged = [q for q in step_seqs if q.seq_id in dirty]
            slots = batch.slots_of([q.seq_id for q in step_seqs], paged)
        else:
            slots = batch.slots(step_seqs)
        dirty -= {q.seq_id for q in step_seqs}
        for q, s in zip(step_seqs, slots):
            row = batch.page_table[s]
            assert list(row[: len(q.page_ids)]) == q.page_ids, step
        rows = len(step_seqs) + 3
        steps = np.zeros(len(step_seqs), np.int32)
        t = batch.sampling(slots, steps, rows)
        params = [live[q.seq_id][1] for q in step_seqs]
        for i, p in enumerate(params):
            greedy = p.is_greedy()
            assert t.temperature[i] == np.float32(0.0 if greedy else p.temperature)
            assert t.top_p[i] == np.float32(1.0 if greedy else p.top_p)
            assert t.top_k[i] == (0 if greedy else max(p.top_k, 0))
            assert t.presence_penalty[i] == np.float32(p.presence_penalty)
            assert t.seed[i] == step_seqs[i].seq_id
        n = len(step_seqs)
        # Padding rows: greedy no-ops.
        assert (t.temperature[n:] == 0).all() and (t.top_p[n:] == 1).all()
        assert (t.repetition_penalty[n:] == 1).all() and (t.top_k[n:] == 0).all()
        assert (t.suppress[n:] == -1).all() and (t.bias_ids[n:] == -1).all()
        for i, p in enumerate(params):  # min_tokens > 0 at step 0: its stop ids and EOS masked
            want = sorted(set(p.stop_token_ids) | EOS) if p.min_tokens else []
            assert [x for x in t.suppress[i] if x >= 0] == want
            assert [x for x in t.bias_ids[i] if x >= 0] == sorted(p.logit_bias or {})
        want = np.array([expected_flags(p) for p in params]).any(axis=0)
        assert list(batch.any_flag(slots)) == list(want), step
    assert not batch.any_flag(np.zeros(0, np.int32)).any()


def test_any_flag_reads_rows_only_when_live_sequences_differ():
    batch = InputBatch(4, EOS)
    greedy, sampled = PARAMS[0], PARAMS[1]
    for i in range(3):
        batch.add(i, greedy, seed=0)
    batch.add(3, sampled, seed=0)
    slots = batch.slots([Sequence("r", [1], max_tokens=2, seq_id=i) for i in range(3)])
    assert not batch.any_flag(slots)[0]  # the one sampled sequence is live but not in the step
    batch.remove(3)
    assert not batch.any_flag(slots).any()
    for i in range(3):
        batch.remove(i)
    batch.add(4, sampled, seed=0)
    slots = batch.slots([Sequence("r", [1], max_tokens=2, seq_id=4)])
    assert list(batch.any_flag(slots)) == [True, True, False, False, False]
