"""Prefill over a cached prefix (kernels/prefix_prefill.py): the "xla" path (gather, two parts with
LSE, merge) against the reference, the reference against a float64 numpy oracle, the merge alone,
the overflow contract, and the "cudnn" path's plumbing on CPU: through a jnp model of jax's cuDNN
binding (packed segments, stats [M, N, T] per segment, garbage where cuDNN writes nothing) and
through its CUDA lowering. The real cuDNN call runs in scripts/bench_attention.py on the GPU.

Pages are shuffled; every slot that is not a cached prefix position (unused pages, the chunk's own
slots, the tail of the last page) holds NaN, so a stray read shows.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels import prefix_prefill as pp

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def make_case(rng, q_lens, ctx_lens, *, K=2, G=2, H=64, page_size=16, dtype=jnp.float32,
              max_seqs=None, pad_tokens=3):  # fmt: skip
    """Returns (args for prefix_prefill_attention, float64 pieces for the numpy oracle)."""
    n = len(q_lens)
    B = max_seqs or n
    kv_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    need = [-(-kl // page_size) for kl in kv_lens]
    pps = max(need) + 1
    P = sum(need) + 3
    kv = np.full((P, page_size, 2 * K, H), np.nan, np.float32)
    table = rng.integers(0, P, (B, pps)).astype(np.int32)  # unused entries point anywhere
    perm, c = rng.permutation(np.arange(1, P)), 0
    prefixes = []
    for b in range(n):
        table[b, : need[b]] = perm[c : c + need[b]]
        c += need[b]
        pre = rng.standard_normal((ctx_lens[b], 2 * K, H)).astype(np.float32)
        flat = kv[table[b, : need[b]]].reshape(-1, 2 * K, H)
        flat[: ctx_lens[b]] = pre  # only the cached prefix is real; chunk slots stay NaN
        kv[table[b, : need[b]]] = flat.reshape(need[b], page_size, 2 * K, H)
        prefixes.append(pre)
    T = sum(q_lens) + pad_tokens
    q = rng.standard_normal((T, K * G, H)).astype(np.float32)
    k = rng.standard_normal((T, K, H)).astype(np.float32)
    v = rng.standard_normal((T, K, H)).astype(np.float32)
    cu = np.zeros(B + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(q_lens)
    cu[n + 1 :] = cu[n]
    kvl = np.zeros(B, np.int32)
    kvl[:n] = kv_lens
    args = (
        jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
        jnp.asarray(kv, dtype), jnp.asarray(table), jnp.asarray(cu), jnp.asarray(kvl),
        jnp.asarray([n], jnp.int32),
    )  # fmt: skip

    def f64(x):  # the oracle sees exactly the rounded values the paths see
        return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)

    oracle = (f64(q), f64(k), f64(v), [f64(p) for p in prefixes], cu, n)
    return args, oracle


def numpy_oracle(oracle, sm_scale) -> np.ndarray:
    """float64, one sequence at a time: softmax over [its prefix, its chunk (causal)]."""
    q, k, v, prefixes, cu, n = oracle
    G = q.shape[1] // k.shape[1]
    out = np.zeros_like(q)
    for b in range(n):
        sl = slice(cu[b], cu[b + 1])
        pre = prefixes[b]
        kk = np.concatenate([pre[:, 0::2], k[sl]])  # [ctx + q_len, K, H]
        vv = np.concatenate([pre[:, 1::2], v[sl]])
        kk, vv = np.repeat(kk, G, axis=1), np.repeat(vv, G, axis=1)
        s = np.einsum("qnh,snh->nqs", q[sl], kk) * sm_scale
        ql, ctx = cu[b + 1] - cu[b], len(pre)
        ok = np.arange(ctx + ql)[None, :] <= ctx + np.arange(ql)[:, None]
        s = np.where(ok[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[sl] = np.einsum("nqs,snh->qnh", p / p.sum(-1, keepdims=True), vv)
    return out


def assert_close(out, want, dtype, n_valid):
    out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
    assert np.isfinite(out).all(), "NaN/inf in the output: a stray read of a NaN slot?"
    assert (out[n_valid:] == 0).all(), "bucket padding tokens must be zero"
    np.testing.assert_allclose(out[:n_valid], want[:n_valid], rtol=TOL[dtype], atol=TOL[dtype])


def run(args, impl, S, sm_scale=0.125):
    return pp.prefix_prefill_attention(*args, sm_scale=sm_scale, max_prefix_tokens=S, impl=impl)


# (K, G, H, page_size, dtype, q_lens, ctx_lens, max_seqs, max_prefix_tokens)
CASES = [
    (2, 1, 64, 16, jnp.float32, [5, 17, 1, 30], [0, 33, 1, 250], 6, 320),
    (1, 4, 128, 64, jnp.float32, [64, 3, 40], [1000, 0, 130], 3, 1152),
    (2, 8, 64, 64, jnp.float32, [1, 100, 7], [64, 127, 0], 4, 256),
    (2, 4, 128, 16, jnp.bfloat16, [33, 8], [163, 1], 2, 192),
    (1, 8, 64, 16, jnp.bfloat16, [128], [999], 1, 1024),
]
IDS = ["G1-H64-ps16-f32", "G4-H128-ps64-f32", "G8-H64-ps64-f32", "G4-H128-bf16", "B1-G8-bf16"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_xla_path_matches_reference_and_reference_matches_numpy(case):
    K, G, H, ps, dtype, q_lens, ctx, B, S = case
    rng = np.random.default_rng(sum(ctx))
    args, oracle = make_case(rng, q_lens, ctx, K=K, G=G, H=H, page_size=ps, dtype=dtype,
                             max_seqs=B)  # fmt: skip
    scale = H**-0.5
    n_valid = sum(q_lens)
    ref = run(args, "reference", S, scale)
    assert_close(ref, numpy_oracle(oracle, scale), dtype, n_valid)
    out = run(args, "xla", S, scale)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert_close(out, np.asarray(ref.astype(jnp.float32), np.float64), dtype, n_valid)
    assert_close(run(args, "auto", S, scale), np.asarray(out.astype(jnp.float32)), dtype, n_valid)


def test_sequences_without_prefix_equal_the_chunk_alone():
    """ctx_b = 0 rows must be part B's output exactly, whatever the other sequences hold."""
    rng = np.random.default_rng(7)
    args, _ = make_case(rng, [9, 12, 6], [0, 40, 0], max_seqs=4)
    full = np.asarray(run(args, "xla", 64))
    # max_prefix_tokens=0 skips part A statically: the chunk-only attention, no merge input.
    alone = np.asarray(run(args, "xla", 0))
    for lo, hi in ((0, 9), (21, 27)):
        np.testing.assert_array_equal(full[lo:hi], alone[lo:hi])
    assert np.isnan(alone[9:21]).all(), "the sequence whose prefix does not fit is NaN"
    assert not np.array_equal(full[9:21], np.nan_to_num(alone[9:21]))


