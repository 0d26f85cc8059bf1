"""The server's full warm-up compiles every greedy step shape a workload can meet."""

import jax.numpy as jnp
import numpy as np

from rtpjax.engine.async_engine import warm_up
from rtpjax.engine.engine import EngineConfig, LLMEngine
from rtpjax.models.presets import preset, random_params
from rtpjax.sampling_params import SamplingParams
from rtpjax.sharding.mesh import make_mesh


def warmed_engine(**overrides) -> LLMEngine:
    """The tiny preset's engine with GPU step shapes (rows tied to the token bucket, small exact
    decode buckets, cuDNN fresh and prefix prefill apart from other prefills), after the server's
    full warm-up."""
    cfg = preset("tiny")
    mesh = make_mesh(1)
    kw = dict(max_model_len=48, max_num_seqs=8, max_num_batched_tokens=64, page_size=8)
    config = EngineConfig(**{**kw, **overrides}, num_pages=120)
    engine = LLMEngine(
        cfg, random_params(cfg, jnp.float32, mesh), None, mesh, config, num_pages=120
    )
    runner = engine.runner
    runner.tight_rows, runner.small_decode, runner.cudnn_prefill = False, True, True
    warm_up(engine, full=True)
    return engine


def test_full_warm_up_leaves_nothing_to_compile_for_plain_traffic():
    engine = warmed_engine()
    runner = engine.runner
    warmed = runner.num_compiled_variants
    # Greedy and sampled each: one-row prefill and decode, decode rows 2/4/8, fresh token
    # buckets 32/64, mixed token buckets 16/32/64, one-row prefix-prefill token buckets 16/32/64.
    assert warmed == 2 * (2 + 3 + 2 + 3 + 3)
    # (T from tokens i32[T], B from kv_lens i32[B], the prefix bucket) of the prefix variants
    prefix = sorted(
        (layout.leaves[0][0][0], layout.leaves[4][0][0], s.max_prefix_tokens)
        for layout, s in runner._out_layouts
        if s.max_prefix_tokens
    )
    assert prefix == [(t, 1, 256) for t in (16, 16, 32, 32, 64, 64)], prefix

    rng = np.random.default_rng(0)
    for wave in range(3):  # staggered arrivals: mixed prefill + decode steps of many sizes
        for i in range(int(rng.integers(1, 9))):
            prompt = [int(t) for t in rng.integers(3, 500, int(rng.integers(1, 40)))]
            sp = SamplingParams(
                temperature=0.0, max_tokens=int(rng.integers(1, 8)), detokenize=False
            )
            engine.add_request(f"{wave}-{i}", None, prompt, sp)
        for _ in range(int(rng.integers(0, 4))):
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.runner.num_compiled_variants == warmed


def test_full_warm_up_compiles_the_multi_step_variants():
    """With num_scheduler_steps, every decode row bucket also gets its multi-step variant (greedy
    and sampled), and long decodes after the warm-up compile nothing new."""
    engine = warmed_engine(max_model_len=64, num_scheduler_steps=4)
    runner = engine.runner
    warmed = runner.num_compiled_variants
    multi = [s for _, s in runner._out_layouts if s.num_steps > 1]
    # The plain variants as above, plus a multi-step one per decode row bucket 1/2/4/8, twice.
    assert len(multi) == 2 * 4 and warmed == 2 * (2 + 3 + 2 + 3 + 3) + len(multi)

    rng = np.random.default_rng(1)
    for i in range(8):
        prompt = [int(t) for t in rng.integers(3, 500, int(rng.integers(1, 20)))]
        sp = SamplingParams(temperature=0.0, max_tokens=int(rng.integers(5, 30)), detokenize=False)
        engine.add_request(str(i), None, prompt, sp)
    while engine.has_unfinished_requests():
        engine.step()
    assert any(r[7] > 1 for r in engine.stats.step_log)
    assert runner.num_compiled_variants == warmed
