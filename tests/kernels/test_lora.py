"""The batched multi-LoRA operator against its reference: every path, forward and backward."""

# Shape letters follow docs/glossary.md (I and O: LoRA input and output features).
# ruff: noqa: E741

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels import lora, lora_gpu

KC = lora_gpu.KernelConfig
# Small tiles so that a few dozen rows already straddle slots, visit a tile several times and
# leave partial blocks on every axis.
SMALL = lora_gpu.LoraGpuConfig(
    fwd=KC(block_t=16, block_k=16, block_n=16),
    expand=KC(block_t=16, block_k=16, block_n=32),
    shrink_t=KC(block_t=16, block_k=32),
    tgmm=KC(block_t=16, block_k=16, block_n=16),
    udb=KC(block_t=16, block_n=16),  # the backward's u and dB in one pass over dy (gmm_tgmm)
)
SMALL_UNFUSED = lora_gpu.LoraGpuConfig(
    fwd=KC(block_t=32, block_k=16, splits=3),  # K split over 3 programs (partials summed)
    expand=KC(block_t=16, block_k=16, block_n=16),
    shrink_t=KC(block_t=32, block_k=16, splits=2),
    tgmm=KC(block_t=16, block_k=32, block_n=32, splits=3),
    fused_fwd=False,
    fused_udb=False,  # u and dB from shrink_t and tgmm, two passes over dy
)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _case(seed: int, T: int, I: int, R: int, O: int, G: int, dtype=jnp.float32, tail: int = 3,
          ranks: bool = True):  # fmt: skip
    """Random operands; group sizes with empty slots and `tail` rows past the groups; per-slot
    ranks below R; a and b hold NaN past each slot's rank (they must never be read)."""
    rng = np.random.default_rng(seed)
    used = T - tail
    cuts = np.sort(rng.integers(0, used + 1, size=G - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [used]])).astype(np.int32)
    if G > 2:
        sizes[rng.integers(G)] += sizes[0]  # make slot 0 empty
        sizes[0] = 0
    rank = rng.integers(1, R + 1, size=G).astype(np.int32) if ranks else np.full(G, R, np.int32)
    rank[rng.integers(G)] = R
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (T, I), jnp.float32).astype(dtype)
    a = jax.random.normal(k[1], (G, I, R), jnp.float32) / np.sqrt(I)
    b = jax.random.normal(k[2], (G, R, O), jnp.float32)
    past = jnp.arange(R)[None, :] >= jnp.asarray(rank)[:, None]  # bool[G, R]
    a = jnp.where(past[:, None, :], jnp.nan, a).astype(dtype)
    b = jnp.where(past[:, :, None], jnp.nan, b).astype(dtype)
    scale = jnp.asarray(rng.uniform(-2, 2, size=G), jnp.float32)
    return x, a, b, jnp.asarray(sizes), scale, jnp.asarray(rank)


def _clean(a, b, rank):
    """a, b with the NaN past each slot's rank replaced by zeros (for the reference's grads)."""
    past = jnp.arange(a.shape[2])[None, :] >= rank[:, None]
    return jnp.where(past[:, None, :], 0, a), jnp.where(past[:, :, None], 0, b)


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# Everything runs under jit: one compile per test instead of one per eager op.
def _gpu(config):
    return jax.jit(lambda x, a, b, gs, sc, rank: lora_gpu.gpu_lora_delta(
        x, a, b, gs, sc, rank=rank, config=config, interpret=True))  # fmt: skip


def _impl(name):
    return jax.jit(lambda x, a, b, gs, sc, rank: lora.lora_delta(x, a, b, gs, sc, rank=rank,
                                                                 impl=name))  # fmt: skip


REF = _impl("reference")


PATHS = {
    "xla": _impl("xla"),
    "gpu_small": _gpu(SMALL),
    "gpu_unfused": _gpu(SMALL_UNFUSED),
    "gpu_default": _impl("gpu"),  # the default config, interpret mode on CPU
}
SHAPES = [  # (T, I, R, O, G)
    (45, 40, 8, 24, 4),
    (64, 32, 16, 48, 1),
    (33, 24, 5, 20, 7),
]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_I{}_R{}_O{}_G{}".format(*s))
def test_forward_matches_reference(path, shape):
    x, a, b, gs, sc, rank = _case(sum(shape), *shape)
    want = REF(x, a, b, gs, sc, rank)
    got = PATHS[path](x, a, b, gs, sc, rank)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert np.isfinite(np.asarray(got)).all()
    assert _rel(got, want) < TOL[jnp.float32]
    assert not np.asarray(got)[int(gs.sum()) :].any(), "rows past the groups must be 0"


