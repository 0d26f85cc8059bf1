"""The engine's host paths per decode step: stop strings searched over the new text only, text
joined lazily, outputs per output_kind, retirement, page allocation and prefix-cache registration
only where a page boundary is crossed.

The engine runs with its runner's prepare / execute / fetch replaced by a scripted device: each
sequence samples the next id of its script, so every case is exact and no model is compiled.
"""

from __future__ import annotations

import itertools
import random
import types

import numpy as np
import pytest

from rtpjax.engine.block_manager import BlockManager
from rtpjax.engine.engine import EngineConfig, LLMEngine
from rtpjax.engine.model_runner import StepResult
from rtpjax.engine.scheduler import Scheduler, SchedulerConfig
from rtpjax.engine.sequence import FinishReason, Sequence
from rtpjax.sampling_params import SamplingParams
from rtpjax.sharding.mesh import make_mesh
from rtpjax.tokenizer import IncrementalDetokenizer

TEXT = (
    "The quick brown fox jumps over the lazy dog. Stop here, or stop there? café 😀 naïve "
    "END of line\n\nNew paragraph: 42 + 7 = 49; <tag> and </tag>. "
)


FILLER = 300  # an id no script reaches the output with


class ScriptedDevice:
    """Stands in for the runner's device phases; sequence k of request r samples scripts[r][k]."""

    def __init__(self) -> None:
        self.scripts: dict[int, list[int]] = {}  # seq_id → ids to sample, in order
        self.sampled: dict[int, int] = {}  # seq_id → ids sampled so far

    def prepare(self, sched):
        return types.SimpleNamespace(chunks=list(sched.chunks), needs_sync=False)

    def execute(self, prepared):
        return types.SimpleNamespace(prepared=prepared)

    def fetch(self, inflight) -> StepResult:
        seq_ids, tokens, counts = [], [], []
        K = max(c.num_steps for c in inflight.prepared.chunks)
        for c in inflight.prepared.chunks:
            if c.samples:
                sid = c.seq.seq_id
                k = self.sampled.get(sid, 0)
                self.sampled[sid] = k + c.num_steps
                seq_ids.append(sid)
                script = [*self.scripts[sid], *[FILLER] * (k + K)]
                # Past its script a sequence has finished: the device, a step (or K tokens)
                # ahead, still samples for it; the host drops those tokens.
                tokens.append(script[k : k + K] if K > 1 else script[k])
                counts.append(c.num_steps)
        n = len(seq_ids)
        if K > 1:  # a multi-step step: [R, K] tokens, each row's first counts[r] valid
            return StepResult(
                seq_ids,
                np.asarray(tokens, np.int32).reshape(n, K),
                np.zeros((n, K), np.float32),
                np.zeros((n, K, 0), np.int32),
                np.zeros((n, K, 0), np.float32),
                {},
                np.asarray(counts, np.int32),
            )
        return StepResult(
            seq_ids,
            np.asarray(tokens, np.int32),  # i32[R]
            np.zeros(n, np.float32),
            np.zeros((n, 0), np.int32),
            np.zeros((n, 0), np.float32),
            {},
        )


def make_engine(tokenizer, tiny_model, **overrides) -> tuple[LLMEngine, ScriptedDevice]:
    cfg, weights = tiny_model
    kw = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=256, page_size=8)
    kw.update(overrides)
    engine = LLMEngine(
        cfg, weights, tokenizer, make_mesh(1), EngineConfig(**kw, num_pages=600), num_pages=600
    )
    device = ScriptedDevice()
    engine.runner.prepare, engine.runner.execute = device.prepare, device.execute
    engine.runner.fetch = device.fetch
    return engine, device


def add(engine, device, rid: str, scripts: list[list[int]], params: SamplingParams, **kw) -> None:
    engine.add_request(rid, None, [5, 6, 7], params, **kw)
    seqs = [q for q in engine.scheduler.waiting if q.request_id == rid]
    assert len(seqs) == len(scripts)
    for q, script in zip(seqs, scripts):
        device.scripts[q.seq_id] = script


