"""lora_linear (x @ W + LoRA, the expand fused into the GEMM on Hopper) against the reference.

Interpret mode is slow (seconds per kernel call): the default run keeps one case of each kind;
`-m slow` adds the other warpgroup split, the XLA small ops, the one-buffer configuration and
the backward's one-pass u and dB (gmm_tgmm) against its two-kernel form through the whole layer.

The fused kernel runs in Mosaic GPU interpret mode here: tiles are shrunk so that a few hundred
rows straddle slots, visit a tile several times and leave a tail of rows with no adapter.
"""

# ruff: noqa: E741

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels import lora
from rtpjax.kernels import lora_gpu as lg
from rtpjax.kernels import lora_gpu_udb as udb
from rtpjax.kernels import lora_linear as ll
from rtpjax.kernels import lora_matmul_mgpu as mm

SMALL = mm.GemmConfig(tile_m=64, tile_n=64, tile_k=32, stages=2, epi=32, snake_width=2)
SMALL_N = mm.GemmConfig(  # the two warpgroups side by side instead of stacked
    tile_m=64, tile_n=64, tile_k=32, stages=2, epi=32, snake_width=2, wg_split="n"
)


def _case(seed, T=256, I=128, O=256, R=16, sizes=(70, 0, 100, 30, 20), dtype=jnp.bfloat16):
    """Operands with an empty slot, per-slot ranks, NaN in a and b past each slot's rank (never
    to be read) and T - sum(sizes) tail rows."""
    G = len(sizes)
    rng = np.random.default_rng(seed)
    rank = rng.integers(1, R + 1, size=G).astype(np.int32)
    rank[0] = R
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (T, I), jnp.float32).astype(dtype)
    w = (jax.random.normal(k[1], (I, O), jnp.float32) / np.sqrt(I)).astype(dtype)
    a = jax.random.normal(k[2], (G, I, R), jnp.float32) / np.sqrt(I)
    b = jax.random.normal(k[3], (G, R, O), jnp.float32)
    past = jnp.arange(R)[None, :] >= jnp.asarray(rank)[:, None]
    a = jnp.where(past[:, None, :], jnp.nan, a).astype(dtype)
    b = jnp.where(past[:, :, None], jnp.nan, b).astype(dtype)
    dy = jax.random.normal(k[4], (T, O), jnp.float32).astype(dtype)
    scale = jnp.asarray(rng.uniform(-2, 2, size=G), jnp.float32)
    return x, w, a, b, jnp.asarray(np.array(sizes, np.int32)), scale, jnp.asarray(rank), dy


def _vjp(f, dy, *ops):
    """Value and grads in one jitted program: run eagerly, the interpret-mode kernels of
    successive ops are dispatched asynchronously and may run at the same time, which Mosaic GPU's
    interpreter (one global shared-memory model) does not support; it hung that way."""

    def run(dy, *ops):
        y, back = jax.vjp(f, *ops)
        return (y, *back(dy.astype(y.dtype)))

    return jax.block_until_ready(jax.jit(run)(dy, *ops))


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _reference(x, w, a, b, gs, scale, rank, dy):
    past = jnp.arange(a.shape[2])[None, :] >= rank[:, None]
    a = jnp.where(past[:, None, :], 0, a.astype(jnp.float32))
    b = jnp.where(past[:, :, None], 0, b.astype(jnp.float32))
    f = lambda x, w, a, b, s: lora.ref_lora_delta(x, a, b, gs, s, rank=rank, base=x @ w)
    return _vjp(f, dy, x.astype(jnp.float32), w.astype(jnp.float32), a, b, scale)


def check_against_reference(f, x, w, a, b, gs, scale, rank, dy):
    """f's value and grads of x, w, a, b, scale: finite and within bf16 tolerance of the float32
    reference; returns them."""
    got = _vjp(f, dy, x, w, a, b, scale)
    want = _reference(x, w, a, b, gs, scale, rank, dy)
    for name, g, wv in zip(("y", "dx", "dw", "da", "db", "dscale"), got, want, strict=True):
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert _rel(g, wv) < 2e-2, (name, _rel(g, wv))
    return got


