"""write_kv: round trip through the interleaved page layout, in-place update, attention after it."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels import ragged_paged_attention as rpa
from rtpjax.kernels.kv_write import write_kv


def _slots(rng, n_tokens, num_pages, page_size):
    """Distinct slots outside the null page 0, in shuffled order."""
    return rng.permutation(np.arange(page_size, num_pages * page_size))[:n_tokens].astype(np.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_interleaves_keys_and_values(dtype):
    rng = np.random.default_rng(0)
    P, ps, K, H, T = 9, 16, 3, 64, 40
    pages = jnp.full((P, ps, 2 * K, H), jnp.nan, dtype)
    k = rng.standard_normal((T, K, H)).astype(np.float32)
    v = rng.standard_normal((T, K, H)).astype(np.float32)
    slots = _slots(rng, T, P, ps)
    out = np.asarray(write_kv(pages, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots)))
    flat = out.astype(np.float32).reshape(P * ps, 2 * K, H)
    want_k = np.asarray(jnp.asarray(k, dtype).astype(jnp.float32))
    want_v = np.asarray(jnp.asarray(v, dtype).astype(jnp.float32))
    np.testing.assert_array_equal(flat[slots][:, 0::2], want_k)  # k0, v0, k1, v1, ...
    np.testing.assert_array_equal(flat[slots][:, 1::2], want_v)
    untouched = np.setdiff1d(np.arange(P * ps), slots)
    assert np.isnan(flat[untouched]).all(), "a slot nobody wrote changed"
    assert out.dtype == dtype


def test_padding_tokens_land_in_the_null_page_only():
    rng = np.random.default_rng(1)
    P, ps, K, H = 4, 16, 1, 64
    pages = jnp.full((P, ps, 2 * K, H), jnp.nan, jnp.float32)
    k = jnp.asarray(rng.standard_normal((6, K, H)), jnp.float32)
    slots = jnp.asarray([17, 18, 40, 0, 0, 0], jnp.int32)  # three padding tokens -> page 0
    out = np.asarray(write_kv(pages, k, k, slots))
    assert np.isnan(
        out[1:].reshape(-1, 2 * K, H)[[i for i in range(48) if i not in (1, 2, 24)]]
    ).all()
    np.testing.assert_array_equal(out.reshape(-1, 2 * K, H)[40, 0], np.asarray(k[2, 0]))


def test_donated_update_is_in_place():
    P, ps, K, H, T = 64, 16, 2, 64, 8
    f = jax.jit(write_kv, donate_argnums=0)
    pages = jnp.zeros((P, ps, 2 * K, H), jnp.bfloat16)
    k = jnp.ones((T, K, H), jnp.bfloat16)
    slots = jnp.arange(16, 16 + T, dtype=jnp.int32)
    hlo = f.lower(pages, k, k, slots).compile().as_text()
    full = (f"bf16[{P},{ps},{2 * K},{H}]", f"bf16[{P * ps},{2 * K},{H}]")  # either view
    copies = [
        ln for ln in hlo.splitlines() if re.search(r"\bcopy\(", ln) and any(f in ln for f in full)
    ]
    assert not copies, f"kv_pages is copied: {copies}"
    assert "input_output_alias" in hlo or "may-alias" in hlo or "must-alias" in hlo
    before = pages.unsafe_buffer_pointer()
    pages = f(pages, k, k, slots)
    assert pages.unsafe_buffer_pointer() == before, "the donated buffer was not reused"


def test_attention_after_write_equals_dense_attention():
    """write_kv then ragged_paged_attention == plain causal attention on the same k, v."""
    rng = np.random.default_rng(2)
    P, ps, K, G, H, S = 12, 16, 2, 2, 64, 37
    k = rng.standard_normal((S, K, H)).astype(np.float32)
    v = rng.standard_normal((S, K, H)).astype(np.float32)
    q = rng.standard_normal((S, K * G, H)).astype(np.float32)
    table = np.array([5, 2, 9], np.int32)  # non-contiguous pages of one sequence
    slots = table[np.arange(S) // ps] * ps + np.arange(S) % ps
    pages = write_kv(jnp.full((P, ps, 2 * K, H), jnp.nan), jnp.asarray(k), jnp.asarray(v),
                     jnp.asarray(slots, jnp.int32))  # fmt: skip
    # Prefill of the first 30 tokens, then a chunk of the last 7 over the cached prefix.
    outs = []
    for lo, hi in ((0, 30), (30, S)):
        out = rpa.ragged_paged_attention(
            jnp.asarray(q[lo:hi]), pages, jnp.asarray([hi], jnp.int32), jnp.asarray(table[None]),
            jnp.asarray([0, hi - lo], jnp.int32), jnp.asarray([1], jnp.int32), sm_scale=0.125,
        )  # fmt: skip
        outs.append(np.asarray(out))
    got = np.concatenate(outs)
    kr, vr = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = np.einsum("qnh,snh->nqs", q, kr) * 0.125
    s = np.where(np.tril(np.ones((S, S), bool))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("nqs,snh->qnh", p / p.sum(-1, keepdims=True), vr)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "change,needle",
    [
        (dict(k=np.zeros((4, 3, 64))), "k.shape"),
        (dict(v=np.zeros((4, 2, 32))), "v.shape"),
        (dict(slots=np.zeros(3, np.int32)), "slot_mapping"),
        (dict(slots=np.zeros(4, np.float32)), "slot_mapping"),
        (dict(pages=np.zeros((4, 16, 3, 64))), "kv_pages.shape"),
    ],
)
def test_validation(change, needle):
    a = dict(pages=np.zeros((4, 16, 4, 64)), k=np.zeros((4, 2, 64)), v=np.zeros((4, 2, 64)),
             slots=np.zeros(4, np.int32))  # fmt: skip
    a.update(change)
    with pytest.raises(ValueError, match=re.escape(needle)):
        write_kv(*(jnp.asarray(a[n]) for n in ("pages", "k", "v", "slots")))


def test_jit_reuses_one_compile_across_slot_values():
    f = jax.jit(functools.partial(write_kv))
    pages = jnp.zeros((4, 16, 2, 64))
    k = jnp.ones((3, 1, 64))
    f(pages, k, k, jnp.asarray([16, 17, 18], jnp.int32))
    f(pages, k, k, jnp.asarray([33, 0, 0], jnp.int32))
    assert f._cache_size() == 1
