"""ModelRunner.prepare and .fetch against a per-token reference, step by step, through decode-only
steps (every input on the device, or some on the host), chunked prefill, one-token chunks that do
not sample, prompt logprobs, penalties, min_tokens and preemption; and EngineStats' token counts
against a per-chunk count.

The engine runs its own scheduler, InputBatch, prepare and fetch; only the device step is stubbed:
execute records the rows that sampled (as ModelRunner.execute does) and fetch reads a packed
output buffer of random values laid out as the compiled step's would be.
"""

from __future__ import annotations

import random
import types

import jax
import numpy as np
import pytest

from rtpjax.engine import packing
from rtpjax.engine.engine import EngineConfig, LLMEngine
from rtpjax.engine.model_runner import ModelRunner, output_layout
from rtpjax.sampling_params import SamplingParams
from rtpjax.sharding.mesh import make_mesh

PARAMS = [
    dict(temperature=0.0),
    dict(temperature=0.0, prompt_logprobs=2),
    dict(temperature=0.8, seed=3, logprobs=2),
    dict(temperature=0.7, top_k=5, presence_penalty=0.5),
    dict(temperature=0.0, min_tokens=3, logit_bias={7: 1.0}),
]
CONFIGS = {
    # name: (EngineConfig overrides, parameter mix)
    "decode": (dict(max_num_batched_tokens=256), [0, 0, 2]),
    "chunked": (dict(max_num_batched_tokens=24), [0, 1, 2, 4]),
    "one_token_chunks": (dict(max_num_batched_tokens=64, long_prefill_token_threshold=1), [0, 1]),
    "penalties": (dict(max_num_batched_tokens=48), [0, 3, 1]),
    "preemption": (dict(max_num_batched_tokens=64, num_pages=14), [0, 1, 2]),
}


