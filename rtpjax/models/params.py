"""Weights declared once: shape, dtype, logical axes, initialiser. Everything else derives from it.

A model's `spec(cfg)` returns its parameter dataclass filled with `ArrayInfo` leaves; `init`,
`abstract` and `shardings` map over that tree, and the loaders check every tensor against it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def normal_init(stddev: float = 0.02) -> Initializer:
    def init(key, shape, dtype):
        return (stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def ones_init(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def zeros_init(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """Declaration of one weight. `axes` holds one logical axis name (or None) per dimension."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]
    init: Initializer = dataclasses.field(default=normal_init(), compare=False)

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"ArrayInfo shape {self.shape} and axes {self.axes} differ in rank")


def is_info(x: Any) -> bool:
    return isinstance(x, ArrayInfo)


def info_leaves(spec: Any) -> list[tuple[str, ArrayInfo]]:
    """(dotted path, info) for every declared weight, in tree order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_info)
    return [(path_str(p), leaf) for p, leaf in leaves]


def path_str(path: tuple) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return ".".join(parts)


def abstract(spec: Any) -> Any:
    """The tree of jax.ShapeDtypeStruct the spec declares (for eval_shape and restores)."""
    return jax.tree.map(lambda i: jax.ShapeDtypeStruct(i.shape, i.dtype), spec, is_leaf=is_info)


def init(spec: Any, key: jax.Array, shardings: Any = None) -> Any:
    """Random weights from the declared initialisers, each created directly in its sharding."""
    leaves, treedef = jax.tree.flatten(spec, is_leaf=is_info)
    keys = jax.random.split(key, len(leaves))
    shard_leaves = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)

    def make(info, k, sharding):
        fn = jax.jit(lambda k: info.init(k, info.shape, info.dtype), out_shardings=sharding)
        return fn(k)

    return treedef.unflatten([make(i, k, s) for i, k, s in zip(leaves, keys, shard_leaves)])


def num_bytes(spec: Any) -> int:
    return sum(int(np.prod(i.shape)) * jnp.dtype(i.dtype).itemsize for _, i in info_leaves(spec))
