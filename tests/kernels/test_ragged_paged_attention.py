"""Ragged paged attention: every path against the reference, the reference against numpy.

Cases are random: shuffled non-contiguous page tables, every unused page and the unused tail of
each sequence's last page filled with NaN (a stray read shows as NaN), mixed decode + prefill chunks
whose boundaries fall off page boundaries, padding sequence rows and padding tokens. Shapes stay
fixed within a test so one compile serves several random instances.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
    ref_ragged_paged_attention as jax_tpu_ref,
)

from rtpjax.kernels import ragged_paged_attention as rpa
from rtpjax.kernels import ragged_paged_attention_gpu as gpu

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def make_case(rng, q_lens, kv_lens, *, K=2, G=2, H=64, page_size=16, dtype=jnp.float32,
              max_seqs=None, tokens=None, pages_per_seq=None):  # fmt: skip
    """A paged problem; returns (args tuple of jnp arrays, numpy float64 copies for the oracle)."""
    n = len(q_lens)
    B = max_seqs or n
    need = [-(-k // page_size) for k in kv_lens]
    pps = pages_per_seq or max(need)
    P = sum(need) + 4  # spare pages stay NaN; page 0 is the null page
    kv = np.full((P, page_size, 2 * K, H), np.nan, np.float32)
    perm = rng.permutation(np.arange(1, P))
    table = np.zeros((B, pps), np.int32)
    table[:, :] = rng.integers(0, P, (B, pps))  # unused entries point anywhere
    c = 0
    for b, kl in enumerate(kv_lens):
        table[b, : need[b]] = perm[c : c + need[b]]
        c += need[b]
        for i in range(need[b]):
            cnt = min(page_size, kl - i * page_size)
            kv[table[b, i], :cnt] = rng.standard_normal((cnt, 2 * K, H))
    T = tokens or sum(q_lens)
    q = rng.standard_normal((T, K * G, H)).astype(np.float32)
    cu = np.zeros(B + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(q_lens)
    cu[n + 1 :] = cu[n]
    kvl = np.zeros(B, np.int32)
    kvl[:n] = kv_lens
    args = (jnp.asarray(q, dtype), jnp.asarray(kv, dtype), jnp.asarray(kvl), jnp.asarray(table),
            jnp.asarray(cu), jnp.asarray([n], jnp.int32))  # fmt: skip
    # The oracle sees exactly the rounded values the kernels see.
    q64 = np.asarray(args[0].astype(jnp.float32), np.float64)
    kv64 = np.asarray(args[1].astype(jnp.float32), np.float64)
    return args, (q64, kv64, kvl, table, cu, n)


def numpy_attention(case, *, sm_scale, sliding_window=None, soft_cap=None) -> np.ndarray:
    """Independent float64 oracle, one sequence at a time."""
    q, kv, kvl, table, cu, n = case
    N, H = q.shape[1:]
    K = kv.shape[2] // 2
    G = N // K
    out = np.zeros_like(q)
    for b in range(n):
        q_b = q[cu[b] : cu[b + 1]]  # [q_len, N, H]
        q_len, kv_len = len(q_b), kvl[b]
        toks = kv[table[b]].reshape(-1, 2 * K, H)[:kv_len]  # [S, 2K, H]
        k = np.repeat(toks[:, 0::2], G, axis=1)  # [S, N, H]
        v = np.repeat(toks[:, 1::2], G, axis=1)
        s = np.einsum("qnh,snh->nqs", q_b, k) * sm_scale
        if soft_cap is not None:
            s = soft_cap * np.tanh(s / soft_cap)
        qpos = kv_len - q_len + np.arange(q_len)[:, None]
        j = np.arange(kv_len)[None, :]
        ok = j <= qpos
        if sliding_window is not None:
            ok &= j > qpos - sliding_window
        s = np.where(ok[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[cu[b] : cu[b + 1]] = np.einsum("nqs,snh->qnh", p, v)
    return out


def assert_close(out, want, dtype, n_valid):
    out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
    assert np.isfinite(out).all(), "NaN/inf in the output: a stray read of an unused page?"
    assert (out[n_valid:] == 0).all(), "padding tokens must be zero"
    err = np.linalg.norm(out[:n_valid] - want[:n_valid]) / np.linalg.norm(want[:n_valid])
    assert err < TOL[dtype], f"relative error {err:.2e} over {TOL[dtype]}"


def mixed_lens(rng, n, max_kv, page_size):
    """Decodes, chunks starting mid-page, whole prefills and one-token sequences mixed."""
    q_lens, kv_lens = [], []
    for i in range(n):
        kv_len = int(rng.integers(1, max_kv + 1))
        kind = i % 4
        q_len = {0: 1, 1: kv_len, 2: min(kv_len, int(rng.integers(2, 3 * page_size)))}.get(kind, 1)
        if kind == 3:  # a chunk ending exactly on a page boundary, started off one
            kv_len = max(page_size, kv_len // page_size * page_size)
            q_len = min(kv_len, page_size + 3)
        q_lens.append(q_len)
        kv_lens.append(kv_len)
    return q_lens, kv_lens


# Several shapes, each compiled once per path: (K, G, H, page_size, dtype, seqs, max_kv).
SHAPES = [
    (2, 4, 64, 16, jnp.float32, 5, 150),
    (1, 8, 128, 32, jnp.bfloat16, 4, 300),
    (4, 1, 64, 64, jnp.float32, 4, 200),
    (3, 3, 64, 128, jnp.bfloat16, 3, 400),  # SmolLM2's heads
]


def _fixed(rng, K, G, H, ps, dtype, n, max_kv):
    """Random lengths padded into one fixed bucket (so one compile serves every draw)."""
    q_lens, kv_lens = mixed_lens(rng, n, max_kv, ps)
    pps = -(-max_kv // ps) + 1
    tokens = n * max_kv + 7
    return make_case(rng, q_lens, kv_lens, K=K, G=G, H=H, page_size=ps, dtype=dtype,
                     max_seqs=n + 2, tokens=tokens, pages_per_seq=pps)  # fmt: skip


@pytest.mark.parametrize(
    "shape",
    [SHAPES[0], SHAPES[3], *(pytest.param(s, marks=pytest.mark.slow) for s in SHAPES[1:3])],
    ids=lambda s: f"K{s[0]}G{s[1]}H{s[2]}ps{s[3]}",
)
def test_reference_matches_numpy(shape):
    rng = np.random.default_rng(1)
    K, G, H, ps, dtype, n, max_kv = shape
    ref = jax.jit(functools.partial(rpa.ref_ragged_paged_attention, sm_scale=H**-0.5))
    for _ in range(2):
        args, case = _fixed(rng, K, G, H, ps, dtype, n, max_kv)
        want = numpy_attention(case, sm_scale=H**-0.5)
        assert_close(ref(*args), want, dtype, int(case[4][n]))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s[0]}G{s[1]}H{s[2]}ps{s[3]}")
def test_xla_path_matches_numpy(shape):
    rng = np.random.default_rng(2)
    K, G, H, ps, dtype, n, max_kv = shape
    f = jax.jit(functools.partial(rpa.ragged_paged_attention, sm_scale=H**-0.5, impl="xla"))
    for _ in range(3):
        args, case = _fixed(rng, K, G, H, ps, dtype, n, max_kv)
        assert_close(f(*args), numpy_attention(case, sm_scale=H**-0.5), dtype, int(case[4][n]))


@pytest.mark.parametrize(
    "cfg",
    [
        gpu.GpuConfig(16, 16, 1, prefetch=0),
        gpu.GpuConfig(16, 32, 3, prefetch=1),
        gpu.GpuConfig(32, 16, 2, prefetch=2),
    ],
    ids=["plain", "split3-prefetch1", "m32-split2-prefetch2"],
)
def test_gpu_kernel_interpret_matches_reference(cfg):
    rng = np.random.default_rng(3)
    K, G, H, ps, dtype, n, max_kv = 2, 4, 64, 16, jnp.float32, 4, 90
    f = jax.jit(
        functools.partial(
            gpu.gpu_ragged_paged_attention, sm_scale=0.125, config=cfg, interpret=True
        )
    )
    ref = jax.jit(functools.partial(rpa.ref_ragged_paged_attention, sm_scale=0.125))
    for _ in range(2):
        args, case = _fixed(rng, K, G, H, ps, dtype, n, max_kv)
        assert_close(f(*args), np.asarray(ref(*args), np.float64), dtype, int(case[4][n]))


def test_gpu_kernel_interpret_bf16_gqa8_default_config():
    rng = np.random.default_rng(4)
    args, case = make_case(rng, [1, 20, 1], [40, 33, 70], K=1, G=8, H=128, page_size=32,
                           dtype=jnp.bfloat16, max_seqs=4, tokens=25)  # fmt: skip
    out = gpu.gpu_ragged_paged_attention(*args, sm_scale=0.1, interpret=True)
    assert_close(out, numpy_attention(case, sm_scale=0.1), jnp.bfloat16, 22)


@pytest.mark.parametrize("path", ["reference", "xla", "gpu"])
def test_soft_cap_and_sliding_window(path):
    rng = np.random.default_rng(5)
    kw = dict(sm_scale=0.3, sliding_window=13, soft_cap=2.5)
    args, case = make_case(rng, [1, 30, 5, 1], [50, 30, 64, 17], page_size=16, max_seqs=5,
                           tokens=40)  # fmt: skip
    if path == "gpu":
        cfg = gpu.GpuConfig(16, 16, 2)
        out = gpu.gpu_ragged_paged_attention(*args, **kw, config=cfg, interpret=True)
    else:
        out = rpa.ragged_paged_attention(*args, **kw, impl=path)
    assert_close(out, numpy_attention(case, **kw), jnp.float32, 37)


def test_window_changes_the_result():
    """Guards the test above: the window and the cap must actually matter on these inputs."""
    rng = np.random.default_rng(5)
    _, case = make_case(rng, [1, 30, 5, 1], [50, 30, 64, 17], page_size=16)
    full = numpy_attention(case, sm_scale=0.3)
    assert np.abs(full - numpy_attention(case, sm_scale=0.3, sliding_window=13)).max() > 1e-2
    assert np.abs(full - numpy_attention(case, sm_scale=0.3, soft_cap=2.5)).max() > 1e-2


@pytest.mark.parametrize(
    "window_cap", [(9, 4.0), pytest.param((None, None), marks=pytest.mark.slow)]
)
def test_tpu_dispatch_through_jax_tpu_reference(window_cap):
    """The TPU path's adaptation, fed to jax's own TPU reference, equals ours."""
    window, cap = window_cap
    rng = np.random.default_rng(6)
    kw = dict(sm_scale=0.2, sliding_window=window, soft_cap=cap)
    args, _ = make_case(rng, [3, 1, 17], [40, 9, 17], K=2, G=2, page_size=16, max_seqs=5,
                           tokens=24)  # fmt: skip
    out = rpa.tpu_ragged_paged_attention(*args, **kw, kernel=jax_tpu_ref)  # [21, N, H]
    ours = jax.jit(functools.partial(rpa.ref_ragged_paged_attention, **kw))(*args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ours[:21]), atol=2e-5, rtol=2e-5)


def test_kv_lengths_to_4096_and_large_pages():
    rng = np.random.default_rng(7)
    args, case = make_case(rng, [1, 1, 37, 1], [4096, 1, 2100, 700], K=1, G=4, H=64,
                           page_size=128, max_seqs=4, tokens=48)  # fmt: skip
    want = numpy_attention(case, sm_scale=0.125)
    for path in ("xla", "reference"):
        out = rpa.ragged_paged_attention(*args, sm_scale=0.125, impl=path)
        assert_close(out, want, jnp.float32, 40)


def test_reference_jits_with_traced_num_seqs():
    rng = np.random.default_rng(8)
    args, _ = make_case(rng, [2, 3, 4], [10, 20, 30], max_seqs=4, tokens=12)
    f = jax.jit(functools.partial(rpa.ref_ragged_paged_attention, sm_scale=0.125))
    full = f(*args)
    fewer = f(*args[:5], jnp.asarray([2], jnp.int32))  # same compile, one sequence dropped
    np.testing.assert_allclose(np.asarray(fewer[:5]), np.asarray(full[:5]), rtol=1e-6)
    assert (np.asarray(fewer[5:]) == 0).all()
    assert f._cache_size() == 1


def test_padding_only_step_is_zero_and_finite():
    rng = np.random.default_rng(9)
    args, _ = make_case(rng, [4], [9], max_seqs=3, tokens=8)
    args = (*args[:5], jnp.asarray([0], jnp.int32))
    for path in ("xla", "reference"):
        out = rpa.ragged_paged_attention(*args, sm_scale=0.5, impl=path)
        assert (np.asarray(out) == 0).all()
    out = gpu.gpu_ragged_paged_attention(*args, sm_scale=0.5, interpret=True)
    assert (np.asarray(out) == 0).all()


def test_auto_on_cpu_is_the_xla_path():
    assert rpa.resolve_impl("auto", 64, jnp.float32) == "xla"
    assert rpa.resolve_impl("gpu", 64, jnp.float32) == "gpu"


def test_gpu_path_picks_mosaic_kernel_for_prefill_on_hopper(monkeypatch):
    """impl "gpu": the Mosaic GPU kernel for prefill-like steps on Hopper, Triton's otherwise."""
    bf = jnp.bfloat16
    q, pages = jnp.zeros((64, 32, 128), bf), jnp.zeros((20, 16, 16, 128), bf)
    table = jnp.zeros((8, 4), jnp.int32)  # B = 8 sequences
    kw = dict(sm_scale=0.1, sliding_window=None, soft_cap=None)
    monkeypatch.setattr(rpa, "_is_hopper", lambda: True)
    assert rpa._mgpu_fits(q, pages, table, None, **kw)  # T = 64 > B: prefill-like
    assert rpa._mgpu_fits(q, pages, table, 512, **kw)
    assert not rpa._mgpu_fits(q, pages, table, 1, **kw)  # decode-only step
    assert not rpa._mgpu_fits(q[:8], pages, table, None, **kw)  # T <= B, no bound: decode-like
    assert not rpa._mgpu_fits(q.astype(jnp.float32), pages.astype(jnp.float32), table, None,
                              **kw)  # fmt: skip
    monkeypatch.setattr(rpa, "_is_hopper", lambda: False)
    assert not rpa._mgpu_fits(q, pages, table, None, **kw)


