"""packing: a tree of small 4-byte arrays travels as one int32 buffer, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.engine import packing


def _tree():
    rng = np.random.default_rng(0)
    return {
        "ids": rng.integers(-5, 1 << 30, (7,), dtype=np.int32),
        "pages": rng.integers(0, 99, (3, 4), dtype=np.int32),
        "temp": np.array([0.0, -1.5, np.inf, np.nan, 1e-38], np.float32),
        "seed": np.array([0, 1, 0xFFFFFFFF], np.uint32),
        "mask": np.array([True, False, True]),
        "none": None,
        "empty": np.zeros((4, 0), np.float32),
    }


def _same(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()  # bitwise (NaN included)


def test_host_round_trip_is_bitwise():
    tree = _tree()
    buf, layout = packing.pack(tree)
    assert (
        buf.dtype == np.int32 and buf.shape == (layout.size,) and layout.size == 7 + 12 + 5 + 3 + 3
    )
    _same(packing.unpack_host(buf, layout), tree)


def test_device_unpack_and_pack_match_the_host():
    tree = _tree()
    buf, layout = packing.pack(tree)
    on_device = jax.jit(packing.unpack_device, static_argnums=1)(jnp.asarray(buf), layout)
    _same(on_device, tree)
    repacked = jax.jit(packing.pack_device)(on_device)
    np.testing.assert_array_equal(np.asarray(repacked), buf)


def test_layouts_differ_by_shape_and_are_hashable():
    a = packing.Layout.of({"x": np.zeros(3, np.int32)})
    b = packing.Layout.of({"x": np.zeros(4, np.int32)})
    assert a != b and len({a, b, packing.Layout.of({"x": np.ones(3, np.int32)})}) == 2


def test_wide_dtypes_are_refused():
    with pytest.raises(ValueError, match="float64 is not 4 bytes"):
        packing.pack({"x": np.zeros(2, np.float64)})
