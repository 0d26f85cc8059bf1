"""The in-GEMM shrink (lora_matmul_shrink_mgpu.matmul_lora) and lora_linear's "in_gemm" path.

Mosaic GPU's interpret mode has no semaphores, so here the kernel runs as its two launches
(`sync="two_launch"`: the shrink bands, then the GEMM reading h); the one-launch form with the
semaphore waits is cross-lowered for CUDA on CPU and checked on the H100 by bench_lora's
fused check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels import lora_linear as ll
from rtpjax.kernels import lora_matmul_mgpu as mm
from rtpjax.kernels import lora_matmul_shrink_mgpu as ms
from tests.kernels.test_lora_linear import SMALL, _case, _rel, check_against_reference

SMALL_128 = mm.GemmConfig(tile_m=128, tile_n=64, tile_k=32, stages=2, epi=32)  # two pieces


def _want(x, w, a_kr, e_rn, row_slot, scale):
    f = lambda v: np.asarray(v, np.float64)
    G = a_kr.shape[0]
    s = np.zeros((x.shape[0], a_kr.shape[2]))
    y = f(x) @ f(w)
    for r, g in enumerate(row_slot):
        if g < G:
            s[r] = f(x)[r] @ f(a_kr)[g]
            y[r] += scale[g] * s[r] @ f(e_rn)[g]
    return y, s


@pytest.mark.parametrize(
    ("cfg", "transposed", "a_stored"),
    [(SMALL_128, False, True), (SMALL, True, False),
     pytest.param(SMALL, False, False, marks=pytest.mark.slow),
     pytest.param(SMALL_128, True, True, marks=pytest.mark.slow)],
)  # fmt: skip
def test_kernel_against_numpy(cfg, transposed, a_stored):
    """y and s per 64-row piece: two slots in one CTA band, an empty slot, 20 live rows then
    the tail in one piece; the forward's operands (W, E = B) or the backward's (W^T, E read
    transposed); the shrink's matrices as stored ([G, K, R], x through registers: the
    forward's A) or transposed ([G, R, K]: the backward's B)."""
    M, K, N, R, G = 512, 128, 128, 16, 3
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (M, K), jnp.bfloat16)
    w = (jax.random.normal(k[1], (K, N)) / 8).astype(jnp.bfloat16)
    a = (jax.random.normal(k[2], (G, K, R)) / 8).astype(jnp.bfloat16)
    e = jax.random.normal(k[3], (G, R, N)).astype(jnp.bfloat16)
    ends = np.cumsum([128, 0, 340])
    row_slot = np.searchsorted(ends, np.arange(M), side="right")
    scale = np.array([0.5, 2.0, -1.5], np.float32)
    y, s = ms.matmul_lora(
        x, w.T if transposed else w, a if a_stored else jnp.swapaxes(a, 1, 2),
        jnp.swapaxes(e, 1, 2) if transposed else e, ms.sub_slots(jnp.asarray(row_slot), G),
        jnp.asarray(ends, jnp.int32), jnp.asarray(scale), transpose_w=transposed,
        transpose_a=a_stored, transpose_e=transposed, cfg=cfg, interpret=True, num_sms=3,
    )  # fmt: skip
    want_y, want_s = _want(x, w, a, e, row_slot, scale)
    assert _rel(y, want_y) < 5e-3 and _rel(s, want_s) < 5e-3
    assert not np.asarray(s, np.float32)[468:].any()  # rows past every slot: s = 0


@pytest.mark.parametrize("transposed", [False, True])
def test_kernel_lowers_for_cuda(transposed):
    """The one-launch form (global semaphores, shrink bands on the short CTAs) passes Mosaic
    GPU's lowering for an H100 at 4096³, which interpret mode does not exercise: the forward's
    operands (A as stored, x into registers for the shrink) and the backward's."""
    M = N = K = 4096
    G, R = 8, 16
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    args = (S((M, K), bf), S((N, K) if transposed else (K, N), bf),
            S((G, R, K) if transposed else (G, K, R), bf),
            S((G, N, R) if transposed else (G, R, N), bf), S((M // 64,), jnp.int32),
            S((G,), jnp.int32), S((G,), jnp.float32))  # fmt: skip
    f = lambda *v: ms.matmul_lora(
        *v, transpose_w=transposed, transpose_a=not transposed, transpose_e=transposed,
        num_sms=132,
        sync="semaphore",
    )  # fmt: skip
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize(
    "sizes", [(128, 0, 64, 20), pytest.param((64, 0, 128, 64), marks=pytest.mark.slow)]
)
def test_in_gemm_layer_matches_reference(sizes):
    """Values and grads of x, W, a, b, scale through small_ops="in_gemm" (per-slot ranks with
    NaN past them, an empty slot, a piece with 20 live rows and the tail)."""
    x, w, a, b, gs, scale, rank, dy = _case(sum(sizes), sizes=sizes)
    plan = ll.lora_plan(gs, x.shape[0], a.shape[2], rank=rank, gemm_config=SMALL)
    assert plan.one_slot
    f = lambda x, w, a, b, s: ll.lora_linear(
        x, w, a, b, None, s, plan=plan, impl="fused", gemm_config=SMALL, small_ops="in_gemm",
        interpret=True,
    )  # fmt: skip
    check_against_reference(f, x, w, a, b, gs, scale, rank, dy)


def test_one_slot_plans_and_errors():
    """one_slot is read from concrete group sizes, False under jit unless the caller says so;
    "auto" falls back to the separate shrink without it and "in_gemm" then refuses."""
    assert ms.one_slot_pieces([64, 0, 128], 256) and ms.one_slot_pieces([128, 20], 256)
    assert not ms.one_slot_pieces([70, 0, 100], 256)
    gs = jnp.array([70, 0, 100, 30, 20], jnp.int32)
    assert not ll.lora_plan(gs, 256, 16, gemm_config=SMALL).one_slot
    traced = jax.jit(lambda g: ll.lora_plan(g, 256, 16, gemm_config=SMALL))(gs * 0 + 64)
    assert not traced.one_slot
    told = jax.jit(lambda g: ll.lora_plan(g, 256, 16, gemm_config=SMALL, one_slot=True))(gs)
    assert told.one_slot
    x, w, a, b, gs, scale, rank, _ = _case(2)
    plan = ll.lora_plan(gs, x.shape[0], a.shape[2], rank=rank, gemm_config=SMALL)
    with pytest.raises(ValueError, match="in_gemm"):
        ll.lora_linear(x, w, a, b, None, scale, plan=plan, impl="fused", gemm_config=SMALL,
                       small_ops="in_gemm", interpret=True)  # fmt: skip
    with pytest.raises(ValueError, match="transpose_a=False"):  # A as stored, flag missing
        ms.matmul_lora(x, w, a, b, jnp.zeros((4,), jnp.int32), jnp.zeros((5,), jnp.int32), scale,
                       cfg=SMALL, interpret=True)  # fmt: skip
    with pytest.raises(ValueError, match="sync"):
        ms.matmul_lora(x, w, jnp.swapaxes(a, 1, 2), b, jnp.zeros((4,), jnp.int32),
                       jnp.zeros((5,), jnp.int32), scale, cfg=SMALL, sync="spin")  # fmt: skip


def test_stages_fit_shared_memory():
    """4 stages at rank 16 (the store buffer and E share one region), 3 at ranks 32 and 48, and
    rank 64 does not fit either (lora_linear then keeps the separate shrink)."""
    assert [ms.config_for(R).stages for R in (16, 32, 48)] == [4, 3, 3]
    for R in (16, 32, 48):
        assert ms.supports(4096, 4096, 4096, R, jnp.bfloat16, ms.config_for(R))
        assert ms.smem_bytes(ms.config_for(R), R) <= mm._SMEM_BYTES
    assert not ms.supports(4096, 4096, 4096, 64, jnp.bfloat16, ms.config_for(64))
    assert ms._out_e_slots(mm.GemmConfig(), 16) == (1, 2)  # 8 KB each side per warpgroup