def test_choose_config_decode_and_prefill():
    dec = gpu.choose_config(64, 64, 32, 8, 128, 2048, num_sms=132)
    assert (dec.block_m, dec.block_s, dec.num_splits, dec.num_stages) == (16, 64, 1, 2)
    # Few programs: split the kv range (flash-decoding). 512-2,048 keys per split at one
    # program per SM: that grid, tiles of 64 keys, a 5-deep ring.
    for B, ctx, splits in ((1, 8192, 16), (1, 32768, 16), (4, 2048, 4), (8, 2048, 2)):
        mid = gpu.choose_config(B, B, 32, 8, 128, ctx, max_q_len=1, num_sms=132)
        assert (mid.block_s, mid.num_splits, mid.num_stages) == (64, splits, 5), (B, ctx)
    # Longer ranges, or a ring too big for shared memory (float32 KV at head_dim 128 on an
    # H100; bf16 on a GPU with 163 KB a block), or splits too short to fill it: short tiles,
    # many splits, 3 stages.
    for B, ctx, itemsize, smem in ((8, 8192, 2, None), (1, 8192, 4, None), (8, 512, 2, None),
                                   (1, 8192, 2, 163 * 1024)):  # fmt: skip
        small = gpu.choose_config(B, B, 32, 8, 128, ctx, max_q_len=1, num_sms=132,
                                  itemsize=itemsize, smem_bytes=smem)  # fmt: skip
        assert small.num_splits >= 8 and (small.block_s, small.num_stages) == (32, 3), (B, ctx)
    # A short range over few programs: one tile per split, about one program per SM.
    for ctx, block_s in ((512, 32), (2048, 128)):
        short = gpu.choose_config(1, 1, 32, 8, 128, ctx, max_q_len=1, num_sms=132)
        assert (short.block_s, short.num_splits, short.num_stages) == (block_s, 16, 2)
    one_program = gpu.choose_config(1, 1, 8, 1, 128, 4096, max_q_len=1, num_sms=132)
    assert one_program.num_splits <= gpu.MAX_SPLITS  # one tile each would need 128 splits
    pre = gpu.choose_config(4096, 8, 32, 8, 128, 4096, max_q_len=4096, num_sms=132)
    assert (pre.block_m, pre.num_splits) == (128, 1)


