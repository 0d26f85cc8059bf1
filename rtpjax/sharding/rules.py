"""The one table from logical axes to mesh axes. Model code names logical axes only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rtpjax.models.params import ArrayInfo, is_info

# Logical axis → mesh axis (or None = replicated). Weights and activations share the names: a
# weight's `q_heads` and an activation's `q_heads` must land on the same devices.
DEFAULT_RULES: dict[str, str | None] = {
    # weights
    "vocab": "tensor",
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "qkv": None,  # the fused q/k/v slot axis (G+2) of w_qkv
    "gate_up": None,  # the fused gate/up axis (2) of w_gate_up
    "mlp": "tensor",
    "norm": None,
    "layers": None,  # room for "pipeline"
    "expert": None,  # room for "expert"
    "lora_rank": None,
    "adapters": None,
    # activations
    "batch": "data",
    "tokens": None,
    "pages": None,
    "page_slots": None,
}


def partition_spec(
    axes: tuple[str | None, ...],
    mesh: Mesh | None = None,
    rules: Mapping[str, str | None] = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for logical `axes`. Mesh axes the mesh lacks (or of size 1) are dropped, so the
    same rules serve every mesh shape."""
    used: set[str] = set()
    out: list[str | None] = []
    for name in axes:
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        mesh_axis = None if name is None else rules[name]
        if mesh_axis is not None and mesh is not None and mesh.shape.get(mesh_axis, 1) == 1:
            mesh_axis = None
        if mesh_axis is not None:
            if mesh_axis in used:
                raise ValueError(f"mesh axis {mesh_axis!r} used twice in logical axes {axes}")
            used.add(mesh_axis)
        out.append(mesh_axis)
    return PartitionSpec(*out)


def named_sharding(
    mesh: Mesh, axes: tuple[str | None, ...], rules: Mapping[str, str | None] = DEFAULT_RULES
) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, mesh, rules))


def shardings(spec: Any, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES) -> Any:
    """NamedSharding for every ArrayInfo in a declared parameter tree."""
    return jax.tree.map(lambda i: named_sharding(mesh, i.axes, rules), spec, is_leaf=is_info)


def check_divisible(spec: Any, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES) -> None:
    """Every sharded dimension must split evenly; say which weight and axis does not."""
    from rtpjax.models.params import info_leaves

    for path, info in info_leaves(spec):
        pspec = partition_spec(info.axes, mesh, rules)
        for dim, (size, mesh_axis) in enumerate(zip(info.shape, pspec)):
            n = 1 if mesh_axis is None else mesh.shape[mesh_axis]
            if size % n:
                raise ValueError(
                    f"{path}: dimension {dim} ({info.axes[dim]}={size}) does not split "
                    f"over mesh axis {mesh_axis!r} of size {n}"
                )


def constrain(
    x: jax.Array, axes: tuple[str | None, ...], rules: Mapping[str, str | None] = DEFAULT_RULES
) -> jax.Array:
    """Sharding hint for an activation under the ambient mesh (jax.set_mesh); no-op without."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(axes, mesh, rules))


__all__ = [
    "DEFAULT_RULES",
    "ArrayInfo",
    "check_divisible",
    "constrain",
    "named_sharding",
    "partition_spec",
    "shardings",
]