def test_overflowing_prefixes_come_out_nan_and_the_rest_stay_exact():
    rng = np.random.default_rng(8)
    q_lens, ctx = [4, 6, 3, 5], [30, 0, 50, 10]
    args, oracle = make_case(rng, q_lens, ctx, max_seqs=5)
    want = numpy_oracle(oracle, 0.125)
    out = np.asarray(run(args, "xla", 60), np.float64)  # fits: 30 | 0 | 30+50 > 60 | 90 > 60
    rows = np.repeat(np.arange(4), q_lens)
    bad = np.isin(rows, [2, 3])
    assert np.isnan(out[:18][bad]).all()
    np.testing.assert_allclose(out[:18][~bad], want[:18][~bad], rtol=1e-5, atol=1e-5)
    assert (out[18:] == 0).all()


def test_gather_prefix_packs_prefixes_end_to_end():
    rng = np.random.default_rng(9)
    q_lens, ctx = [3, 2, 5], [17, 0, 40]
    args, oracle = make_case(rng, q_lens, ctx, K=3, page_size=16, max_seqs=5)
    _, _, _, kv_pages, table, cu, kvl, ns = args
    k_p, v_p, cu_p = jax.jit(pp.gather_prefix, static_argnums=5)(kv_pages, table, cu, kvl, ns, 64)
    np.testing.assert_array_equal(cu_p, [0, 17, 17, 57, 57, 57])
    pre = np.concatenate(oracle[3])  # [57, 2K, H]
    np.testing.assert_array_equal(np.asarray(k_p)[:57], pre[:, 0::2])
    np.testing.assert_array_equal(np.asarray(v_p)[:57], pre[:, 1::2])
    assert k_p.shape == (64, 3, 64) and not np.asarray(k_p)[57:].any()
    assert not np.asarray(v_p)[57:].any(), "padding rows are zeros (the NaN slots are not read)"
    # Overflow: clipped offsets, the buffer filled in sequence order.
    k_p, _, cu_p = pp.gather_prefix(kv_pages, table, cu, kvl, ns, 30)
    np.testing.assert_array_equal(cu_p, [0, 17, 17, 30, 30, 30])
    np.testing.assert_array_equal(np.asarray(k_p), pre[:30, 0::2])


