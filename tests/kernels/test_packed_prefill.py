"""Causal attention over packed fresh sequences (kernels/packed_prefill.py) against a float64 numpy
oracle; the cuDNN path runs in scripts/bench_attention.py on the GPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels.packed_prefill import cudnn_supported, packed_causal_attention


def oracle(q, k, v, q_lens, sm_scale):
    T, N, H = q.shape
    G = N // k.shape[1]
    out, lo = np.zeros((T, N, H)), 0
    for n in q_lens:
        qs, ks, vs = q[lo : lo + n], k[lo : lo + n], v[lo : lo + n]
        kk, vv = np.repeat(ks, G, axis=1), np.repeat(vs, G, axis=1)
        s = np.einsum("qnh,snh->nqs", qs, kk) * sm_scale
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[lo : lo + n] = np.einsum("nqs,snh->qnh", p, vv)
        lo += n
    return out


@pytest.mark.parametrize(
    "q_lens,B,T,K,G",
    [([5], 1, 8, 2, 2), ([3, 1, 7], 4, 16, 2, 4), ([16, 9], 8, 32, 1, 8), ([1, 1, 1], 3, 3, 4, 1)],
)
def test_reference_matches_numpy_with_padding_rows_and_tokens(q_lens, B, T, K, G):
    rng = np.random.default_rng(len(q_lens) + T)
    H, N = 32, K * G
    q, k, v = (rng.standard_normal((T, h, H)).astype(np.float32) for h in (N, K, K))
    cu = np.zeros(B + 1, np.int32)
    cu[1 : len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1 :] = cu[len(q_lens)]
    out = packed_causal_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(cu),
        jnp.asarray([len(q_lens)], jnp.int32), sm_scale=0.2, impl="reference",
    )  # fmt: skip
    total = sum(q_lens)
    want = oracle(q, k, v, q_lens, 0.2)
    np.testing.assert_allclose(np.asarray(out)[:total], want[:total], rtol=1e-5, atol=1e-5)
    assert not np.asarray(out)[total:].any(), "bucket padding tokens must come out as zeros"


def test_auto_is_the_reference_off_gpu_and_bad_shapes_are_refused():
    assert not cudnn_supported(128, jnp.bfloat16) or jax.default_backend() == "gpu"
    q = jnp.zeros((4, 4, 16))
    with pytest.raises(ValueError, match=re.escape("with K | N")):
        packed_causal_attention(
            q, jnp.zeros((4, 3, 16)), jnp.zeros((4, 3, 16)), jnp.array([0, 4]),
            jnp.array([1]), sm_scale=1.0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="impl='flash'"):
        packed_causal_attention(
            q, q, q, jnp.array([0, 4]), jnp.array([1]), sm_scale=1.0, impl="flash"
        )