@pytest.mark.parametrize(
    "sizes, cfg, small_ops",
    [((10, 20, 30, 40, 50, 60, 46), SMALL, "kernel"),
     pytest.param((70, 0, 100, 30, 20), SMALL, "xla", marks=pytest.mark.slow),
     pytest.param((256,), SMALL, "xla", marks=pytest.mark.slow),
     pytest.param((70, 0, 100, 30, 20), SMALL_N, "kernel", marks=pytest.mark.slow)],
)  # fmt: skip
def test_fused_matches_reference(sizes, cfg, small_ops):
    x, w, a, b, gs, scale, rank, dy = _case(sum(sizes), sizes=sizes)
    f = lambda x, w, a, b, s: ll.lora_linear(
        x, w, a, b, gs, s, rank=rank, impl="fused", gemm_config=cfg, small_ops=small_ops,
        interpret=True,
    )  # fmt: skip
    got = check_against_reference(f, x, w, a, b, gs, scale, rank, dy)
    # Rows past the groups are the base product alone, exactly as the kernel computes x @ W.
    used = int(sum(sizes))
    if used < x.shape[0]:
        base = ll.lora_linear(x, w, a, b, gs * 0, scale, rank=rank, impl="fused",
                              gemm_config=cfg, interpret=True)  # fmt: skip
        np.testing.assert_array_equal(np.asarray(got[0])[used:], np.asarray(base)[used:])


def test_shared_plan_is_the_same_computation():
    """A plan built once (lora_plan) and passed to the call gives the same values and grads as
    the call building it; a plan for other shapes is refused."""
    x, w, a, b, gs, scale, rank, dy = _case(5)
    kw = dict(impl="fused", gemm_config=SMALL, interpret=True)
    plan = ll.lora_plan(gs, x.shape[0], a.shape[2], rank=rank, gemm_config=SMALL)
    own = _vjp(lambda x, a, b: ll.lora_linear(x, w, a, b, gs, scale, rank=rank, **kw), dy, x, a, b)
    shared = _vjp(lambda x, a, b: ll.lora_linear(x, w, a, b, None, scale, plan=plan, **kw), dy,
                  x, a, b)  # fmt: skip
    for o, sh in zip(own, shared, strict=True):
        np.testing.assert_array_equal(np.asarray(o), np.asarray(sh))
    with pytest.raises(ValueError, match="plan for"):
        ll.lora_linear(x[:128], w, a, b, None, scale, plan=plan, **kw)


TWO_PASS = dataclasses.replace(lg.DEFAULT_CONFIG, fused_udb=False)  # u and dB: two kernels


# The default run takes the two-kernel u and dB here; test_fused_matches_reference covers the
# default (one pass over dy) against the reference.
@pytest.mark.parametrize(
    "small_ops, lcfg",
    [("kernel", TWO_PASS),
     pytest.param("kernel", lg.DEFAULT_CONFIG, marks=pytest.mark.slow),
     pytest.param("xla", lg.DEFAULT_CONFIG, marks=pytest.mark.slow)],
)  # fmt: skip
def test_fused_equals_unfused_path(small_ops, lcfg):
    x, w, a, b, gs, scale, rank, dy = _case(3)
    kw = dict(rank=rank, gemm_config=SMALL, interpret=True)
    f = lambda x, a, b: ll.lora_linear(
        x, w, a, b, gs, scale, impl="fused", small_ops=small_ops, lora_config=lcfg, **kw
    )
    fused = _vjp(f, dy, x, a, b)
    unfused = _vjp(lambda x, a, b: ll.lora_linear(x, w, a, b, gs, scale, impl="unfused", **kw),
                   dy, x, a, b)  # fmt: skip
    for g, u in zip(fused, unfused, strict=True):
        assert _rel(g, u) < 1e-2


