"""Device meshes. Axes: `data` and `tensor` now; `pipeline` and `expert` have room in the rules."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "tensor")


def make_mesh(
    tensor_parallel_size: int = 1, data_parallel_size: int = 1, devices: list | None = None
) -> Mesh:
    """A (data, tensor) mesh over the first data*tensor devices.

    Axes are `Auto`: shardings come from the weights' declared logical axes and XLA propagates them;
    jax 0.11's default `Explicit` axes would turn every constraint into an assertion.
    """
    devices = list(jax.devices() if devices is None else devices)
    need = tensor_parallel_size * data_parallel_size
    if tensor_parallel_size < 1 or data_parallel_size < 1:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} and data_parallel_size="
            f"{data_parallel_size} must be >= 1"
        )
    if need > len(devices):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} x "
            f"data_parallel_size={data_parallel_size} "
            f"needs {need} devices; {len(devices)} available ({devices[0].platform})"
        )
    return jax.make_mesh(
        (data_parallel_size, tensor_parallel_size),
        MESH_AXES,
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[:need],
    )