@pytest.mark.parametrize("path", ["xla", "gpu_small"])
def test_bf16_forward(path):
    x, a, b, gs, sc, rank = _case(7, 50, 64, 16, 40, 3, dtype=jnp.bfloat16)
    got = PATHS[path](x, a, b, gs, sc, rank)
    assert got.dtype == jnp.bfloat16
    # The oracle in float32 on the same bf16 inputs: only the output rounding and s's bf16
    # rounding before the expand differ.
    want = REF(x.astype(jnp.float32), a.astype(jnp.float32), b.astype(jnp.float32), gs, sc, rank)
    assert _rel(got, want) < TOL[jnp.bfloat16]


def test_reference_is_the_formula():
    """The oracle itself against a per-row numpy loop in float64."""
    x, a, b, gs, sc, rank = _case(3, 21, 6, 4, 5, 3)
    want = np.zeros((21, 5))
    xs, as_, bs = (np.asarray(v, np.float64) for v in (x, a, b))
    row = 0
    for g, n in enumerate(np.asarray(gs)):
        r = int(rank[g])
        for t in range(row, row + int(n)):
            want[t] = float(sc[g]) * (xs[t] @ as_[g][:, :r]) @ bs[g][:r]
        row += int(n)
    got = lora.ref_lora_delta(x, a, b, gs, sc, rank=rank)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["xla", "gpu_small", "gpu_unfused"])
def test_garbage_outside_the_groups_never_leaks(path):
    """NaN in x's rows past the groups, and in a/b past each rank: the output stays finite and
    those rows are exactly 0."""
    x, a, b, gs, sc, rank = _case(11, 40, 32, 8, 24, 3, tail=9)
    x = x.at[31:].set(jnp.nan)
    got = np.asarray(PATHS[path](x, a, b, gs, sc, rank))
    assert np.isfinite(got).all()
    assert not got[31:].any()
    want = REF(x, a, b, gs, sc, rank)
    assert _rel(got, want) < TOL[jnp.float32]


def _loss(fn):
    def loss(x, a, b, sc, gs, rank, w):
        return jnp.sum(w * fn(x, a, b, gs, sc, rank).astype(jnp.float32) ** 2) / 2

    return loss


@pytest.mark.parametrize("path", ["xla", "gpu_small", "gpu_unfused"])
def test_gradients_match_reference(path):
    T, I, R, O, G = 45, 40, 8, 24, 4
    x, a, b, gs, sc, rank = _case(5, T, I, R, O, G)
    w = jax.random.normal(jax.random.key(9), (T, O))
    got = jax.jit(jax.grad(_loss(PATHS[path]), argnums=(0, 1, 2, 3)))(x, a, b, sc, gs, rank, w)
    ac, bc = _clean(a, b, rank)
    want = jax.jit(jax.grad(_loss(REF), argnums=(0, 1, 2, 3)))(x, ac, bc, sc, gs, rank, w)
    for name, g_, w_ in zip(("dx", "da", "db", "dscale"), got, want, strict=True):
        assert g_.shape == w_.shape and g_.dtype == w_.dtype, name
        assert np.isfinite(np.asarray(g_)).all(), name
        assert _rel(g_, w_) < 1e-4, (name, _rel(g_, w_))
    da, db = np.asarray(got[1]), np.asarray(got[2])
    for g in range(G):
        r = int(rank[g])
        assert not da[g, :, r:].any() and not db[g, r:].any(), f"slot {g}: grads past rank {r}"
        if int(gs[g]) == 0:
            assert not da[g].any() and not db[g].any() and float(got[3][g]) == 0.0
    assert not np.asarray(got[0])[int(gs.sum()) :].any(), "dx of rows past the groups"


def test_gradients_bf16_gpu():
    x, a, b, gs, sc, rank = _case(8, 48, 32, 16, 40, 3, dtype=jnp.bfloat16, ranks=False)
    w = jax.random.normal(jax.random.key(2), (48, 40))
    got = jax.jit(jax.grad(_loss(PATHS["gpu_small"]), argnums=(0, 1, 2)))(x, a, b, sc, gs, rank, w)
    f32 = [v.astype(jnp.float32) for v in (x, a, b)]
    want = jax.jit(jax.grad(_loss(REF), argnums=(0, 1, 2)))(*f32, sc, gs, rank, w)
    for g_, w_, v in zip(got, want, (x, a, b), strict=True):
        assert g_.dtype == v.dtype
        assert _rel(g_, w_) < 3e-2


