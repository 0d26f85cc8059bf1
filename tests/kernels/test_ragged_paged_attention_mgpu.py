"""The Mosaic GPU prefill kernel (ragged_paged_attention_mgpu) against the reference.

On CPU the kernel runs in Mosaic GPU's interpreter (with P·V's operand in shared memory: the
interpreter cannot run a wgmma whose operand sits in registers, the GPU default); every case has
shuffled page tables, unused pages and the slots past each kv_len full of NaN, chunks over cached
prefixes whose lengths are not multiples of page_size, fresh prefills and one-token queries. The
cross-lowering tests compile the kernel for CUDA on this CPU machine (Mosaic GPU's lowering and
layout checks run; ptxas does not) at the shapes scripts/bench_attention_mgpu.py times.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels import ragged_paged_attention as rpa
from rtpjax.kernels import ragged_paged_attention_mgpu as mg
from tests.kernels.test_ragged_paged_attention import make_case

TOL = {jnp.bfloat16: 2e-2, jnp.float16: 5e-3}
SMALL = mg.MgpuConfig(block_m=64, block_s=64, stages=2, p_regs=False)


def _check(args, dtype, cfg, **kw):
    q, _, _, _, cu, ns = args
    run = jax.jit(lambda *a: mg.mgpu_ragged_paged_attention(*a, config=cfg, interpret=True, **kw))
    out = np.asarray(run(*args).astype(jnp.float32), np.float64)
    ref = np.asarray(rpa.ref_ragged_paged_attention(*args, **kw).astype(jnp.float32), np.float64)
    n_valid = int(cu[int(ns[0])])
    assert out.shape == q.shape
    assert np.isfinite(out).all(), "NaN/inf in the output: a stray read of an unused slot?"
    assert (out[n_valid:] == 0).all(), "padding tokens must be zero"
    err = np.linalg.norm(out[:n_valid] - ref[:n_valid]) / np.linalg.norm(ref[:n_valid])
    assert err < TOL[dtype], f"relative error {err:.2e} over {TOL[dtype]}"


# (K, G, H, page_size, dtype, q_lens, kv_lens, config): prefixes of 30, 45, 7, 100 tokens...
CASES = [
    # GQA 4, pages of 16, two chunks over prefixes off page boundaries, a decode, padding tokens.
    (2, 4, 64, 16, jnp.bfloat16, [40, 100, 1], [70, 100, 38], SMALL),
    # GQA 8, head_dim 128, pages of 64 (one copy per tile), a chunk ending mid-page.
    (1, 8, 128, 64, jnp.bfloat16, [90, 5], [135, 200], SMALL),
    # MHA (G 1: 128 tokens a block), float16, tiles of 128 over pages of 16.
    (2, 1, 64, 16, jnp.float16, [150, 20], [157, 20],
     mg.MgpuConfig(block_m=64, block_s=128, stages=3, p_regs=False)),
]  # fmt: skip


@pytest.mark.parametrize("K, G, H, page_size, dtype, q_lens, kv_lens, cfg", CASES)
def test_matches_reference(K, G, H, page_size, dtype, q_lens, kv_lens, cfg):
    rng = np.random.default_rng(sum(q_lens) + page_size)
    args, _ = make_case(rng, q_lens, kv_lens, K=K, G=G, H=H, page_size=page_size, dtype=dtype,
                        max_seqs=len(q_lens) + 1, tokens=sum(q_lens) + 5)  # fmt: skip
    _check(args, dtype, cfg, sm_scale=H**-0.5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "K, G, H, page_size, q_lens, kv_lens",
    [(2, 2, 128, 128, [200, 60, 3], [333, 60, 250]),  # tiles of 64 inside pages of 128
     (1, 4, 128, 32, [300], [300]),  # a long fresh prefill: several masked and free tiles
     (4, 1, 64, 16, [64, 1, 129], [64, 1, 1000]),
     (1, 4, 64, 16, [8, 1, 40], [4096, 4000, 1234])],  # kv lengths to 4,096 (the range)
)  # fmt: skip
def test_matches_reference_more(K, G, H, page_size, q_lens, kv_lens):
    rng = np.random.default_rng(7)
    args, _ = make_case(rng, q_lens, kv_lens, K=K, G=G, H=H, page_size=page_size,
                        dtype=jnp.bfloat16)  # fmt: skip
    _check(args, jnp.bfloat16, SMALL, sm_scale=H**-0.5)


def test_window_and_soft_cap():
    rng = np.random.default_rng(3)
    args, _ = make_case(rng, [70, 33], [150, 90], K=2, G=2, H=64, page_size=16,
                        dtype=jnp.bfloat16)  # fmt: skip
    _check(args, jnp.bfloat16, SMALL, sm_scale=0.125, sliding_window=40, soft_cap=5.0)


# The benchmark's shapes: Llama-3-8B heads, pages of 16, bf16 (T, B) and the swept configs.
BENCH_SHAPES = [(2048, 1), (8192, 1), (2048, 4)]
BENCH_CONFIGS = [
    mg.DEFAULT_CONFIG,
    mg.MgpuConfig(block_m=64, block_s=128, stages=3),
    mg.MgpuConfig(block_m=64, block_s=64, stages=4),
    mg.MgpuConfig(block_m=64, block_s=128, stages=2, pingpong=False),
    mg.MgpuConfig(block_m=64, block_s=128, stages=2),
]


@pytest.mark.parametrize("T, B", BENCH_SHAPES)
@pytest.mark.parametrize("cfg", BENCH_CONFIGS, ids=str)
def test_lowers_for_cuda(T, B, cfg):
    S = jax.ShapeDtypeStruct
    K, G, H, ps, pps = 8, 4, 128, 16, 8192 // 16
    args = (S((T, K * G, H), jnp.bfloat16), S((B * pps + 1, ps, 2 * K, H), jnp.bfloat16),
            S((B,), jnp.int32), S((B, pps), jnp.int32), S((B + 1,), jnp.int32),
            S((1,), jnp.int32))  # fmt: skip
    f = lambda *a: mg.mgpu_ragged_paged_attention(*a, sm_scale=H**-0.5, config=cfg)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_lowers_with_window_soft_cap_and_f16():
    S = jax.ShapeDtypeStruct
    args = (S((512, 8, 64), jnp.float16), S((65, 64, 4, 64), jnp.float16), S((2,), jnp.int32),
            S((2, 32), jnp.int32), S((3,), jnp.int32), S((1,), jnp.int32))  # fmt: skip
    f = lambda *a: mg.mgpu_ragged_paged_attention(
        *a, sm_scale=0.125, sliding_window=100, soft_cap=30.0
    )
    assert "mosaic_gpu" in jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_supports_and_errors():
    bf = jnp.bfloat16
    assert mg.supports((64, 32, 128), (10, 16, 16, 128), bf, sliding_window=None, soft_cap=None)
    assert mg.supports((64, 8, 64), (10, 128, 4, 64), jnp.float16, sliding_window=8, soft_cap=2.0)
    assert not mg.supports((64, 32, 128), (10, 16, 16, 128), jnp.float32)
    assert not mg.supports((64, 32, 96), (10, 16, 16, 96), bf)  # head_dim
    assert not mg.supports((64, 32, 128), (10, 8, 16, 128), bf)  # page_size 8
    assert not mg.supports((64, 6, 64), (10, 16, 2, 64), bf)  # G = 6 does not divide 64
    assert not mg.supports((64, 8, 128), (10, 16, 2, 128), bf, config=mg.MgpuConfig(stages=4))
    with pytest.raises(ValueError, match="block_s"):
        mg.MgpuConfig(block_s=32)
    with pytest.raises(ValueError, match="stages"):
        mg.MgpuConfig(stages=1)
    rng = np.random.default_rng(0)
    args, _ = make_case(rng, [4], [20], K=1, G=2, H=96, page_size=16, dtype=bf)
    with pytest.raises(ValueError, match="head_dim=96"):
        mg.mgpu_ragged_paged_attention(*args, sm_scale=0.1)
    args, _ = make_case(rng, [4], [20], K=1, G=2, H=64, page_size=16, dtype=jnp.float32)
    with pytest.raises(ValueError, match="dtype=float32"):
        mg.mgpu_ragged_paged_attention(*args, sm_scale=0.1)
    args, _ = make_case(rng, [4], [20], K=1, G=2, H=64, page_size=16, dtype=bf)
    with pytest.raises(ValueError, match="p_regs=False runs only in interpret mode"):
        mg.mgpu_ragged_paged_attention(*args, sm_scale=0.1, config=SMALL, interpret=False)
