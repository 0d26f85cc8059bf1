"""The paged engine against the dense reference generator, token for token, in float32 on CPU."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.config import ModelConfig
from rtpjax.engine.engine import EngineConfig, LLMEngine
from rtpjax.engine.reference import DenseGenerator
from rtpjax.layers import sampler as sampler_lib
from rtpjax.sampling_params import SamplingParams
from rtpjax.sharding.mesh import make_mesh
from rtpjax.tokenizer import Tokenizer
from rtpjax.weights.loader import load_params
from rtpjax.weights.safetensors_io import SafetensorsCheckpoint
from tests.conftest import FIXTURES

MODEL = "llama3_gqa4"  # GQA 4, llama3 rope scaling


@functools.cache
def model():
    d = FIXTURES / "models" / MODEL
    cfg = ModelConfig.from_hf(d)
    params = load_params(SafetensorsCheckpoint(d), cfg, jnp.float32)
    tok = Tokenizer.from_pretrained(FIXTURES / "tokenizer" / "smollm2")
    return cfg, params, tok


def make_engine(**overrides) -> LLMEngine:
    cfg, params, tok = model()
    kw = dict(
        max_model_len=128,
        max_num_seqs=32,
        max_num_batched_tokens=64,
        page_size=8,
        num_pages=400,
        enable_prefix_caching=True,
    )
    kw.update(overrides)
    num_pages = kw.pop("num_pages")
    return LLMEngine(
        cfg, params, tok, make_mesh(1), EngineConfig(**kw, num_pages=num_pages), num_pages=num_pages
    )


def workload(n=64, seed=0):
    """Mixed lengths 1..90; a third share a 40-token prefix (prefix-cache hits, chunk boundaries
    off page boundaries)."""
    rng = np.random.default_rng(seed)
    shared = list(rng.integers(3, 256, 40))
    prompts, max_tokens = [], []
    for i in range(n):
        length = int(rng.integers(1, 90))
        ids = list(rng.integers(3, 256, length))
        if i % 3 == 0:
            ids = shared + ids[: max(0, length - 40)]
        prompts.append([int(t) for t in ids])
        max_tokens.append(int(rng.integers(1, 24)))
    return prompts, max_tokens


@functools.cache
def reference_outputs(seed=0):
    cfg, params, _ = model()
    gen = DenseGenerator(cfg, params)
    prompts, max_tokens = workload(seed=seed)
    return [gen.generate(p, m) for p, m in zip(prompts, max_tokens)]


def run(engine: LLMEngine, prompts, params_list):
    for i, (p, sp) in enumerate(zip(prompts, params_list)):
        engine.add_request(str(i), None, p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[str(i)] for i in range(len(prompts))]


def greedy_params(max_tokens):
    return [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(max_num_batched_tokens=16),  # prefill chunks of at most 16 tokens, mixed with decodes
        dict(enable_prefix_caching=False),
        dict(num_pages=24),  # 23 usable pages of 8 tokens for 32 sequences: preemption by recompute
        dict(async_scheduling=False),
        dict(num_scheduler_steps=4),  # multi-step decode once nothing waits
        dict(num_scheduler_steps=5, max_num_seqs=8, num_pages=24),  # ... while queues are full
    ],
    ids=["chunk16", "no-prefix-cache", "tiny-pool-preemption", "sync", "multi4", "multi5-full"],
)
def test_greedy_matches_dense_reference(overrides):
    prompts, max_tokens = workload()
    engine = make_engine(**overrides)
    outs = run(engine, prompts, greedy_params(max_tokens))
    ref = reference_outputs()
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert o.outputs[0].token_ids == r, f"request {i} (prompt {len(prompts[i])} tokens)"
        assert o.outputs[0].finish_reason == "length"
    if overrides.get("num_pages") == 24 and "num_scheduler_steps" not in overrides:
        assert sum(o.metrics.num_preemptions for o in outs) > 0, "the tiny pool never preempted"
    if overrides.get("num_scheduler_steps", 1) > 1:
        multi = [r[7] for r in engine.stats.step_log if r[7] > 1]
        assert multi, "no multi-step decode step ran"
    if overrides.get("enable_prefix_caching", True):
        assert engine.prefix_cache_hit_rate() > 0
    # All pages back: only cached prefix pages may stay, with no references.
    bm = engine.block_manager
    assert bm.num_used_pages == 0
    assert bm.num_free_pages == bm.num_pages - 1
    assert engine.runner.num_compiled_variants <= 24


@pytest.mark.parametrize("num_pages", [400, 18], ids=["roomy", "tiny-pool-preemption"])
def test_multi_step_decode_matches_dense_reference(num_pages):
    """Long decodes at max_num_seqs: most launches are multi-step, rows finish at different
    iterations (max_tokens not a multiple of K), and with 17 usable pages the multi-step page
    allocation preempts."""
    cfg, params, _ = model()
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 256, int(n))] for n in rng.integers(1, 30, 10)]
    max_tokens = [int(m) for m in rng.integers(20, 60, 10)]
    gen = DenseGenerator(cfg, params)
    ref = [gen.generate(p, m) for p, m in zip(prompts, max_tokens)]
    engine = make_engine(num_scheduler_steps=8, max_num_seqs=4, num_pages=num_pages)
    params = greedy_params(max_tokens)
    if num_pages == 400:  # no text: the host appends each row's tokens at once
        params = [dataclasses.replace(p, detokenize=False) for p in params]
    outs = run(engine, prompts, params)
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert o.outputs[0].token_ids == r, f"request {i}"
    ks = [row[7] for row in engine.stats.step_log]
    # Roomy: most launches are multi-step; tiny pool: preempted sequences wait, which keeps most
    # launches single-step, but some are multi-step.
    assert sum(k > 1 for k in ks) >= (len(ks) // 2 if num_pages == 400 else 5), ks
    if num_pages == 18:
        assert sum(o.metrics.num_preemptions for o in outs) > 0, "the tiny pool never preempted"
    bm = engine.block_manager
    assert bm.num_used_pages == 0 and bm.num_free_pages == bm.num_pages - 1


def test_accelerator_step_shapes_match_dense_reference():
    """What the engine does on GPUs, forced on CPU: rows tied to the token bucket, exact (T, B)
    buckets of 1, 2, 4, 8 for small decode batches, fresh-prefill steps (no cached prefix)
    through packed causal attention instead of the paged kernel, and inputs staged into resident
    buffers."""
    prompts, max_tokens = workload()
    engine = make_engine()
    runner = engine.runner
    runner.tight_rows, runner.small_decode, runner.cudnn_prefill = False, True, True
    runner.stable_inputs = True
    stage, addresses = runner._stage, {}

    def recording_stage(resident, buf):
        out = stage(resident, buf)
        addresses.setdefault(buf.size, set()).add(out.unsafe_buffer_pointer())
        return out

    runner._stage = recording_stage
    outs = run(engine, prompts, greedy_params(max_tokens))
    for i, (o, r) in enumerate(zip(outs, reference_outputs())):
        assert o.outputs[0].token_ids == r, f"request {i} (prompt {len(prompts[i])} tokens)"
    shapes = {layout.leaves[0][0][0] for layout, _ in runner._out_layouts}
    assert shapes & {1, 2, 4, 8}, f"no small decode bucket was used: {sorted(shapes)}"
    fresh = [static.fresh_prefill for _, static in runner._out_layouts]
    assert any(fresh) and not all(fresh), "both fresh and cached-prefix steps must occur"
    # Each input size's resident buffer stayed where it was: the copy landed in the donated buffer.
    assert len(addresses) > 1 and all(len(a) == 1 for a in addresses.values()), addresses


def test_prefix_prefill_steps_match_dense_reference():
    """With cudnn_prefill forced on CPU (the XLA path standing in for cuDNN), prefill steps with no
    decode row over a cached prefix take prefix_prefill_attention: the later chunks of a 100-token
    prompt chunked by 32 (one row, prefix bucket 256), then seven prompts admitted together onto
    its first 40 tokens through the prefix cache (8 rows, 7 x 40 cached tokens: bucket 512); one
    prompt whose whole prefix hits leaves a one-token chunk over it, so its step stays paged."""
    cfg, params, _ = model()
    engine = make_engine(max_num_batched_tokens=32)
    runner = engine.runner
    runner.tight_rows, runner.small_decode, runner.cudnn_prefill = False, True, True
    prepare, steps = runner.prepare, []

    def recording_prepare(sched):
        step = prepare(sched)
        x = step.inputs
        steps.append((x.tokens.shape[0], x.kv_lens.shape[0], step.static.max_prefix_tokens))
        return step

    runner.prepare = recording_prepare
    rng = np.random.default_rng(7)
    long = [int(t) for t in rng.integers(3, 256, 100)]
    shared = [long[:40] + [int(t) for t in rng.integers(3, 256, 3 + i % 3)] for i in range(7)]
    waves = [[long], shared, [[*long[:48], 5]]]  # the last: 48 cached (6 pages), 1 to compute
    gen = DenseGenerator(cfg, params)
    for w, prompts in enumerate(waves):
        first = len(steps)
        outs = run(engine, prompts, greedy_params([6] * len(prompts)))
        for i, (o, p) in enumerate(zip(outs, prompts)):
            assert o.outputs[0].token_ids == gen.generate(p, 6), f"wave {w} request {i}"
        prefix_steps = [s for s in steps[first:] if s[2]]
        if w == 0:  # chunks [32, 64), [64, 96) and [96, 100) over their prompt's start
            assert prefix_steps == [(32, 1, 256), (32, 1, 256), (16, 1, 256)], steps[first:]
        elif w == 1:  # 7 x 3..5 = 28 tokens in one step, tight rows
            assert prefix_steps == [(32, 8, 512)], steps[first:]
            assert outs[0].num_cached_tokens == 40
        else:
            assert prefix_steps == [] and outs[0].num_cached_tokens == 48, steps[first:]
    assert {s.max_prefix_tokens for _, s in runner._out_layouts} == {0, 256, 512}


def seeded(max_tokens, seed):
    return SamplingParams(
        temperature=0.8, top_p=0.9, top_k=50, seed=seed, max_tokens=max_tokens, ignore_eos=True
    )


def test_seeded_sampling_independent_of_batch():
    prompts, _ = workload(n=12, seed=3)
    target = prompts[5]
    alone = run(make_engine(), [target], [seeded(20, 1234)])[0].outputs[0].token_ids
    crowd_params = [seeded(20, 1234) if i == 5 else seeded(15, 99 + i) for i in range(12)]
    crowd = run(make_engine(max_num_batched_tokens=32), prompts, crowd_params)
    assert crowd[5].outputs[0].token_ids == alone
    # Multi-step decode draws each token with the same (seed, step) key.
    multi_engine = make_engine(max_num_batched_tokens=32, num_scheduler_steps=6)
    multi = run(multi_engine, prompts, crowd_params)
    assert multi[5].outputs[0].token_ids == alone
    # And the dense reference with the same sampler draws the same tokens.
    cfg, params, _ = model()
    sp = seeded(20, 1234)

    def sample_fn(logits, step):
        t = sampler_lib.pack_sampling_tensors([sp], [step], [1234], [step], [], 1)
        t = jax.tree.map(jnp.asarray, t)
        flags = sampler_lib.sampler_flags([sp])
        return sampler_lib.sample(logits[None], t, **flags._asdict()).token_ids[0]

    ref = DenseGenerator(cfg, params).generate(target, 20, sample_fn=sample_fn)
    assert ref == alone


def test_multi_step_logprobs_and_seeds_equal_single_step():
    """Seeded sampling with logprobs: multi-step launches give the same tokens, logprobs and
    top-k alternatives as single steps."""
    prompts, _ = workload(n=6, seed=4)
    params = [
        SamplingParams(temperature=0.9, seed=7 + i, max_tokens=13 + i, ignore_eos=True, logprobs=3)
        for i in range(6)
    ]
    single = run(make_engine(), prompts, params)
    multi_engine = make_engine(num_scheduler_steps=4)
    multi = run(multi_engine, prompts, params)
    assert any(r[7] > 1 for r in multi_engine.stats.step_log)
    for a, b in zip(single, multi):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(b.outputs[0].logprobs) == len(b.outputs[0].token_ids)
        for da, db in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert da.keys() == db.keys()
            np.testing.assert_allclose(list(da.values()), list(db.values()), rtol=1e-5, atol=1e-5)


def test_prefix_sharing_prefills_only_the_tail():
    engine = make_engine(max_model_len=1200, num_pages=400, max_num_batched_tokens=256)
    rng = np.random.default_rng(7)
    prefix = [int(t) for t in rng.integers(3, 256, 1000)]
    first = [*prefix, 5, 6, 7]
    run(engine, [first], greedy_params([2]))
    before = engine.stats.prefill_tokens
    second = [*prefix, 9, 10, 11, 12, 13]
    out = run(engine, [second], greedy_params([2]))[0]
    prefilled = engine.stats.prefill_tokens - before
    cached = out.metrics.num_cached_tokens
    assert cached == 1000 // 8 * 8  # every full page of the shared prefix
    assert prefilled == len(second) - cached
    assert engine.prefix_cache_hit_rate() > 0.4


def test_bad_requests_fail_alone():
    engine = make_engine()
    with pytest.raises(ValueError, match="max_model_len=128"):
        engine.add_request("long", None, list(range(3, 131)), SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", None, [], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("oov", None, [5, 300], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    prompts, max_tokens = workload(n=4)
    outs = run(engine, prompts, greedy_params(max_tokens))
    assert [o.outputs[0].token_ids for o in outs] == reference_outputs()[:4]


@pytest.mark.parametrize("tp", [2, 8])
def test_tensor_parallel_engine_matches_reference(tp):
    """The paged engine sharded over `tp` simulated devices (attention under shard_map; at tp=8 the
    two KV heads are replicated) gives the single-device reference tokens."""
    d = FIXTURES / "models" / MODEL
    cfg = ModelConfig.from_hf(d).with_tensor_parallel(tp)
    mesh = make_mesh(tp)
    params = load_params(SafetensorsCheckpoint(d), cfg, jnp.float32, mesh=mesh)
    tok = model()[2]
    config = EngineConfig(
        max_model_len=128, max_num_seqs=16, max_num_batched_tokens=32, page_size=8, num_pages=200
    )
    engine = LLMEngine(cfg, params, tok, mesh, config, num_pages=200)
    assert {s.data.shape[2] for s in engine.runner.kv[0].addressable_shards} == {
        2 * cfg.num_kv_heads // tp
    }
    prompts, max_tokens = workload(n=12)
    outs = run(engine, prompts, greedy_params(max_tokens))
    assert [o.outputs[0].token_ids for o in outs] == reference_outputs()[:12]