@pytest.mark.parametrize("path", ["xla", "gpu_small", "gpu_unfused"])
def test_base_is_added_and_differentiated(path):
    """base= returns base + delta (rows past the groups: base itself) and passes dy to base."""
    x, a, b, gs, sc, rank = _case(21, 40, 24, 8, 20, 3, tail=6)
    base = jax.random.normal(jax.random.key(1), (40, 20))
    config = {"gpu_small": SMALL, "gpu_unfused": SMALL_UNFUSED}.get(path)

    def f(x, a, b, base):
        if config is None:
            return lora.lora_delta(x, a, b, gs, sc, rank=rank, impl=path, base=base)
        return lora_gpu.gpu_lora_delta(x, a, b, gs, sc, rank=rank, base=base, config=config,
                                       interpret=True)  # fmt: skip

    got = jax.jit(f)(x, a, b, base)
    want = REF(x, a, b, gs, sc, rank) + base
    assert _rel(got, want) < TOL[jnp.float32]
    np.testing.assert_array_equal(np.asarray(got)[34:], np.asarray(base)[34:])
    w = jax.random.normal(jax.random.key(2), (40, 20))
    loss = lambda x, a, b, base: jnp.sum(w * f(x, a, b, base) ** 2)
    g_base = jax.jit(jax.grad(loss, argnums=3))(x, a, b, base)
    np.testing.assert_allclose(np.asarray(g_base), np.asarray(2 * w * want), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="base"):
        lora.lora_delta(x, a, b, gs, sc, base=base[:, :3])


def test_finite_difference_spot_check():
    """Central differences of a quadratic loss are exact up to rounding: compare a few
    directional derivatives with the custom VJP (xla path, float32)."""
    x, a, b, gs, sc, rank = _case(13, 20, 12, 4, 10, 2)
    a, b = _clean(a, b, rank)
    w = jax.random.normal(jax.random.key(4), (20, 10))
    f = jax.jit(lambda x, a, b, sc: _loss(PATHS["xla"])(x, a, b, sc, gs, rank, w))
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(x, a, b, sc)
    k = jax.random.split(jax.random.key(6), 4)
    args = [x, a, b, sc]
    for i, (arg, gr) in enumerate(zip(args, grads, strict=True)):
        d = jax.random.normal(k[i], arg.shape)
        eps = 1e-2
        hi = f(*[v + eps * d if j == i else v for j, v in enumerate(args)])
        lo = f(*[v - eps * d if j == i else v for j, v in enumerate(args)])
        fd = (hi - lo) / (2 * eps)
        an = jnp.vdot(gr, d)
        assert abs(float(fd - an)) <= 2e-3 * max(1.0, abs(float(an))), (i, float(fd), float(an))


@pytest.mark.parametrize("path", ["xla", "gpu"])
def test_by_slot_matches_per_row_formula(path):
    T, I, R, O, G = 30, 16, 4, 12, 5
    x, a, b, _, sc, rank = _case(17, T, I, R, O, G)
    slot = jnp.asarray(np.random.default_rng(1).integers(-1, G, size=T), jnp.int32)
    got = jax.jit(lambda x: lora.lora_delta_by_slot(x, a, b, slot, sc, rank=rank, impl=path))(x)
    ac, bc, xs = (np.asarray(v, np.float64) for v in (*_clean(a, b, rank), x))
    want = np.stack([
        np.zeros(O) if s < 0 else float(sc[s]) * (xs[t] @ ac[s]) @ bc[s]
        for t, s in enumerate(np.asarray(slot))
    ])  # fmt: skip
    ac, bc = _clean(a, b, rank)
    assert _rel(got, want) < 1e-5
    assert not np.asarray(got)[np.asarray(slot) < 0].any()

    # and its gradient in x matches the same per-row formula's
    def sq(impl, a, b):
        return lambda x: jnp.sum(lora.lora_delta_by_slot(x, a, b, slot, sc, rank=rank,
                                                         impl=impl) ** 2)  # fmt: skip

    gx, gw = jax.jit(jax.grad(sq(path, a, b)))(x), jax.jit(jax.grad(sq("reference", ac, bc)))(x)
    assert _rel(gx, gw) < 1e-4


def test_jit_and_no_rank():
    x, a, b, gs, sc, _ = _case(19, 40, 24, 8, 16, 3, ranks=False)
    f = jax.jit(lambda x, a, b, gs, sc: lora.lora_delta(x, a, b, gs, sc, impl="xla"))
    got = f(x, a, b, gs, sc)
    want = REF(x, a, b, gs, sc, None)
    assert _rel(got, want) < 1e-5
    # traced group sizes past T are clipped, not an error
    assert np.isfinite(np.asarray(f(x, a, b, gs.at[0].add(100), sc))).all()