@pytest.mark.slow
def test_one_pass_udb_equals_two_kernels():
    """lora_linear's grads with u and dB from gmm_tgmm (fused_udb) and from gmm + tgmm: the same
    forward bit for bit, the same grads up to float32 summation order, both near the reference."""
    sizes = (70, 0, 100, 30, 20)
    x, w, a, b, gs, scale, rank, dy = _case(8, sizes=sizes)
    run = lambda lcfg: _vjp(lambda x, w, a, b, s: ll.lora_linear(
        x, w, a, b, gs, s, rank=rank, impl="fused", gemm_config=SMALL, lora_config=lcfg,
        interpret=True), dy, x, w, a, b, scale)  # fmt: skip
    one, two = run(lg.DEFAULT_CONFIG), run(TWO_PASS)
    want = _reference(x, w, a, b, gs, scale, rank, dy)
    np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(two[0]))
    for name, o, t, wv in zip(("y", "dx", "dw", "da", "db", "dscale"), one, two, want,
                              strict=True):  # fmt: skip
        assert np.isfinite(np.asarray(o, np.float32)).all(), name
        assert _rel(o, t) < 5e-3, (name, _rel(o, t))
        assert _rel(o, wv) < 2e-2, (name, _rel(o, wv))
    db = np.asarray(one[4], np.float32)
    for g, r in enumerate(np.asarray(rank)):
        assert not db[g, r:].any(), f"slot {g}: dB past rank {r}"
    assert not db[1].any(), "empty slot"


def _udb_case(seed, T, R, O, sizes, dtype):
    """dy, b, sp, meta, rank: NaN in b and sp past each slot's rank and in dy and sp past the
    groups (none of it may be read), per-slot ranks, the caller's sp arbitrary elsewhere."""
    G = len(sizes)
    rng = np.random.default_rng(seed)
    rank = rng.integers(1, R + 1, size=G).astype(np.int32)
    rank[-1] = R
    k = jax.random.split(jax.random.key(seed), 3)
    used = int(sum(sizes))
    dy = jax.random.normal(k[0], (T, O), jnp.float32).at[used:].set(jnp.nan).astype(dtype)
    sp = jax.random.normal(k[1], (T, R), jnp.float32)
    b = jax.random.normal(k[2], (G, R, O), jnp.float32)
    m = lora.group_meta(jnp.asarray(sizes, jnp.int32), jnp.ones((G,)), jnp.asarray(rank), T, R)
    live = lora.live_mask(m, R)  # bool[T, R]
    sp = jnp.where(live, sp, jnp.nan).astype(dtype)
    past = jnp.arange(R)[None, :] >= jnp.asarray(rank)[:, None]  # bool[G, R]
    b = jnp.where(past[:, :, None], jnp.nan, b).astype(dtype)
    return dy, b, sp, m, rank


KC = lg.KernelConfig