def reference_inputs(runner: ModelRunner, chunks, prev_rows: dict[int, int], T: int, B: int):
    """The step's arrays, written one token at a time from the chunks alone."""
    ps = runner.page_size
    a = {k: np.zeros(T, np.int32) for k in ("tokens", "positions", "slot_mapping", "next_tokens")}
    a["token_src"] = np.full(T, -1, np.int32)
    a["kv_lens"] = np.zeros(B, np.int32)
    a["logits_idx"] = np.zeros(B, np.int32)
    a["step"] = np.zeros(B, np.int32)
    cu = [0]
    prompt_rows = []
    for b, c in enumerate(chunks):
        seq = c.seq
        prompt = seq.prompt_token_ids
        wants_prompt = seq.params.prompt_logprobs is not None and c.start < len(prompt)
        if wants_prompt:
            prompt_rows.append(b)
        for j in range(c.num_tokens):
            t, p = cu[-1] + j, c.start + j
            a["positions"][t] = p
            a["slot_mapping"][t] = seq.page_ids[p // ps] * ps + p % ps
            if c.from_device:
                a["token_src"][t] = prev_rows[seq.seq_id]
            else:
                a["tokens"][t] = seq.all_token_ids[p]
            if wants_prompt and p + 1 < len(prompt):
                a["next_tokens"][t] = prompt[p + 1]
        cu.append(cu[-1] + c.num_tokens)
        a["kv_lens"][b] = c.start + c.num_tokens
        a["logits_idx"][b] = cu[-1] - 1
        a["step"][b] = seq.num_output_tokens + seq.num_pending - c.samples
    a["cu_q_lens"] = np.array(cu + [cu[-1]] * (B - len(chunks)), np.int32)
    return a, prompt_rows


def check_prepared(runner: ModelRunner, sched, prepared) -> None:
    x = prepared.inputs
    chunks = sched.chunks
    n, total = len(chunks), sched.num_batched_tokens
    T, B = x.tokens.shape[0], x.kv_lens.shape[0]
    assert total <= T and n <= B
    want, prompt_rows = reference_inputs(runner, chunks, runner._prev_rows, T, B)
    for name, value in want.items():
        got = x.sampling.step if name == "step" else getattr(x, name)
        np.testing.assert_array_equal(got, value, err_msg=name)
    assert int(x.num_seqs[0]) == n
    for b, c in enumerate(chunks):
        pages = c.seq.page_ids
        assert list(x.page_indices[b, : len(pages)]) == pages
    assert not x.page_indices[n:].any()
    assert prepared.static.max_q_len == (1 if total == n else None)
    assert prepared.static.prompt_logprobs == bool(prompt_rows)
    assert prepared.prompt_rows == prompt_rows
    sampled = [c.seq.seq_id for c in chunks if c.samples]
    assert prepared.sampled_ids == sampled


class StubDevice:
    """execute: no device work, the sampled rows recorded as ModelRunner.execute records them.
    fetch: the runner's own, over a packed buffer of random outputs, checked per row."""

    def __init__(self, runner: ModelRunner, vocab: int, seed: int) -> None:
        self.runner = runner
        self.prepare = runner.prepare
        self.fetch = runner.fetch
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)
        self.steps = dict.fromkeys(
            ("decode_all_device", "decode_some_host", "decode_unsampled", "mixed", "prompt_lp"), 0
        )

    def checked_prepare(self, sched):
        prepared = self.prepare(sched)
        check_prepared(self.runner, sched, prepared)
        n = len(sched.chunks)
        if sched.num_batched_tokens == n:
            all_device = all(c.from_device for c in sched.chunks)
            self.steps["decode_all_device" if all_device else "decode_some_host"] += 1
            self.steps["decode_unsampled"] += not all(c.samples for c in sched.chunks)
        else:
            self.steps["mixed"] += 1
        self.steps["prompt_lp"] += prepared.static.prompt_logprobs
        return prepared

    def execute(self, prepared):
        chunks = prepared.chunks
        self.runner._prev_rows = {c.seq.seq_id: b for b, c in enumerate(chunks) if c.samples}
        x = prepared.inputs
        B, T = x.kv_lens.shape[0], x.tokens.shape[0]
        layout = output_layout(B, T, prepared.static)
        tree = jax.tree.unflatten(
            layout.treedef,
            [
                self.rng.integers(0, self.vocab, shape, np.int32)
                if dt == "int32"
                else self.rng.standard_normal(shape).astype(np.float32)
                for shape, dt in layout.leaves
            ],
        )
        buf, _ = packing.pack(tree)
        return types.SimpleNamespace(prepared=prepared, outputs=buf, out_layout=layout, tree=tree)

    def checked_fetch(self, inflight):
        result = self.fetch(inflight)
        (ids, lp, top_ids, top_lp), prompt = inflight.tree
        chunks = inflight.prepared.chunks
        rows = [b for b, c in enumerate(chunks) if c.samples]
        assert result.seq_ids == [chunks[b].seq.seq_id for b in rows]
        np.testing.assert_array_equal(result.token_ids, ids[rows])
        np.testing.assert_array_equal(result.logprob, lp[rows])
        np.testing.assert_array_equal(result.top_ids, top_ids[rows])
        np.testing.assert_array_equal(result.top_logprobs, top_lp[rows])
        cu = inflight.prepared.inputs.cu_q_lens
        want = {}
        for b in inflight.prepared.prompt_rows:
            c = chunks[b]
            want[c.seq.seq_id] = (c.start, *(leaf[cu[b] : cu[b + 1]] for leaf in prompt[1:]))
        assert result.prompt_logprobs.keys() == want.keys()
        for seq_id, (start, *leaves) in want.items():
            got_start, *got = result.prompt_logprobs[seq_id]
            assert got_start == start
            for g, w in zip(got, leaves):
                np.testing.assert_array_equal(g, w)
        return result


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prepare_and_fetch_match_per_token_reference(name, tokenizer, tiny_model):
    overrides, mix = CONFIGS[name]
    cfg, params = tiny_model
    kw = dict(max_model_len=96, max_num_seqs=8, page_size=8, num_pages=200)
    kw.update(overrides)
    config = EngineConfig(**kw)
    engine = LLMEngine(cfg, params, tokenizer, make_mesh(1), config, num_pages=config.num_pages)
    runner = engine.runner
    stub = StubDevice(runner, cfg.vocab_size, seed=len(name))
    runner.prepare, runner.execute, runner.fetch = (
        stub.checked_prepare,
        stub.execute,
        stub.checked_fetch,
    )
    scheduled = []  # every SchedulerOutput, in order
    schedule = engine.scheduler.schedule

    def recorded_schedule(num_steps=1):
        scheduled.append(schedule(num_steps))
        return scheduled[-1]

    engine.scheduler.schedule = recorded_schedule
    rng = random.Random(name)
    for i in range(14):
        p = SamplingParams(**PARAMS[rng.choice(mix)], max_tokens=rng.randrange(1, 20))
        prompt = [rng.randrange(3, cfg.vocab_size) for _ in range(rng.randrange(1, 40))]
        engine.add_request(f"r{i}", None, prompt, p)
        for _ in range(rng.randrange(0, 4)):
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()

    if name == "one_token_chunks":
        assert stub.steps["decode_unsampled"] > 0
    else:
        assert stub.steps["mixed"] > 0
    if name == "decode":
        assert stub.steps["decode_all_device"] > 0
    if name in ("penalties", "one_token_chunks"):
        assert stub.steps["decode_some_host"] > 0
    if 1 in mix:
        assert stub.steps["prompt_lp"] > 0
    if name == "preemption":
        assert any(s.preempted for s in scheduled)
    # EngineStats: prompt tokens computed, the rest decode; a step is decode-only when every
    # chunk is one token.
    prefill = decode = 0
    for sched in scheduled:
        for c in sched.chunks:
            part = max(0, min(c.start + c.num_tokens, c.seq.num_prompt_tokens) - c.start)
            prefill += part
            decode += c.num_tokens - part
    stats = engine.stats
    assert (stats.prefill_tokens, stats.decode_tokens) == (prefill, decode)
    assert stats.steps == len(scheduled)
    want = [bool(s.chunks) and all(c.num_tokens == 1 for c in s.chunks) for s in scheduled]
    assert [row[1] for row in stats.step_log] == want
    assert [row[0] for row in stats.step_log] == [len(s.chunks) for s in scheduled]
