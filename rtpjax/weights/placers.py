"""Placers: where the fast loader's parts go. `DevicePlacer` makes jax.Arrays in their shardings
(compiling its few programs ahead, behind the first reads); `HostPlacer` keeps per-device numpy
shards (a simulated host of a multi-host run)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from rtpjax.weights.load_plan import Plan
from rtpjax.weights.loader import Recipe


class Placer(Protocol):
    """Puts parts on devices and builds weights from them. `DevicePlacer` makes jax.Arrays;
    `HostPlacer` keeps per-device numpy shards (a simulated host of a multi-host run)."""

    def prepare(self, plan: Plan) -> None: ...

    def put(self, host: np.ndarray, device: Any) -> Any: ...

    def concat(self, parts: list[Any], axis: int) -> Any: ...

    def assemble(self, shape: tuple[int, ...], sharding: Any, shards: dict[Any, Any]) -> Any: ...

    def fuse(self, pieces: list[Any], rec: Recipe) -> Any: ...

    def ready(self, kind: str, arrays: list[Any], arg: Any) -> bool:
        """Whether `concat(arrays, arg)` / `fuse(arrays, arg)` would run without compiling."""
        ...

    def close(self) -> None: ...


@functools.partial(jax.jit, static_argnames=("axis",))
def _concat(parts: list[jax.Array], *, axis: int) -> jax.Array:
    return jnp.concatenate(parts, axis=axis)


@functools.lru_cache(maxsize=256)
def _fuser(axis: int, dtype: Any, sharding: Any) -> Callable[..., jax.Array]:
    def fuse(*pieces: jax.Array) -> jax.Array:
        cast = [p.astype(dtype) for p in pieces]
        return cast[0] if len(cast) == 1 else jnp.concatenate(cast, axis=axis)

    return jax.jit(fuse, out_shardings=sharding)


class DevicePlacer:
    """jax.Arrays in their shardings. The few programs a load runs (the concatenation of a shard
    read in several blocks, the fusion of q/k/v and gate/up) are compiled ahead, on background
    threads, while the first blocks are read: compilation hides behind I/O."""

    def __init__(self, compile_threads: int = 2):
        self.pool = ThreadPoolExecutor(compile_threads, thread_name_prefix="rtpjax-compile")
        self.programs: dict[Any, Future] = {}

    def _ahead(self, key: Any, fn: Any, *args: Any, **static: Any) -> None:
        if key not in self.programs:
            self.programs[key] = self.pool.submit(lambda: fn.lower(*args, **static).compile())

    def prepare(self, plan: Plan) -> None:
        if plan.dtypes is None:  # dtypes known only once read: compile on first use
            return
        for job in plan.jobs:
            if job.n_parts > 1:
                piece = plan.recipes[job.recipe].pieces[job.piece]
                dt = plan.dtypes[piece.name]
                sharding = SingleDeviceSharding(job.device)
                parts = [jax.ShapeDtypeStruct(sh, dt, sharding=sharding) for sh in job.part_shapes]
                self._ahead(self._concat_key(parts, piece.split), _concat, parts, axis=piece.split)
        for rec in plan.recipes:
            pieces = [
                jax.ShapeDtypeStruct(p.shape, plan.dtypes[p.name], sharding=rec.sharding)
                for p in rec.pieces
            ]
            if len(pieces) > 1 or pieces[0].dtype != rec.info.dtype:
                key = self._fuse_key(pieces, rec)
                self._ahead(key, _fuser(rec.axis, jnp.dtype(rec.info.dtype), rec.sharding), *pieces)

    @staticmethod
    def _concat_key(parts: list[Any], axis: int) -> Any:
        return ("concat", axis, tuple((p.shape, str(p.dtype), p.sharding) for p in parts))

    @staticmethod
    def _fuse_key(pieces: list[Any], rec: Recipe) -> Any:
        return (
            "fuse",
            rec.axis,
            str(jnp.dtype(rec.info.dtype)),
            rec.sharding,
            tuple((p.shape, str(p.dtype)) for p in pieces),
        )

    def put(self, host: np.ndarray, device: Any) -> jax.Array:
        if device.platform == "cpu":
            # A CPU device_put may alias the numpy buffer (whatever may_alias says), and the ring
            # reuses it: hand jax a copy of its own.
            host = np.array(host, copy=True)
        return jax.device_put(host, SingleDeviceSharding(device))

    def ready(self, kind: str, arrays: list[Any], arg: Any) -> bool:
        key = self._concat_key(arrays, arg) if kind == "concat" else self._fuse_key(arrays, arg)
        program = self.programs.get(key)
        return program is None or program.done()

    def concat(self, parts: list[jax.Array], axis: int) -> jax.Array:
        program = self.programs.get(self._concat_key(parts, axis))
        return program.result()(parts) if program else _concat(parts, axis=axis)

    def assemble(self, shape: tuple[int, ...], sharding: Any, shards: dict[Any, Any]) -> jax.Array:
        return jax.make_array_from_single_device_arrays(shape, sharding, list(shards.values()))

    def fuse(self, pieces: list[jax.Array], rec: Recipe) -> jax.Array:
        if len(pieces) == 1 and pieces[0].dtype == rec.info.dtype:
            return pieces[0]
        program = self.programs.get(self._fuse_key(pieces, rec))
        if program is not None:
            return program.result()(*pieces)
        return _fuser(rec.axis, jnp.dtype(rec.info.dtype), rec.sharding)(*pieces)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class HostPlacer:
    def prepare(self, plan: Plan) -> None:
        pass

    def ready(self, kind: str, arrays: list[Any], arg: Any) -> bool:
        return True

    def close(self) -> None:
        pass

    def put(self, host: np.ndarray, device: Any) -> np.ndarray:
        return np.array(host, copy=True)

    def concat(self, parts: list[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(parts, axis=axis)

    def assemble(self, shape: tuple[int, ...], sharding: Any, shards: dict[Any, Any]) -> dict:
        return dict(shards)

    def fuse(self, pieces: list[dict], rec: Recipe) -> dict[Any, np.ndarray]:
        dtype = np.dtype(jnp.dtype(rec.info.dtype))
        return {
            d: np.concatenate([p[d].astype(dtype) for p in pieces], axis=rec.axis)
            for d in pieces[0]
        }