def test_merge_matches_softmax_over_the_union():
    rng = np.random.default_rng(10)
    T, N, H, Sa, Sb = 6, 3, 8, 11, 5
    s = rng.standard_normal((T, N, Sa + Sb)) * 4
    vals = rng.standard_normal((Sa + Sb, H))

    def part(sl):  # (o [T, N, H], lse [T, N]) of a softmax over the key slice
        x = s[..., sl]
        lse = np.log(np.exp(x).sum(-1))
        return np.exp(x - lse[..., None]) @ vals[sl], lse

    (o_a, l_a), (o_b, l_b) = part(slice(0, Sa)), part(slice(Sa, None))
    p = np.exp(s - s.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ vals
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    out = pp.merge_attention(f32(o_a), f32(l_a), f32(o_b), f32(l_b))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    # A part with lse -inf contributes nothing, even when its o is NaN; both -inf give 0.
    both = jnp.full((T, N), -jnp.inf)
    out = pp.merge_attention(jnp.full((T, N, H), jnp.nan), both, f32(o_b), f32(l_b))
    np.testing.assert_array_equal(out, f32(o_b))
    out = pp.merge_attention(jnp.full((T, N, H), jnp.nan), both, f32(o_b), both)
    np.testing.assert_array_equal(out, 0.0)


# ----------------------------------------------------------------------------- cudnn plumbing


def fake_cudnn_sdpa(q, k, v, bias, mask, q_seqlen, kv_seqlen, q_offsets, kv_offsets, *, scale,
                    mask_type, qkv_layout, return_residual):  # fmt: skip
    """A jnp model of jax's cuDNN binding with the packed layout, as prefix_prefill relies on it:
    segment m = q rows q_offsets[m] + [0, q_seqlen[m]) against kv rows kv_offsets[m] +
    [0, kv_seqlen[m]), top-left causal if asked; stats[m, n, i] = natural-log LSE of the scaled
    scores of the segment's query i. Rows cuDNN does not write (outside every segment, past a
    segment's length) are NaN here, so reading them shows; a segment without keys gets a NaN
    output and a finite LSE, so only masking it by length keeps it out of the merge."""
    assert bias is None and mask is None and qkv_layout == "BTNH" and return_residual
    causal = mask_type.name == "PADDING_CAUSAL"
    assert causal or mask_type.name == "PADDING"
    _, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    M = q_seqlen.shape[1]
    ql, kl = q_seqlen[0], kv_seqlen[0]  # i32[M], -1 for unused rows
    qo = q_offsets[0, :M] if M > 1 else jnp.zeros(1, jnp.int32)  # M = 1: offsets ignored
    ko = kv_offsets[0, :M] if M > 1 else jnp.zeros(1, jnp.int32)
    t, s_ = jnp.arange(T), jnp.arange(S)
    in_q = (qo[:, None] <= t) & (t < qo[:, None] + ql[:, None])  # bool[M, T]
    seg = jnp.argmax(in_q, axis=0)  # i32[T]
    has = in_q.any(0)
    i = t - qo[seg]
    vis = (ko[seg][:, None] <= s_) & (s_ < (ko[seg] + kl[seg])[:, None]) & has[:, None]
    if causal:
        vis &= (s_[None, :] - ko[seg][:, None]) <= i[:, None]
    qg = q[0].astype(jnp.float32).reshape(T, K, N // K, H)
    sc = jnp.einsum("TKGH,SKH->KGTS", qg, k[0].astype(jnp.float32)) * scale
    sc = jnp.where(vis, sc, -jnp.inf)
    lse = jax.nn.logsumexp(sc, axis=-1)  # f32[K, G, T], -inf without keys
    o = jnp.einsum("KGTS,SKH->TKGH", jnp.exp(sc - lse[..., None]), v[0].astype(jnp.float32))
    lse = lse.reshape(N, T)
    ok = vis.any(-1)  # bool[T]
    o = jnp.where(ok[:, None, None, None], o, jnp.nan).reshape(1, T, N, H).astype(q.dtype)
    stats = jnp.full((M, N, T), jnp.nan, jnp.float32)
    # A segment without keys: a finite made-up LSE with a NaN output (the worst case to mask).
    lse = jnp.where(ok, lse, 0.0)
    m_idx = jnp.where(has, seg, M)  # rows nobody owns go out of range: dropped
    stats = stats.at[m_idx, :, jnp.where(has, i, 0)].set(lse.T, mode="drop")
    return o, stats


CUDNN_CASES = [
    ([5, 17, 1, 30], [0, 33, 1, 250], 6, 320, 2, 2, 64),  # padding rows and tokens, ctx 0 and 1
    ([40], [300], 1, 320, 1, 4, 128),  # one sequence row: cuDNN drops the offsets
    ([7, 9], [0, 0], 2, 64, 2, 2, 64),  # no prefix anywhere: part A all masked
]


@pytest.mark.parametrize("case", CUDNN_CASES, ids=["mixed", "B1", "no-prefix"])
def test_cudnn_path_through_a_model_of_the_binding(monkeypatch, case):
    monkeypatch.setattr(pp, "_cudnn_sdpa", lambda: fake_cudnn_sdpa)
    q_lens, ctx, B, S, K, G, H = case
    rng = np.random.default_rng(11)
    args, oracle = make_case(rng, q_lens, ctx, K=K, G=G, H=H, dtype=jnp.bfloat16, max_seqs=B)
    out = run(args, "cudnn", S, H**-0.5)
    assert out.dtype == jnp.bfloat16
    assert_close(out, numpy_oracle(oracle, H**-0.5), jnp.bfloat16, sum(q_lens))


def test_cudnn_path_lowers_to_two_cudnn_calls(monkeypatch):
    """The real binding, traced and lowered for CUDA on this CPU machine (its cuDNN version and
    compute-capability probes patched): part B causal over the chunk, part A padding over the
    prefix buffer, packed with B segments, stats f32[B, N, T]."""
    from jax import export
    from jax._src.cudnn import fused_attention_stablehlo as fa

    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda cap: True)
    T, N, K, H, B, P, ps, pps, S = 64, 8, 2, 128, 3, 20, 16, 6, 96
    sds = jax.ShapeDtypeStruct
    args = (
        sds((T, N, H), jnp.bfloat16), sds((T, K, H), jnp.bfloat16), sds((T, K, H), jnp.bfloat16),
        sds((P, ps, 2 * K, H), jnp.bfloat16), sds((B, pps), jnp.int32), sds((B + 1,), jnp.int32),
        sds((B,), jnp.int32), sds((1,), jnp.int32),
    )  # fmt: skip
    f = jax.jit(lambda *a: run(a, "cudnn", S))
    assert jax.eval_shape(f, *args) == sds((T, N, H), jnp.bfloat16)
    target = "__cudnn$fmhaSoftmax"
    check = export.DisabledSafetyCheck.custom_call(target)
    text = export.export(f, platforms=["cuda"], disabled_checks=[check])(*args).mlir_module()
    calls = [ln for ln in text.splitlines() if f"custom_call @{target}" in ln]
    assert len(calls) == 2, "one cuDNN call per part"
    masks = [re.search(r"mask_type\\22: \\22(\w+)", c).group(1) for c in calls]
    assert sorted(masks) == ["PADDING", "PADDING_CAUSAL"]
    for c, mask in zip(calls, masks):
        kv_rows = T if mask == "PADDING_CAUSAL" else S
        assert f"tensor<1x{kv_rows}x{K}x{H}xbf16>" in c
        assert f"max_seg_per_batch\\22: {B}" in c
        assert f"tensor<{B}x{N}x{T}xf32>" in c, "stats (B*max_seg, N, T)"


def test_bad_inputs_are_refused():
    rng = np.random.default_rng(12)
    args, _ = make_case(rng, [3], [5], max_seqs=1)
    with pytest.raises(ValueError, match="max_prefix_tokens=-1"):
        run(args, "xla", -1)
    with pytest.raises(ValueError, match="impl='flash'"):
        run(args, "flash", 8)
    bad_k = (args[0], args[1][:, :1], *args[2:])
    with pytest.raises(ValueError, match=re.escape("k (shape (6, 1, 64)")):
        run(bad_k, "xla", 8)
    bad_v = (*args[:2], args[2].astype(jnp.bfloat16), *args[3:])
    with pytest.raises(ValueError, match=r"v .* in q.dtype=float32"):
        run(bad_v, "xla", 8)
