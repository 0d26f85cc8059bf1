"""The on-device sampler against numpy references, and its host packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.layers.sampler import (
    TOP_HEAD,
    SamplerFlags,
    SamplingTensors,
    apply_penalties,
    apply_top_k_top_p,
    pack_sampling_tensors,
    pack_token_ids,
    sample,
    sampler_flags,
    top_k_exact,
)
from rtpjax.sampling_params import MAX_LOGPROBS, SamplingParams

FLAGS = ("all_greedy", "use_top_k_top_p", "use_penalties", "num_top_logprobs")
sample_jit = jax.jit(sample, static_argnames=FLAGS)


def run(logits, params, *, steps=None, seeds=None, num_output=None, eos=(0,), tokens=None, **kw):
    """Packs SamplingParams rows as the engine would, then samples (jitted)."""
    B = len(params)
    steps = [0] * B if steps is None else steps
    seeds = [0] * B if seeds is None else seeds
    num_output = [0] * B if num_output is None else num_output
    t = pack_sampling_tensors(params, steps, seeds, num_output, eos, B)
    flags = sampler_flags(params)._asdict() | kw
    penalty_tokens, output_tokens = tokens if tokens is not None else (None, None)
    if flags["use_penalties"] and tokens is None:
        penalty_tokens = output_tokens = np.full((B, 4), -1, np.int32)
    return sample_jit(jnp.asarray(logits), t, penalty_tokens, output_tokens, **flags)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_greedy_is_argmax_with_lowest_index_on_ties():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 300)).astype(np.float32)
    logits[3, [10, 200]] = 9.0  # a tie: the lower id wins
    greedy = [SamplingParams(temperature=0.0)] * 7
    out = run(logits, greedy)
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))
    assert int(out.token_ids[3]) == 10
    # bf16 logits are upcast; greedy rows inside a sampling batch still take the argmax.
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.9)] * 3
    mixed.append(SamplingParams(temperature=2.0, top_k=1))
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    out = run(bf16, mixed, seeds=list(range(7)))
    want = np.asarray(bf16.astype(jnp.float32)).argmax(-1)
    for i in (0, 2, 4, 6):
        assert int(out.token_ids[i]) == want[i], i


def test_same_seed_and_step_give_the_same_token_anywhere_in_any_batch():
    rng = np.random.default_rng(1)
    V, N = 64, 40
    row_logits = rng.normal(size=V).astype(np.float32)
    target = SamplingParams(temperature=1.5)
    seeds = rng.integers(0, 2**32, size=N).tolist()
    steps = rng.integers(0, 1000, size=N).tolist()
    alone = run(np.tile(row_logits, (N, 1)), [target] * N, steps=steps, seeds=seeds).token_ids
    alone = np.asarray(alone)
    assert len(set(alone.tolist())) > 10  # the draws really vary with (seed, step)

    # The same rows shuffled among fillers of other kinds (which also switch on top-k/top-p and
    # penalties), in a larger batch whose other rows have other logits.
    fillers = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=5, top_p=0.7),
        SamplingParams(temperature=1.0, repetition_penalty=1.3),
    ]
    B = 2 * N + 3
    perm = rng.permutation(B)
    params, batch_seeds, batch_steps = [None] * B, [0] * B, [0] * B
    logits = rng.normal(size=(B, V)).astype(np.float32)
    for j, pos in enumerate(perm):
        if j < N:
            params[pos], batch_seeds[pos], batch_steps[pos] = target, seeds[j], steps[j]
            logits[pos] = row_logits
        else:
            params[pos] = fillers[j % 3]
            batch_seeds[pos], batch_steps[pos] = seeds[j % N], steps[j % N]
    mixed = run(logits, params, steps=batch_steps, seeds=batch_seeds).token_ids
    np.testing.assert_array_equal(np.asarray(mixed)[perm[:N]], alone)

    # Batch size one, and a changed seed or step changes the draws.
    for j in range(3):
        single = run(row_logits[None], [target], steps=[steps[j]], seeds=[seeds[j]]).token_ids
        assert int(single[0]) == alone[j]
    moved = run(
        np.tile(row_logits, (N, 1)), [target] * N, steps=[s + 1 for s in steps], seeds=seeds
    )
    assert (np.asarray(moved.token_ids) != alone).sum() > N // 2


def test_draws_follow_softmax_of_logits_over_temperature():
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, -1.0], np.float32)
    N, T = 20_000, 0.7
    out = run(np.tile(logits, (N, 1)), [SamplingParams(temperature=T)] * N, steps=list(range(N)))
    counts = np.bincount(np.asarray(out.token_ids), minlength=6)
    expected = N * np.exp(log_softmax(logits / T))
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20.52, (chi2, counts, expected)  # df 5, p = 0.001; fixed seeds: no flakes
    # And the same draws without the temperature are clearly not from softmax(logits).
    flat = N * np.exp(log_softmax(logits))
    assert ((counts - flat) ** 2 / flat).sum() > 200


def allowed_tokens(logits, temperature, top_k, top_p, min_p, margin=1e-3):
    """numpy reference: the set top-k, then top-p (renormalised), then min-p keeps."""
    x = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(len(x), bool)
    keep[order[: top_k if top_k > 0 else len(x)]] = True
    probs = np.where(keep, np.exp(x - x.max()), 0.0)
    probs /= probs.sum()
    head = np.cumsum(probs[order]) - probs[order]  # mass strictly before each token
    if top_p < 1.0:
        assert np.abs(head - top_p).min() > margin, "the test's top_p sits on a boundary"
        keep[order[head >= top_p]] = False
    keep &= probs >= min_p * probs.max()
    return set(np.flatnonzero(keep).tolist())


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [
        (1.0, 3, 1.0, 0.0),
        (1.0, 0, 0.62, 0.0),
        (1.0, -1, 1.0, 0.3),
        (1.0, 5, 0.7, 0.0),
        (1.0, 6, 0.9, 0.45),
        (2.0, 0, 0.5, 0.0),
        (0.5, 0, 0.97, 0.0),
    ],
)
def test_top_k_top_p_min_p_keep_exactly_the_reference_set(temperature, top_k, top_p, min_p):
    probs = np.array([0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05, 0.03, 0.012, 0.008], np.float64)
    perm = np.random.default_rng(2).permutation(len(probs))  # the ranking is not the id order
    logits = np.log(probs[perm]).astype(np.float32)
    want = allowed_tokens(logits, temperature, top_k, top_p, min_p)
    assert 1 < len(want) < len(probs)
    N = 3000
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    out = run(np.tile(logits, (N, 1)), [p] * N, steps=list(range(N)), seeds=[5] * N)
    assert set(np.asarray(out.token_ids).tolist()) == want


@pytest.mark.parametrize(("V", "k", "chunk"), [(1000, 20, 16), (1003, 128, 16), (77, 5, 8)])
def test_top_k_exact_matches_lax_top_k(V, k, chunk):
    x = np.random.default_rng(V).normal(size=(9, V)).astype(np.float32)
    x[2, :] = -1.0
    x[2, [5, V - 1]] = 3.0  # the best two sit in the first and the (partial) last chunk
    values, ids = jax.jit(top_k_exact, static_argnums=(1, 2))(jnp.asarray(x), k, chunk)
    want_values, want_ids = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(np.asarray(ids)[[0, 1, 3]], np.asarray(want_ids)[[0, 1, 3]])
    np.testing.assert_array_equal(np.take_along_axis(x, np.asarray(ids), -1), values)


def test_top_k_top_p_fast_and_sorting_paths_agree_with_numpy_and_each_other():
    V = 1000
    rng = np.random.default_rng(6)
    peaked = np.sort(rng.normal(scale=4, size=V)).astype(np.float32)[rng.permutation(V)]
    flat = rng.normal(scale=0.1, size=V).astype(np.float32)
    two_level = (flat + np.where(rng.permutation(V) < 100, 2.0, 0.0)).astype(np.float32)
    rows = [  # (logits, top_k, top_p); the last three need more than TOP_HEAD tokens: a full sort
        (peaked, 40, 1.0),
        (peaked, 0, 0.9),
        (peaked, 60, 0.8),
        (peaked, 0, 1.0),
        (flat, 0, 0.5),
        (peaked, 400, 0.95),
        (two_level, 200, 0.4),  # renormalising over the top 200 halves the kept set
        (flat, 3, 0.9),
    ]
    assert TOP_HEAD < 400
    logits = np.stack([r[0] for r in rows])
    top_k = np.array([r[1] for r in rows], np.int32)
    top_p = np.array([r[2] for r in rows], np.float32)
    f = jax.jit(apply_top_k_top_p)
    got = np.asarray(f(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p)))
    for b, (x, k, p) in enumerate(rows):
        kept = set(np.flatnonzero(np.isfinite(got[b])).tolist())
        assert kept == allowed_tokens(x, 1.0, k, p, 0.0, margin=1e-4), b
        np.testing.assert_array_equal(got[b][np.isfinite(got[b])], x[np.isfinite(got[b])])
    assert len(set(np.flatnonzero(np.isfinite(got[4])))) > TOP_HEAD
    # Sorting goes by groups of rows (8 here, 1 for 7 rows, 4 for 4); a row's result is bitwise the
    # same whatever its group does, and the first four rows alone take the fast path only.
    for rows_in in (slice(0, 7), slice(0, 4), slice(4, 8)):
        sub = f(*(jnp.asarray(a[rows_in]) for a in (logits, top_k, top_p)))
        np.testing.assert_array_equal(np.asarray(sub), got[rows_in])


def numpy_penalties(logits, rep, pres, freq, penalty_tokens, output_tokens):
    out = np.asarray(logits, np.float64).copy()
    for b in range(out.shape[0]):
        seen = {int(i) for i in penalty_tokens[b] if i >= 0}
        for i in seen:
            out[b, i] = out[b, i] / rep[b] if out[b, i] > 0 else out[b, i] * rep[b]
        ids, counts = np.unique([i for i in output_tokens[b] if i >= 0], return_counts=True)
        for i, c in zip(ids.astype(int), counts, strict=True):
            out[b, i] -= freq[b] * c + pres[b]
    return out


def test_penalties_match_numpy_on_random_inputs():
    rng = np.random.default_rng(3)
    B, V = 6, 50
    logits = rng.normal(scale=3, size=(B, V)).astype(np.float32)
    rep = rng.uniform(0.5, 2.0, B)
    pres, freq = rng.uniform(-2, 2, B), rng.uniform(0.5, 2, B)
    output = [rng.integers(0, V, size=rng.integers(0, 12)).tolist() for _ in range(B)]
    prompt = [rng.integers(0, V, size=rng.integers(0, 20)).tolist() for _ in range(B)]
    for b in range(B):  # repeat each row's best id so the penalties can move the argmax
        output[b] += [int(logits[b].argmax())] * 3
    output[0] += [V - 1, V - 1]  # the last id: a -1 pad must not count as it
    output_tokens = pack_token_ids(output, B)
    penalty_tokens = pack_token_ids([p + o for p, o in zip(prompt, output, strict=True)], B)
    want = numpy_penalties(logits, rep, pres, freq, penalty_tokens, output_tokens)
    params = [
        SamplingParams(
            temperature=0.0,
            repetition_penalty=rep[b],
            presence_penalty=pres[b],
            frequency_penalty=freq[b],
        )
        for b in range(B)
    ]
    t = pack_sampling_tensors(params, [0] * B, [0] * B, [0] * B, [], B)
    got = jax.jit(apply_penalties)(jnp.asarray(logits), t, penalty_tokens, output_tokens)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # End to end, greedy rows take the argmax after penalties, and logprobs stay raw.
    out = run(logits, params, tokens=(penalty_tokens, output_tokens), num_top_logprobs=3)
    np.testing.assert_array_equal(out.token_ids, want.argmax(-1))
    assert (want.argmax(-1) != logits.argmax(-1)).sum() >= B // 2
    raw = log_softmax(logits)
    np.testing.assert_allclose(out.logprob, raw[np.arange(B), want.argmax(-1)], atol=1e-5)
    with pytest.raises(ValueError, match="penalty_tokens and output_tokens"):
        sample(
            jnp.asarray(logits),
            t,
            None,
            output_tokens,
            all_greedy=True,
            use_top_k_top_p=False,
            use_penalties=True,
            num_top_logprobs=0,
        )


def test_logit_bias_and_min_tokens_suppression():
    V = 40
    logits = np.linspace(-1, 1, V, dtype=np.float32)[None].repeat(5, 0)  # argmax: V - 1
    eos, stop_id = V - 1, 7
    greedy = dict(temperature=0.0, min_tokens=3, stop_token_ids=[stop_id])
    params = [
        SamplingParams(**greedy),  # output 1 < 3: eos suppressed -> V - 2
        SamplingParams(**greedy),  # output 3: nothing suppressed -> eos
        SamplingParams(**greedy, logit_bias={5: 3.0}),  # bias lifts 5 over everything
        SamplingParams(**greedy, ignore_eos=True, logit_bias={V - 2: 5.0, stop_id: 9.0}),
        None,  # a padded row: suppress -1 must not hit the last id
    ]
    out = run(logits, params, num_output=[1, 3, 3, 0, 0], eos=[eos])
    np.testing.assert_array_equal(out.token_ids, [V - 2, eos, 5, V - 2, V - 1])
    # Sampling never draws a suppressed id or an id biased to -100, and does draw the rest.
    N = 2000
    flat = np.zeros((N, 6), np.float32)
    p = SamplingParams(min_tokens=5, stop_token_ids=[1], logit_bias={4: -100.0})
    out = run(flat, [p] * N, steps=list(range(N)), num_output=[2] * N, eos=[3])
    assert set(np.asarray(out.token_ids).tolist()) == {0, 2, 5}


def test_logprobs_are_raw_log_softmax_with_ordered_top_k():
    rng = np.random.default_rng(4)
    B, V = 5, 200
    logits = rng.normal(scale=2, size=(B, V)).astype(np.float32)
    params = [SamplingParams(temperature=0.3, top_k=7, repetition_penalty=1.5, logprobs=5)] * B
    tokens = (pack_token_ids([[1, 2, 3]] * B, B), pack_token_ids([[3]] * B, B))
    out = run(logits, params, seeds=list(range(B)), tokens=tokens)
    raw = log_softmax(logits)
    assert out.top_ids.shape == (B, MAX_LOGPROBS) and out.top_ids.dtype == jnp.int32
    np.testing.assert_array_equal(out.top_ids, np.argsort(-raw, axis=-1)[:, :MAX_LOGPROBS])
    np.testing.assert_allclose(
        out.top_logprobs, np.sort(raw, -1)[:, ::-1][:, :MAX_LOGPROBS], atol=1e-5
    )
    np.testing.assert_allclose(out.logprob, raw[np.arange(B), out.token_ids], atol=1e-5)
    none = run(logits, [SamplingParams(temperature=0.0)] * B)
    assert none.top_ids.shape == (B, 0) and none.top_logprobs.shape == (B, 0)
    np.testing.assert_allclose(none.logprob, raw.max(-1), atol=1e-5)


def test_pack_pads_rows_and_normalises_greedy():
    params = [
        SamplingParams(temperature=0.9, top_k=-1, top_p=0.8, min_p=0.1, logit_bias={2: 1.0}),
        SamplingParams(temperature=0.9, top_k=1, top_p=0.5),  # greedy through top_k = 1
        None,
    ]
    t = pack_sampling_tensors(params, [4, 5, 0], [2**32 + 3, -1, 0], [0, 0, 0], 2, 8)
    assert isinstance(t, SamplingTensors) and t.temperature.shape == (8,)
    np.testing.assert_allclose(t.temperature, [0.9, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(t.top_p, [0.8] + [1.0] * 7)
    assert t.top_k.tolist() == [0] * 8 and t.seed.dtype == np.uint32
    assert t.seed.tolist()[:2] == [3, 2**32 - 1] and t.step.tolist()[:3] == [4, 5, 0]
    assert t.bias_ids.shape == (8, 4) and t.bias_ids[0].tolist() == [2, -1, -1, -1]
    assert t.suppress.shape == (8, 4) and (t.suppress == -1).all()
    assert pack_sampling_tensors(params, [0] * 3, [0] * 3, [0] * 3, 2, 3, bias_width=1)
    with pytest.raises(ValueError, match="batch_size=2"):
        pack_sampling_tensors(params, [0] * 3, [0] * 3, [0] * 3, 2, 2)
    with pytest.raises(ValueError, match="steps"):
        pack_sampling_tensors(params, [0] * 2, [0] * 3, [0] * 3, 2, 4)
    with pytest.raises(ValueError, match="bias_width=0"):
        pack_sampling_tensors(params, [0] * 3, [0] * 3, [0] * 3, 2, 4, bias_width=0)
    assert sampler_flags(params) == SamplerFlags(False, True, False, 0)
    assert sampler_flags([params[1], None]) == SamplerFlags(True, False, False, 0)
    assert sampler_flags([SamplingParams(presence_penalty=0.5, logprobs=2)]) == SamplerFlags(
        False, False, True, MAX_LOGPROBS
    )


def test_traces_at_the_largest_shapes():
    B, V = 512, 152_064
    t = pack_sampling_tensors([SamplingParams(top_k=50)] * B, [0] * B, [0] * B, [0] * B, 0, B)
    t = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)
    tokens = jax.ShapeDtypeStruct((B, 1024), jnp.int32)
    out = jax.eval_shape(
        lambda x, t, p, o: sample(
            x,
            t,
            p,
            o,
            all_greedy=False,
            use_top_k_top_p=True,
            use_penalties=True,
            num_top_logprobs=MAX_LOGPROBS,
        ),
        jax.ShapeDtypeStruct((B, V), jnp.bfloat16),
        t,
        tokens,
        tokens,
    )
    assert out.token_ids.shape == (B,) and out.top_logprobs.shape == (B, MAX_LOGPROBS)