def test_visit_map_covers_every_row_once():
    """Every row, the tail's included, is visited by exactly one (slot, tile) pair, and no
    visit is empty; surplus visits are marked G+1."""
    rng = np.random.default_rng(0)
    for T, G, bt in ((100, 6, 16), (37, 3, 32), (5, 4, 16)):
        vm = jax.jit(lambda sizes, T=T, G=G, bt=bt: lora_gpu.visit_map(
            lora.group_meta(sizes, jnp.ones(G), None, T, 4), T, bt))  # fmt: skip
        for _ in range(12):
            sizes = rng.multinomial(int(rng.integers(0, T + 1)), rng.dirichlet(np.ones(G) / 2))
            vslot, vtile, bounds = (np.asarray(v) for v in vm(jnp.asarray(sizes, jnp.int32)))
            assert vslot.shape == (-(-T // bt) + G,)
            seen = np.zeros(T, int)
            for g, tile in zip(vslot, vtile, strict=True):
                if g > G:
                    continue
                rows = np.arange(tile * bt, tile * bt + bt)
                rows = rows[(rows >= bounds[0, g]) & (rows < bounds[1, g])]
                assert rows.size, "a visit with no rows"
                seen[rows] += 1
            assert (seen == 1).all()
            np.testing.assert_array_equal(bounds[1, :G] - bounds[0, :G], sizes)


def _args(T=8, I=4, R=2, O=3, G=2):
    return (jnp.zeros((T, I)), jnp.zeros((G, I, R)), jnp.zeros((G, R, O)),
            jnp.array([3, 2], jnp.int32), jnp.ones(G))  # fmt: skip


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda x, a, b, gs, sc: (x[0], a, b, gs, sc, {}), "x.shape"),
        (lambda x, a, b, gs, sc: (x, a[:, :3], b, gs, sc, {}), "a.shape[1]=3"),
        (lambda x, a, b, gs, sc: (x, a, b[:, :1], gs, sc, {}), "b.shape"),
        (lambda x, a, b, gs, sc: (x.astype(jnp.int32), a, b, gs, sc, {}), "x.dtype=int32"),
        (lambda x, a, b, gs, sc: (x, a, b, gs.astype(jnp.float32), sc, {}), "group_sizes"),
        (lambda x, a, b, gs, sc: (x, a, b, gs, sc[:1], {}), "scale"),
        (lambda x, a, b, gs, sc: (x, a, b, jnp.array([5, 4], jnp.int32), sc, {}),
         "sum(group_sizes)=9"),
        (lambda x, a, b, gs, sc: (x, a, b, jnp.array([-1, 2], jnp.int32), sc, {}), ">= 0"),
        (lambda x, a, b, gs, sc: (x, a, b, gs, sc, {"rank": jnp.array([1, 3], jnp.int32)}),
         "rank=[1, 3]"),
        (lambda x, a, b, gs, sc: (x, a, b, gs, sc, {"impl": "cuda"}), "impl='cuda'"),
    ],
)  # fmt: skip
def test_validation_errors(change, needle):
    x, a, b, gs, sc, kw = change(*_args())
    with pytest.raises(ValueError, match=None) as err:
        lora.lora_delta(x, a, b, gs, sc, **kw)
    assert needle in str(err.value)


def test_slot_validation():
    x, a, b, _, sc = _args()
    with pytest.raises(ValueError, match=r"slot values \[2\]"):
        lora.lora_delta_by_slot(x, a, b, jnp.array([0, 1, 2, -1, 0, 0, 0, 0]), sc)
    with pytest.raises(ValueError, match="slot"):
        lora.lora_delta_by_slot(x, a, b, jnp.zeros((3,), jnp.int32), sc)


def test_tpu_megablox_path_in_interpret_mode():
    """The TPU path (jax's megablox gmm/tgmm) in TPU interpret mode on CPU: rows in 128s."""
    x, a, b, gs, sc, rank = _case(23, 128, 128, 16, 128, 3, tail=18)
    assert lora.TpuBackend.supports(128, 128, 16, 128)
    be = lora.TpuBackend(interpret=True)
    f = jax.jit(lambda x, a, b: lora.lora_delta_with(be, x, a, b, gs, sc, rank=rank))
    assert _rel(f(x, a, b), REF(x, a, b, gs, sc, rank)) < TOL[jnp.float32]
    w = jax.random.normal(jax.random.key(3), (128, 128))
    loss = lambda fn: lambda x, a, b: jnp.sum(w * fn(x, a, b) ** 2)
    got = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(x, a, b)
    ref = jax.grad(loss(lambda x, a, b: REF(x, a, b, gs, sc, rank)), argnums=(0, 1, 2))(x, a, b)
    for g_, w_ in zip(got, ref, strict=True):
        assert _rel(g_, w_) < 1e-4


def test_auto_on_cpu_is_xla():
    x, a, b, *_ = _args()
    assert lora.resolve_impl("auto", x, a, b) == "xla"
    assert not lora_gpu.supports(lora_gpu.MAX_RANK + 1, jnp.bfloat16)