def run(engine) -> dict[str, list]:
    """Step to the end; every output each request got, in order."""
    outs: dict[str, list] = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            return outs
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("the engine did not finish")


def reference_stop(deltas: list[str], stop: tuple[str, ...], include: bool):
    """The stop-string rule over the whole text: after each token's text, the earliest stop string
    anywhere in the text ends the sequence there. Returns (text, tokens kept, stop string)."""
    text = ""
    for n, delta in enumerate(deltas, 1):
        text += delta
        hits = [(text.find(s), s) for s in stop if s in text]
        if hits:
            j, s = min(hits, key=lambda h: h[0])
            return (text[: j + len(s)] if include else text[:j]), n, s
    return text, len(deltas), None


@pytest.mark.parametrize("steps", [1, 4])
def test_stop_strings_match_a_search_of_the_whole_text(tokenizer, tiny_model, steps):
    """steps 4: multi-step decode, tokens after a stop string within a launch are dropped."""
    rng = random.Random(0)
    pool = tokenizer.encode(TEXT, add_special_tokens=False)
    engine, device = make_engine(tokenizer, tiny_model, num_scheduler_steps=steps)
    cases = []
    for i in range(60):
        start = rng.randrange(len(pool) - 40)
        script = pool[start : start + rng.randrange(5, 40)]
        det = IncrementalDetokenizer(tokenizer, [])
        deltas = [det.add(t) for t in script]
        full = "".join(deltas)
        stop = []
        for _ in range(rng.randrange(1, 4)):
            if rng.random() < 0.7 and len(full) > 2:  # a piece of the text: spans tokens at times
                a = rng.randrange(len(full) - 1)
                stop.append(full[a : a + rng.randrange(1, 9)])
            else:
                stop.append(rng.choice(["zzz", "never there", "§"]))
        include = rng.random() < 0.5
        p = SamplingParams(
            temperature=0.0,
            max_tokens=len(script),
            ignore_eos=True,
            stop=stop,
            include_stop_str_in_output=include,
        )
        add(engine, device, f"r{i}", [script], p, output_kind="final")
        cases.append((f"r{i}", script, deltas, tuple(p.stop), include))
    outs = run(engine)
    hits = 0
    for rid, script, deltas, stop, include in cases:
        (out,) = outs[rid]  # "final": one output, at the end
        o = out.outputs[0]
        text, kept, s = reference_stop(deltas, stop, include)
        assert (o.text, o.token_ids, o.stop_reason) == (text, script[:kept], s), rid
        # A stop string completed by the max_tokens-th token still ends it with "stop" (vLLM).
        assert o.finish_reason == ("stop" if s is not None else "length"), rid
        hits += s is not None
    assert 20 <= hits < len(cases)  # both outcomes are exercised
    if steps > 1:
        assert sum(r[7] > 1 for r in engine.stats.step_log) >= 5


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind", ["cumulative", "delta", "final"])
def test_a_stop_on_the_last_allowed_token_is_reported_as_stop(tokenizer, tiny_model, kind, steps):
    """The max_tokens-th token completing a stop string, or being a stop id or EOS, ends the
    completion with finish_reason "stop" (and the string or id as stop_reason), as vLLM reports;
    only running out of tokens is "length"."""
    pool = tokenizer.encode(TEXT, add_special_tokens=False)
    eos = sorted(tokenizer.eos_token_ids)[0]
    script = pool[:8]
    text = tokenizer.decode(script)
    last = tokenizer.decode(script[-1:])
    stop_str = text[len(text) - len(last) - 2 : len(text) - 1]  # spans the last two tokens
    assert stop_str not in tokenizer.decode(script[:-1])
    stop_id = 400  # inside the tiny model's vocabulary (validated), not in the script
    assert stop_id not in script and stop_id != FILLER
    cases = {  # rid: (script, params, finish_reason, stop_reason, text)
        "str": (
            script,
            dict(stop=[stop_str]),
            "stop",
            stop_str,
            text[: text.index(stop_str)],
        ),
        "str_kept": (
            script,
            dict(stop=[stop_str], include_stop_str_in_output=True),
            "stop",
            stop_str,
            text[: text.index(stop_str) + len(stop_str)],
        ),
        "id": ([*script[:-1], stop_id], dict(stop_token_ids=[stop_id]), "stop", stop_id, None),
        "eos": ([*script[:-1], eos], dict(ignore_eos=False), "stop", None, None),
        "len": (script, dict(stop=["never there"]), "length", None, text),
    }
    engine, device = make_engine(tokenizer, tiny_model, num_scheduler_steps=steps)
    for rid, (ids, extra, *_) in cases.items():
        extra = {"ignore_eos": True, **extra}
        p = SamplingParams(temperature=0.0, max_tokens=len(ids), **extra)
        add(engine, device, rid, [ids], p, output_kind=kind)
    outs = run(engine)
    for rid, (ids, _, reason, stop_reason, want_text) in cases.items():
        got = [o.outputs[0] for o in outs[rid]]
        o = got[-1]
        if want_text is None:  # a stop id's text is not output
            want_text = tokenizer.decode(ids[:-1])
        token_ids = [t for g in got for t in g.token_ids] if kind == "delta" else o.token_ids
        assert (o.finish_reason, o.stop_reason, token_ids) == (reason, stop_reason, ids), rid
        if kind == "delta":
            # Text sent before the cut stays sent; what is reported is a prefix of the whole.
            assert "".join(g.text for g in got).startswith(want_text), rid
        else:
            assert o.text == want_text, rid