@pytest.mark.parametrize(
    "sizes, T, R, O, cfg, dtype",
    [((10, 0, 25, 17, 3), 64, 8, 80, KC(block_t=16, block_n=32, splits=1), jnp.float32),
     ((50,), 64, 16, 80, KC(block_t=16, block_n=128, splits=4), jnp.float32),  # one column block
     pytest.param((10, 0, 25, 17, 3), 64, 16, 80, KC(block_t=16, block_n=64, splits=3),
                  jnp.bfloat16, marks=pytest.mark.slow),
     pytest.param((10, 0, 25, 17, 3), 64, 8, 80, KC(block_t=16, block_n=32), jnp.float32,
                  marks=pytest.mark.slow),  # automatic splits (16 here)
     pytest.param((50,), 64, 8, 80, KC(block_t=32, block_n=32, splits=1), jnp.float32,
                  marks=pytest.mark.slow),
     pytest.param((64,), 64, 16, 64, KC(block_t=16, block_n=32, splits=1), jnp.float32,
                  marks=pytest.mark.slow)],  # no tail, no partial block: no masks
)  # fmt: skip
def test_gmm_tgmm_matches_einsum(sizes, T, R, O, cfg, dtype):
    """u = dy · B_g^T per row and dB_g = sum of sp^T dy over the slot's rows, against float64
    einsums: zero past each rank, past the groups and for the empty slot, NaN never read."""
    dy, b, sp, m, rank = _udb_case(len(sizes) + T + O, T, R, O, sizes, dtype)
    G = len(sizes)
    u, db = jax.jit(lambda dy, b, sp: udb.gmm_tgmm(dy, b, sp, m, dtype, cfg=cfg, interpret=True))(
        dy, b, sp
    )
    assert u.shape == (T, R) and u.dtype == jnp.float32 and db.shape == (G, R, O)
    assert db.dtype == dtype
    u, db = np.asarray(u, np.float64), np.asarray(db, np.float64)
    assert np.isfinite(u).all() and np.isfinite(db).all()
    live = np.asarray(lora.live_mask(m, R))
    clean = lambda v, keep: np.where(keep, np.asarray(v, np.float64), 0.0)
    past = np.arange(R)[None, :] >= np.asarray(rank)[:, None]
    bc = clean(b, ~past[:, :, None])
    dyc = clean(dy, (np.asarray(m.row_slot) < G)[:, None])
    spc = clean(sp, live)
    slot = np.minimum(np.asarray(m.row_slot), G - 1)
    want_u = np.where(live, np.einsum("TO,TRO->TR", dyc, bc[slot]), 0.0)
    own = np.asarray(m.row_slot)[:, None] == np.arange(G)[None, :]  # bool[T, G]
    want_db = np.einsum("TG,TR,TO->GRO", own, spc, dyc)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert _rel(u, want_u) < tol and _rel(db, want_db) < tol, (_rel(u, want_u), _rel(db, want_db))
    assert not u[~live].any(), "u past a rank or past the groups"
    for g in range(G):
        assert not db[g, rank[g] :].any(), f"slot {g}: dB past rank {rank[g]}"
        if sizes[g] == 0:
            assert not db[g].any(), f"empty slot {g}"
    with pytest.raises(ValueError, match="gmm_tgmm"):
        udb.gmm_tgmm(dy, b, sp[:, :3], m, dtype, cfg=cfg, interpret=True)


def test_gmm_tgmm_with_the_plan_bounds():
    """bounds given (visit_map's, as lora_linear passes them from its plan) or built inside:
    the same u and dB, bit for bit."""
    sizes, T, R, O = (10, 0, 25, 17, 3), 64, 8, 80
    dy, b, sp, m, _ = _udb_case(11, T, R, O, sizes, jnp.bfloat16)
    cfg = KC(block_t=16, block_n=32, splits=2)
    want = udb.gmm_tgmm(dy, b, sp, m, jnp.bfloat16, cfg=cfg, interpret=True)
    bounds = lg.visit_map(m, T, 16)[2].reshape(-1)
    got = udb.gmm_tgmm(dy, b, sp, m, jnp.bfloat16, cfg=cfg, interpret=True, bounds=bounds)
    for g_, w_ in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g_, np.float32), np.asarray(w_, np.float32))
    assert np.asarray(got[1], np.float32).any()