@pytest.mark.parametrize(
    "cc, kib", [("9.0", 227), ("10.0", 227), ("8.0", 163), ("8.7", 163), ("8.9", 99), ("12.0", 99)]
)
def test_smem_per_block_by_compute_capability(monkeypatch, cc, kib):
    class Dev:
        compute_capability = cc

    monkeypatch.setattr(gpu.jax, "devices", lambda: [Dev()])
    assert gpu._smem_per_block() == kib * 1024


def test_q_block_map_covers_every_token_once():
    cu = jnp.asarray([0, 1, 6, 6, 23, 23, 23], jnp.int32)  # B=6, one empty live sequence
    blk_seq, blk_q0, _ = rpa.q_block_map(cu, jnp.asarray([4], jnp.int32), 4, 20)
    seen = []
    for s, q0 in zip(np.asarray(blk_seq), np.asarray(blk_q0), strict=True):
        if s >= 0:
            q_len = int(cu[s + 1] - cu[s])
            seen += [int(cu[s]) + t for t in range(q0, min(q0 + 4, q_len))]
    assert sorted(seen) == list(range(23))
    assert rpa.num_q_blocks(23, 6, 4) >= int((np.asarray(blk_seq) >= 0).sum())


BAD = [
    ("q", lambda a: (a[0][None], *a[1:]), "q.shape"),
    ("kv_pages", lambda a: (a[0], a[1][:, :, :3], *a[2:]), "kv_pages.shape[2]"),
    ("head_dim", lambda a: (a[0][..., :32], *a[1:]), "head_dim"),
    ("heads", lambda a: (a[0][:, :3], *a[1:]), "N=3"),
    ("page_size", lambda a: (a[0], a[1][:, :12], *a[2:]), "page_size=12"),
    ("dtype", lambda a: (a[0].astype(jnp.bfloat16), *a[1:]), "kv_pages.dtype"),
    ("kv_lens", lambda a: (*a[:2], a[2][:1], *a[3:]), "kv_lens.shape"),
    ("int32", lambda a: (*a[:4], a[4].astype(jnp.float32), a[5]), "cu_q_lens.dtype"),
    ("num_seqs", lambda a: (*a[:5], jnp.asarray(1, jnp.int32)), "num_seqs.shape"),
]