def test_output_kinds_agree_and_final_builds_one_output(tokenizer, tiny_model):
    pool = tokenizer.encode(TEXT, add_special_tokens=False)
    p = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=["stop there"])
    p2 = SamplingParams(n=2, temperature=0.0, max_tokens=30, ignore_eos=True, stop=["lazy"])
    runs = {}
    for kind in ("cumulative", "delta", "final"):
        engine, device = make_engine(tokenizer, tiny_model)
        add(engine, device, "a", [pool[:30]], p, output_kind=kind)
        add(engine, device, "b", [pool[10:40]], p, output_kind=kind)
        # Two completions: the first stops early (a stop string), the second runs to the end.
        add(engine, device, "c", [pool[:30], pool[20:50]], p2, output_kind=kind)
        runs[kind] = run(engine)
    for rid, index in (("a", 0), ("b", 0), ("c", 0), ("c", 1)):
        cumulative, delta, final = (
            [o.outputs[index] for o in runs[k][rid]] for k in ("cumulative", "delta", "final")
        )
        assert len(final) == 1 and runs["final"][rid][0].finished
        assert len(cumulative) == len(delta) > 1
        last = cumulative[-1]
        assert (last.text, last.token_ids) == (final[0].text, final[0].token_ids)
        assert last.finish_reason == final[0].finish_reason is not None
        # Deltas are sent as they come: a stop string's first tokens may have gone out before
        # the token completing it cut them from the text (the server holds such text back).
        assert "".join(o.text for o in delta).startswith(last.text)
        assert [t for o in delta for t in o.token_ids] == last.token_ids
        texts = [o.text for o in cumulative[:-1]]  # (the last may be cut)
        assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    c = runs["final"]["c"][0].outputs
    assert [o.stop_reason for o in c] == ["lazy", None]
    assert c[0].text.endswith("the ") and len(c[1].token_ids) == 30
    assert runs["final"]["a"][0].outputs[0].stop_reason == "stop there"  # pool[:30] holds it