def _h100_lowering(f, *args) -> str:
    """f's StableHLO for an H100, lowered on CPU: Pallas's Triton lowering (kernel body to
    Triton IR) needs only a GPU kind, given here as an abstract device. Triton's own compile
    to PTX still runs only on a GPU."""
    dev = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda"
    )
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("fused_udb", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_backward_lowers_for_cuda(fused_udb):
    """The layer's value and grads lower for an H100 with the default shapes: the one-pass u and
    dB is one Triton kernel where the two-kernel form has two (shrink, [u], dA, [dB])."""
    T = D = 1024
    G, R = 8, 16
    S = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    lcfg = dataclasses.replace(lg.DEFAULT_CONFIG, fused_udb=fused_udb)

    def f(x, w, a, b, gs, sc, dy):
        layer = lambda x, a, b: ll.lora_linear(
            x, w, a, b, gs, sc, impl="fused", lora_config=lcfg, interpret=False
        )
        y, back = jax.vjp(layer, x, a, b)
        return y, *back(dy)

    text = _h100_lowering(f, S((T, D), bf), S((D, D), bf), S((G, D, R), bf), S((G, R, D), bf),
                          S((G,), jnp.int32), S((G,), jnp.float32), S((T, D), bf))  # fmt: skip
    assert text.count("xla.gpu.triton") == (3 if fused_udb else 4)
    assert ("lora_udb" in text) == fused_udb


@pytest.mark.slow  # the default shape is lowered in test_backward_lowers_for_cuda
@pytest.mark.parametrize(
    "cfg", [KC(block_t=128, block_n=256, num_warps=8), KC(block_t=32, block_n=512, splits=4)]
)
def test_gmm_tgmm_lowers_for_cuda(cfg):
    T, O, G, R = 4096, 4096, 8, 16
    S = jax.ShapeDtypeStruct
    bf = jnp.bfloat16

    def f(dy, b, sp, gs, sc):
        m = lora.group_meta(gs, sc, None, T, R)
        return udb.gmm_tgmm(dy, b, sp, m, bf, cfg=cfg)

    text = _h100_lowering(f, S((T, O), bf), S((G, R, O), bf), S((T, R), bf),
                          S((G,), jnp.int32), S((G,), jnp.float32))  # fmt: skip
    assert text.count("xla.gpu.triton") == 1 and "lora_udb" in text


def test_visits_cover_each_row_once():
    """Every (row, slot) pair appears in exactly one visit of the row's tile; tails in none."""
    T, tm = 320, 64
    sizes = jnp.asarray([0, 5, 64, 1, 0, 130, 40], jnp.int32)  # 240 rows, 80 in the tail
    G = sizes.shape[0]
    m = lora.group_meta(sizes, jnp.ones((G,), jnp.float32), None, T, 16)
    start, slot, tile = (np.asarray(v) for v in ll.visits(m, T, tm))
    assert start.shape == (T // tm + 1,) and slot.shape == (T // tm + G,)
    row_slot = np.asarray(m.row_slot)
    seen = np.zeros(T, int)
    for t in range(T // tm):
        for v in range(start[t], start[t + 1]):
            assert tile[v] == t
            rows = np.arange(t * tm, (t + 1) * tm)
            seen[rows] += row_slot[rows] == slot[v]
    np.testing.assert_array_equal(seen, (row_slot < G).astype(int))


# K = 96: 3 K steps, not a multiple of 2 stages (one pipeline per tile); K = 128 with 2 SMs: the
# pipeline chained over each CTA's tiles (pipeline_state), which the cluster cases use too.
@pytest.mark.parametrize(
    ("cfg", "K", "sms"),
    [(SMALL, 96, 4), (SMALL, 128, 2), (dataclasses.replace(SMALL, cluster="n"), 128, 4),
     (dataclasses.replace(SMALL, cluster="m"), 96, 4),
     pytest.param(SMALL_N, 96, 4, marks=pytest.mark.slow),
     pytest.param(dataclasses.replace(SMALL, visit_buffers=1, epi_slots=1), 128, 2,
                  marks=pytest.mark.slow)],
)  # fmt: skip
def test_kernel_visit_sum(cfg, K, sms):
    """matmul_expand adds each visit's h @ e[slot] to its tile, forward and transposed W."""
    M, N, R, G = 256, 256, 16, 3
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (M, K), jnp.bfloat16)
    w = jax.random.normal(k[1], (K, N), jnp.bfloat16)
    e = jax.random.normal(k[2], (G, R, N), jnp.bfloat16)
    hv = jax.random.normal(k[3], (5, 64, R), jnp.bfloat16)  # 4 + G visits at most
    # row tile 0: slots 0, 1; tile 1: slot 2; tile 2: none; tile 3: slot 1
    start = jnp.array([0, 2, 3, 3, 4], jnp.int32)
    slot = jnp.array([0, 1, 2, 1, 0], jnp.int32)
    f = lambda v: np.asarray(v, np.float32)
    want = f(x) @ f(w)
    want[0:64] += f(hv[0]) @ f(e[0]) + f(hv[1]) @ f(e[1])
    want[64:128] += f(hv[2]) @ f(e[2])
    want[192:256] += f(hv[3]) @ f(e[1])
    for transpose_w in (False, True):
        wt = w.T if transpose_w else w
        got = mm.matmul_expand(
            x, wt, hv, e, start, slot, transpose_w=transpose_w, cfg=cfg, interpret=True,
            num_sms=sms,
        )  # fmt: skip
        assert _rel(got, want) < 5e-3


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize(
    "cfg",
    [mm.DEFAULT_CONFIG, mm.GemmConfig(wg_split="n"), mm.GemmConfig(tile_k=32, stages=6),
     mm.GemmConfig(stages=3, epi_slots=2, visit_buffers=2), mm.GemmConfig(cluster="n"),
     mm.GemmConfig(cluster="m"), mm.GemmConfig(stages=2), mm.GemmConfig(chain_tiles=False)],
)  # fmt: skip
def test_kernel_lowers_for_cuda(cfg, transpose_w):
    """The kernel passes Mosaic GPU's lowering (layout inference, shared-memory budget) for a
    CUDA target, which interpret mode does not exercise: run here by cross-lowering on CPU.
    At 4096³ every CTA has several tiles, so configs whose stages divide K / tile_k lower the
    pipeline chained across tiles (pipeline_state)."""
    M = N = K = 4096
    G, R = 8, 16
    S = jax.ShapeDtypeStruct
    V = mm.num_visits(M, G, cfg.tile_m)
    bf = jnp.bfloat16
    args = (S((M, K), bf), S((K, N), bf), S((V, cfg.tile_m, R), bf), S((G, R, N), bf),
            S((M // cfg.tile_m + 1,), jnp.int32), S((V,), jnp.int32))  # fmt: skip
    f = lambda *a: mm.matmul_expand(*a, transpose_w=transpose_w, cfg=cfg, num_sms=132)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_auto_and_errors():
    x, w, a, b, gs, scale, rank, _ = _case(1)
    assert ll.resolve_impl("auto", x, w, a, SMALL) == "unfused"  # CPU
    assert ll.fused_supported(x, w, a, SMALL)
    assert not ll.fused_supported(x[:100], w, a, SMALL)  # T % cta_m
    with pytest.raises(ValueError, match="impl="):
        ll.lora_linear(x, w, a, b, gs, scale, impl="triton")
    with pytest.raises(ValueError, match="not tiled"):
        ll.lora_linear(x[:100], w, a, b, gs * 0, scale, impl="fused", gemm_config=SMALL)
    with pytest.raises(ValueError, match=r"w\.shape"):
        ll.lora_linear(x, w.T[:, :100], a, b, gs, scale)
    with pytest.raises(ValueError, match="small_ops"):
        ll.lora_linear(x, w, a, b, gs, scale, impl="fused", small_ops="cuda", gemm_config=SMALL)
    with pytest.raises(ValueError, match="GemmConfig"):
        mm.GemmConfig(tile_m=96)
    with pytest.raises(ValueError, match=r"GemmConfig.cluster='k' must be None, 'm' or 'n'"):
        mm.GemmConfig(cluster="k")
    # A cluster pairs two CTA tiles: N must hold whole pairs of them.
    assert mm.supports(512, 256, 256, 16, jnp.bfloat16, mm.GemmConfig())
    assert not mm.supports(512, 128, 256, 16, jnp.bfloat16, mm.GemmConfig(cluster="n"))
    # auto on CPU is the unfused operator with base = x @ w: the same values as the reference
    got = ll.lora_linear(x, w, a, b, gs, scale, rank=rank)
    want = _reference(x, w, a, b, gs, scale, rank, jnp.zeros((x.shape[0], w.shape[1])))[0]
    assert _rel(got, want) < 2e-2