@pytest.mark.parametrize("mutate,needle", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_validation_names_the_argument(mutate, needle):
    rng = np.random.default_rng(10)
    args, _ = make_case(rng, [2, 1], [5, 9])
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        rpa.ragged_paged_attention(*mutate(args), sm_scale=1.0)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(sliding_window=0), "sliding_window"),
        (dict(soft_cap=-1.0), "soft_cap"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_validation_of_options(kw, needle):
    rng = np.random.default_rng(11)
    args, _ = make_case(rng, [2], [5])
    with pytest.raises(ValueError, match=needle):
        rpa.ragged_paged_attention(*args, sm_scale=1.0, **kw)


def test_gpu_rejects_unsupported_head_dim():
    rng = np.random.default_rng(12)
    args, _ = make_case(rng, [2], [5], H=32)
    with pytest.raises(ValueError, match="head_dim=32"):
        gpu.gpu_ragged_paged_attention(*args, sm_scale=1.0, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_sweep_random_shapes(seed):
    """Many random shapes, every CPU-runnable path (xla, kernel in interpret mode) vs numpy."""
    rng = np.random.default_rng(100 + seed)
    K = int(rng.choice([1, 2, 4]))
    G = int(rng.choice([1, 4, 8]))
    H = int(rng.choice([64, 128]))
    ps = int(rng.choice([16, 32, 64, 128]))
    dtype = [jnp.float32, jnp.bfloat16][seed % 2]
    window = [None, int(rng.integers(1, 300))][seed % 3 == 0]
    q_lens, kv_lens = mixed_lens(rng, 6, int(rng.integers(50, 1200)), ps)
    args, case = make_case(rng, q_lens, kv_lens, K=K, G=G, H=H, page_size=ps, dtype=dtype,
                           max_seqs=8, tokens=sum(q_lens) + 5)  # fmt: skip
    kw = dict(sm_scale=H**-0.5, sliding_window=window)
    want = numpy_attention(case, **kw)
    n_valid = sum(q_lens)
    assert_close(rpa.ragged_paged_attention(*args, **kw, impl="xla"), want, dtype, n_valid)
    for cfg in (None, gpu.GpuConfig(16, 64, 3, prefetch=1)):
        out = gpu.gpu_ragged_paged_attention(*args, **kw, config=cfg, interpret=True)
        assert_close(out, want, dtype, n_valid)


@pytest.mark.parametrize("S,merge_kernel", [(1, True), (3, True), (5, False)])
def test_gpu_kernel_decode_only_step_maps_block_to_sequence(S, merge_kernel):
    """max_q_len=1: block i is sequence i (no block map). Live sequences without a token this
    step, fewer live sequences than rows, padding tokens: each token still gets its own
    sequence's attention, everything else stays zero."""
    rng = np.random.default_rng(21)
    q_lens, kv_lens = [1, 0, 1, 1, 0, 1], [37, 5, 1, 80, 16, 64]
    args, case = make_case(rng, q_lens, kv_lens, K=2, G=4, H=64, page_size=16, max_seqs=8,
                           tokens=7, pages_per_seq=6)  # fmt: skip
    want = numpy_attention(case, sm_scale=0.2)
    cfg = gpu.GpuConfig(16, 16, S, merge_kernel=merge_kernel)
    out = gpu.gpu_ragged_paged_attention(*args, sm_scale=0.2, config=cfg, max_q_len=1,
                                         interpret=True)  # fmt: skip
    assert_close(out, want, jnp.float32, sum(q_lens))
    # The same step through the block map (no bound given) agrees to the last bit.
    mapped = gpu.gpu_ragged_paged_attention(*args, sm_scale=0.2, config=cfg, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(mapped))