def test_a_request_retires_when_its_last_completion_finishes(tokenizer, tiny_model):
    eos = sorted(tokenizer.eos_token_ids)[0]
    pool = tokenizer.encode(TEXT, add_special_tokens=False)
    engine, device = make_engine(tokenizer, tiny_model)
    p = SamplingParams(n=3, temperature=0.0, max_tokens=12)
    scripts = [[*pool[:2], eos], pool[:12], [*pool[:5], eos]]
    add(engine, device, "n3", scripts, p)
    outs = run(engine)["n3"]
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    final = {o.index: o for o in outs[-1].outputs}
    assert [final[i].finish_reason for i in range(3)] == ["stop", "length", "stop"]
    assert [len(final[i].token_ids) for i in range(3)] == [3, 12, 6]
    assert final[0].text == tokenizer.decode(pool[:2])  # the EOS adds no text
    assert engine.stats.requests_finished == 1 and engine.num_unfinished_requests == 0
    assert engine.block_manager.num_used_pages == 0


def test_split_character_then_whole_characters_decode_like_decode(tokenizer):
    # The emoji is split over byte tokens here; the fast path (whole characters straight to str)
    # must not pass over a pending part of a character, nor lose an invalid one.
    emoji = tokenizer.encode("😀", add_special_tokens=False)
    a = tokenizer.encode("a", add_special_tokens=False)
    assert len(emoji) >= 3 and len(a) == 1
    for ids in (emoji + a, emoji[:1] + a, emoji[:2] + a + emoji, a + emoji[1:] + a):
        det = IncrementalDetokenizer(tokenizer, [])
        deltas = [det.add(t) for t in ids]
        assert "".join(deltas) == det.text == tokenizer.decode(ids), ids


