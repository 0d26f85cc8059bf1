"""The weight-streaming matmul: the Pallas kernel (interpret mode) against the XLA reference,
dispatch, validation, config choice, and that every form lowers through Pallas's Triton backend."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels import skinny_matmul as sm
from rtpjax.kernels import skinny_matmul_gpu as smg

KC = smg.KernelConfig
# Normwise (max |diff| / max |ref|): the kernel and the reference both accumulate exact products
# in float32 and differ only in summation order; a 16-bit output adds one rounding.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}

LLAMA_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


def _operands(m: int, n: int, k: int, dtype, seed: int = 0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)  # [M, K]
    w = (jax.random.normal(kw, (n, k), jnp.float32) / np.sqrt(k)).astype(dtype)  # [N, K]
    return x, w


def _rel_err(y, ref) -> float:
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))


# (M, N, K, dtype, out_dtype, config): every form, split_k 1 / 2 / 4 and an uneven split (3 of 4
# K steps), row blocks larger than N, N not a multiple of block_n, Mp > M and Mp == M.
CASES = [
    (1, 48, 128, jnp.float32, None, KC(16, 32, 1, form="gemv")),
    (1, 256, 512, jnp.bfloat16, jnp.float32, KC(64, 128, 2, form="gemv")),
    (1, 16, 512, jnp.bfloat16, None, KC(64, 128, 4)),
    (3, 48, 128, jnp.float32, None, KC(32, 32, 3)),  # uneven split, N % block_n != 0
    (3, 48, 512, jnp.bfloat16, jnp.float32, KC(32, 128, 1, form="xw")),
    (8, 256, 128, jnp.bfloat16, None, KC(64, 64, 2, form="xw")),
    (8, 48, 512, jnp.float16, None, KC(16, 128, 1)),
    (16, 256, 512, jnp.bfloat16, jnp.float32, KC(64, 128, 1)),
    (16, 48, 512, jnp.float32, jnp.bfloat16, KC(32, 64, 4, form="xw")),
    (33, 256, 128, jnp.float32, None, KC(128, 32, 2, num_warps=8)),
    (33, 16, 512, jnp.bfloat16, jnp.float32, KC(16, 256, 2, form="xw")),
    (64, 48, 128, jnp.bfloat16, None, None),  # choose_config's pick
]


@pytest.mark.parametrize(("m", "n", "k", "dtype", "out_dtype", "cfg"), CASES)
def test_kernel_matches_reference(m, n, k, dtype, out_dtype, cfg):
    x, w = _operands(m, n, k, dtype, seed=m * 1000 + n + k)
    y = sm.skinny_matmul(x, w, out_dtype=out_dtype, impl="gpu", config=cfg, interpret=True)
    ref = sm.ref_skinny_matmul(x, w, out_dtype)
    want = jnp.dtype(out_dtype or dtype)
    assert y.shape == (m, n) and y.dtype == want
    assert _rel_err(y, ref) < TOL[want.type]


@pytest.mark.parametrize(
    "cfg", [KC(16, 32, 2, form="gemv"), KC(32, 32, 2), KC(16, 64, 1, form="xw")]
)
def test_each_output_reads_only_its_own_row_and_column(cfg):
    """A NaN in row r of w reaches only column r of y; a NaN in row m of x only row m of y (so
    neither the row masks, the split-K partials nor the clamped tail rows mix entries)."""
    M, N, K = (1 if cfg.form == "gemv" else 5), 48, 128
    x, w = _operands(M, N, K, jnp.float32, seed=7)
    w = w.at[N - 1, 3].set(jnp.nan)  # the last row: in the clamped tail block when 32 ∤ N
    y = np.asarray(sm.skinny_matmul(x, w, impl="gpu", config=cfg, interpret=True))
    assert np.isnan(y[:, N - 1]).all() and not np.isnan(y[:, : N - 1]).any()
    if M > 1:
        x2 = x.at[M - 1, 100].set(jnp.nan)
        y2 = np.asarray(sm.skinny_matmul(x2, w.at[N - 1, 3].set(0.0), impl="gpu", config=cfg,
                                         interpret=True))  # fmt: skip
        assert np.isnan(y2[M - 1]).all() and not np.isnan(y2[: M - 1]).any()


def test_default_out_dtype_and_xla_path():
    x, w = _operands(4, 32, 128, jnp.bfloat16)
    y = sm.skinny_matmul(x, w)  # "auto" on CPU is the reference
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(sm.ref_skinny_matmul(x, w), np.float32))  # fmt: skip
    y32 = sm.skinny_matmul(x, w, out_dtype=jnp.float32, impl="xla")
    ref = np.asarray(x, np.float32) @ np.asarray(w, np.float32).T
    assert y32.dtype == jnp.float32 and _rel_err(y32, ref) < 1e-5


def test_inside_jit_and_eval_shape():
    x, w = _operands(3, 64, 256, jnp.bfloat16)
    f = jax.jit(lambda x, w: sm.skinny_matmul(x, w, impl="gpu", config=KC(32, 128, 2),
                                              interpret=True) * 2)  # fmt: skip
    assert _rel_err(f(x, w), 2 * sm.ref_skinny_matmul(x, w, jnp.float32)) < 1e-2
    s = jax.eval_shape(lambda x, w: sm.skinny_matmul(x, w, out_dtype=jnp.float32), x, w)
    assert s.shape == (3, 64) and s.dtype == jnp.float32


# ---------------------------------------------------------------------------------- dispatch


def test_supports_bounds():
    bf = jnp.bfloat16
    assert sm.supports(1, 16, 128, bf) and sm.supports(64, 128256, 4096, bf)
    assert sm.supports(16, 4096, 14336, jnp.float32) and sm.supports(8, 48, 256, jnp.float16)
    assert not sm.supports(65, 4096, 4096, bf)  # M too large
    assert not sm.supports(0, 4096, 4096, bf)
    assert not sm.supports(8, 4096, 4000, bf)  # K % 128
    assert not sm.supports(8, 4104, 4096, bf)  # N % 16
    assert not sm.supports(8, 4096, 4096, jnp.float64)
    assert not sm.supports(8, 1 << 20, 4096, bf)  # N*K past int32 offsets


def test_auto_dispatch(monkeypatch):
    x, w = _operands(8, 64, 256, jnp.bfloat16)
    assert sm.resolve_impl("auto", x, w) == "xla"  # CPU
    monkeypatch.setattr(sm, "_on_gpu", lambda: True)
    assert sm.resolve_impl("auto", x, w) == "gpu"
    assert sm.resolve_impl("xla", x, w) == "xla"
    big_m, _ = _operands(65, 64, 256, jnp.bfloat16)
    assert sm.resolve_impl("auto", big_m, w) == "xla"
    x_odd, w_odd = _operands(8, 64, 200, jnp.bfloat16)
    assert sm.resolve_impl("auto", x_odd, w_odd) == "xla"  # K % 128
    _, w_n = _operands(8, 40, 256, jnp.bfloat16)
    assert sm.resolve_impl("auto", x, w_n) == "xla"  # N % 16
    assert sm.resolve_impl("auto", x, w.astype(jnp.float32)) == "xla"  # mixed dtypes


def test_auto_falls_back_to_xla_result_on_unsupported_shape():
    x, w = _operands(70, 40, 200, jnp.float32)
    y = sm.skinny_matmul(x, w, impl="auto")
    assert _rel_err(y, np.asarray(x) @ np.asarray(w).T) < 1e-5


# -------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "match"),
    [
        ((2, 4, 128), (16, 128), r"x\.shape=\(2, 4, 128\)"),
        ((128,), (16, 128), r"x\.shape=\(128,\)"),
        ((4, 128), (16, 128, 1), r"w\.shape=\(16, 128, 1\)"),
        ((4, 128), (16, 256), r"w\.shape\[1\]=256 must equal x\.shape\[1\]=128"),
    ],
)
def test_bad_shapes_raise(x_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        sm.skinny_matmul(jnp.zeros(x_shape), jnp.zeros(w_shape))


def test_bad_arguments_raise():
    x, w = _operands(4, 32, 128, jnp.float32)
    with pytest.raises(ValueError, match=r"impl='cuda'"):
        sm.skinny_matmul(x, w, impl="cuda")
    with pytest.raises(ValueError, match=r"x\.dtype=int32"):
        sm.skinny_matmul(x.astype(jnp.int32), w)
    with pytest.raises(ValueError, match=r"out_dtype=int8"):
        sm.skinny_matmul(x, w, out_dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"M=65"):  # impl="gpu" on a shape it does not cover
        sm.skinny_matmul(jnp.zeros((65, 128)), w, impl="gpu")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_n": 48}, r"block_n=48"),
        ({"block_k": 8}, r"block_k=8"),
        ({"split_k": 0}, r"split_k=0"),
        ({"num_warps": 3}, r"num_warps=3"),
        ({"num_stages": 0}, r"num_stages=0"),
        ({"form": "mma"}, r"form='mma'"),
    ],
)
def test_bad_config_fields_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KC(**kwargs)


@pytest.mark.parametrize(
    ("m", "cfg", "match"),
    [
        (4, KC(16, 256), r"block_k=256 must divide K=384"),
        (4, KC(16, 128, split_k=4), r"split_k=4 must be <= K / block_k = 3"),
        (4, KC(16, 128, form="gemv"), r"needs M == 1, got M=4"),
    ],
)
def test_config_that_does_not_fit_the_shape_raises(m, cfg, match):
    x, w = _operands(m, 32, 384, jnp.float32)
    with pytest.raises(ValueError, match=match):
        sm.skinny_matmul(x, w, impl="gpu", config=cfg, interpret=True)


# ----------------------------------------------------------------------------- config choice


@pytest.mark.parametrize(("n", "k"), LLAMA_SHAPES)
@pytest.mark.parametrize("m", [1, 8, 16, 32, 64])
def test_choose_config_is_valid_and_fills_the_gpu(m, n, k):
    for itemsize in (2, 4):
        cfg = smg.choose_config(m, n, k, num_sms=132, itemsize=itemsize)
        smg.check_config(cfg, m, n, k)
        assert smg.pipeline_bytes(cfg, m, itemsize) <= smg.SMEM_BUDGET
        programs = -(-n // cfg.block_n) * cfg.split_k
        assert programs >= 132, (cfg, programs)  # every SM busy
        assert (k // cfg.block_k) // cfg.split_k >= 4  # a pipeline longer than its fill
        assert cfg.block_n >= min(64, smg.padded_rows(m))  # x re-read <= w bytes
    assert smg.choose_config(m, n, k, num_sms=132) == smg.choose_config(m, n, k, num_sms=132)


def test_auto_split():
    # N = 4096 at 64 rows is 64 programs: split K until >= 231 programs (and >= 4 steps each)
    assert smg.auto_split(4096, 4096, 64, 128, target=231) == 4
    assert smg.auto_split(28672, 4096, 64, 128, target=231) == 1
    assert smg.auto_split(4096, 512, 64, 128, target=231) == 1  # only 4 K steps: no split
    assert smg.auto_split(4096, 1024, 64, 128, target=10_000) == 2


# --------------------------------------------------------------------- the Triton lowering


def _lower_for_h100(fn, *avals) -> str:
    """StableHLO of fn lowered for CUDA with an abstract H100: runs Pallas's Triton lowering (the
    kernel to Triton IR) on a machine without a GPU; compiling that IR needs the GPU."""
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                      platform="gpu")  # fmt: skip
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    ("m", "cfg", "dtype"),
    [
        (1, KC(64, 256, 1, form="gemv"), jnp.bfloat16),
        (1, KC(32, 256, 2), jnp.bfloat16),
        (5, KC(64, 128, 3, form="xw"), jnp.bfloat16),  # uneven split: dynamic trip count
        (16, KC(64, 128, 1), jnp.float32),
        (64, KC(128, 128, 1, num_warps=8, num_stages=3), jnp.float16),
    ],
)
def test_lowers_to_triton(m, cfg, dtype):
    avals = (jax.ShapeDtypeStruct((m, 4096), dtype), jax.ShapeDtypeStruct((4160, 4096), dtype))
    text = _lower_for_h100(
        lambda x, w: smg.gpu_skinny_matmul(x, w, out_dtype=jnp.float32, config=cfg), *avals
    )
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert f"skinny_matmul_{cfg.tag}" in text


# ----------------------------------------------------------------------- on a GPU (device)


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k"), LLAMA_SHAPES[:4])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_gpu_kernel_matches_xla_on_device(m, n, k):
    if jax.default_backend() not in ("gpu", "cuda"):
        pytest.skip("needs an NVIDIA GPU")
    x, w = _operands(m, n, k, jnp.bfloat16, seed=m)
    ref = sm.ref_skinny_matmul(x, w, jnp.float32)
    chosen = smg.choose_config(m, n, k)
    for cfg in (chosen, dataclasses.replace(chosen, form="xw"), None):
        y = sm.skinny_matmul(x, w, out_dtype=jnp.float32, impl="gpu", config=cfg)
        assert _rel_err(y, ref) < 1e-4, cfg