def test_pages_are_allocated_and_registered_only_at_page_boundaries():
    ps = 4
    bm = BlockManager(64, ps)
    s = Scheduler(SchedulerConfig(max_model_len=48, page_size=ps, max_num_batched_tokens=64), bm)
    seqs = [Sequence(str(i), list(range(10 * i, 10 * i + 5)), max_tokens=40) for i in range(3)]
    for q in seqs:
        s.add(q)
    allocations = []
    allocate = bm.allocate
    bm.allocate = lambda n: allocations.append(n) or allocate(n)
    rng = random.Random(0)
    inflight = None
    for _ in range(60):  # asynchronous: schedule N+1, then update N
        out = s.schedule()
        for c in out.chunks:
            assert len(c.seq.page_ids) == -(-c.seq.num_computed_tokens // ps)
        if inflight is not None:
            # Several tokens at times (as speculative decoding will give), so known tokens run
            # ahead of computed ones and fill pages in update() as well as in schedule().
            s.update(
                {
                    c.seq.seq_id: [rng.randrange(3, 99) for _ in range(rng.choice([1, 1, 3]))]
                    for c in inflight.chunks
                    if c.samples
                }
            )
        for q in s.running:
            known = min(q.num_computed_tokens, q.num_tokens)
            assert q.num_registered_pages == known // ps  # every full known page is offered
            assert all(bm.is_cached(p) for p in q.page_ids[: known // ps])
        inflight = out
    assert all(q.is_finished for q in seqs)
    assert min(allocations) >= 1  # never asked for zero pages (a step inside a page)
    assert sum(allocations) >= sum(-(-q.num_tokens // ps) - 1 for q in seqs)
    bm.check_invariants()
    assert bm.num_used_pages == 0


def test_update_sampled_applies_tokens_as_update_does():
    """The per-step path (one token per row, no mapping) and the general update() leave every
    sequence, page and cache entry the same, through stop ids, EOS, min_tokens, max_tokens,
    preemption (few pages) and finishes while a token is in flight."""

    def make() -> tuple[Scheduler, list[Sequence]]:
        bm = BlockManager(16, 4)
        s = Scheduler(SchedulerConfig(max_model_len=40, page_size=4, max_num_batched_tokens=64), bm)
        seqs = []
        for i in range(8):
            q = Sequence(
                str(i),
                list(range(10 * i, 10 * i + 3 + i)),
                max_tokens=6 + 3 * i,
                seq_id=1000 + i,
                stop_token_ids=[2],
                user_stop_token_ids=[3] if i % 2 else [],
                ignore_eos=i % 3 == 0,
                min_tokens=i % 4,
            )
            s.add(q)
            seqs.append(q)
        return s, seqs

    (a, seqs_a), (b, seqs_b) = make(), make()
    rng = random.Random(1)
    inflight = None
    for _ in range(80):
        out_a, out_b = a.schedule(), b.schedule()
        plan = [(c.seq.seq_id, c.start, c.num_tokens, c.from_device) for c in out_a.chunks]
        assert plan == [(c.seq.seq_id, c.start, c.num_tokens, c.from_device) for c in out_b.chunks]
        if inflight is not None:
            ids = [c.seq.seq_id for c in inflight if c.samples]
            tokens = [rng.choice([2, 3, *range(50, 60)]) for _ in ids]
            up_a = a.update({i: [t] for i, t in zip(ids, tokens)})
            up_b = b.update_sampled(ids, tokens)
            assert [q.seq_id for q in up_a.updated] == [q.seq_id for q in up_b.updated]
            assert [q.seq_id for q in up_a.finished] == [q.seq_id for q in up_b.finished]
        inflight = out_a.chunks
        for qa, qb in zip(seqs_a, seqs_b):
            assert (qa.all_token_ids, qa.status, qa.finish_reason, qa.page_ids) == (
                qb.all_token_ids,
                qb.status,
                qb.finish_reason,
                qb.page_ids,
            )
            assert (qa.num_registered_pages, qa.num_pending) == (
                qb.num_registered_pages,
                qb.num_pending,
            )
        if rng.random() < 0.05:
            victim = rng.randrange(8)
            a.abort(1000 + victim)
            b.abort(1000 + victim)
        if not a.has_work() and not any(q.num_pending for q in seqs_a):
            break
    reasons = {q.finish_reason for q in seqs_a}
    assert {FinishReason.STOP, FinishReason.LENGTH} <= reasons
    assert sum(q.num_preemptions for q in seqs_a) > 0
    a.block_manager.check_invariants()
    assert a.block_manager._page_to_hash == b.block_manager._page_to_hash


def test_multi_step_without_text_stops_at_stop_ids_and_max_tokens(tokenizer, tiny_model):
    """Multi-step launches of requests without text (the bulk append path): a stop id inside a
    launch's tokens ends the completion there, max_tokens cuts the rest, and later tokens the
    device sampled are dropped."""
    engine, device = make_engine(tokenizer, tiny_model, num_scheduler_steps=4)
    stop_id = 400
    cases = {  # rid: (script, max_tokens, stop ids, finish_reason, tokens kept)
        "free": (list(range(10, 40)), 30, [], "length", 30),
        "odd": (list(range(10, 40)), 7, [], "length", 7),
        "stop_mid": ([*range(10, 19), stop_id, *range(20, 40)], 30, [stop_id], "stop", 10),
        "stop_first": ([stop_id, *range(10, 40)], 30, [stop_id], "stop", 1),
    }
    for rid, (script, max_tokens, stops, *_) in cases.items():
        p = SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            ignore_eos=True,
            stop_token_ids=stops,
            detokenize=False,
        )
        add(engine, device, rid, [script], p, output_kind="final")
    outs = run(engine)
    for rid, (script, _, _, reason, kept) in cases.items():
        o = outs[rid][-1].outputs[0]
        assert (o.finish_reason, o.token_ids) == (reason, script[:kept]), rid
    assert sum(r[7] > 1 for r in engine.stats.step_log) >= 3
    assert engine.block_manager.num_used_pages == 0
