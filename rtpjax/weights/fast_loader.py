"""Loading at the speed of the disk: file-order reads into a bounded ring, overlapped with transfer.

RTP-LLM's recipe, on JAX. The host never holds a copy of the model:

1. Plan. Every declared weight is a `Recipe` of `Piece`s, one per HF tensor (q, k, v → w_qkv),
   each a reshape of its tensor into the model's layout. The shardings say which box of every piece
   each of this process's devices holds; the rows those boxes need, taken in on-disk order (files,
   then offsets), are cut into segments and packed into blocks of at most `block_bytes`. A process
   of a multi-host run plans only the rows its own devices hold.
2. Read. `readers` threads claim blocks in order, each into a free slot of a ring of page-aligned
   host buffers, with one large pread (O_DIRECT when the files are not in the page cache). Where the
   backend supports it the ring is registered for DMA (`client.dma_map`), so transfers from it skip
   the runtime's pageable-memory staging copy.
3. Transfer. The calling thread takes blocks in order and `device_put`s every part of a shard that
   a block holds straight from the ring (a zero-copy numpy view; shards strided in the file, such
   as column-sharded w_o, are gathered first). A slot returns to the ring only once its
   transfers have completed.
4. Fuse. When all pieces of a weight are on their devices, one jitted concatenate whose output
   sharding is the weight's declared sharding builds it on the devices (q/k/v, gate/up), converting
   the dtype there too. Pieces are dropped as soon as their weight exists.

Any error (a short read, a bad shape) stops the readers and raises before a parameter is returned.
Sources other than safetensors (GGUF, Orbax as HF tensors) take the same path with tensors produced
by a reader thread instead of read from disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from rtpjax.config import ModelConfig
from rtpjax.models import llama
from rtpjax.models.params import is_info
from rtpjax.sharding import rules
from rtpjax.sharding.mesh import make_mesh
from rtpjax.weights.loader import Piece, Recipe, TensorSource, check_names, check_shapes, recipes
from rtpjax.weights.safetensors_io import (
    ALIGN,
    RingReader,
    SafetensorsCheckpoint,
    resident_fraction,
)

logger = logging.getLogger("rtpjax.weights")

IO_MODES = ("auto", "buffered", "direct")


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How the fast loader reads. Host memory it holds: ring_slots × (block_bytes + 8 KiB)."""

    readers: int = min(12, os.cpu_count() or 1)  # parallel reader threads
    block_bytes: int = 64 << 20  # bytes per read (and per ring slot)
    ring_slots: int = 0  # host buffers in the ring; 0 means readers + 4
    io: str = "auto"  # auto: O_DIRECT when under half of the files is in the page cache
    pin: bool = True  # register the ring for DMA where the backend can (GPU)

    def __post_init__(self):
        if self.readers < 1:
            raise ValueError(f"readers={self.readers} must be >= 1")
        if self.block_bytes < ALIGN or self.block_bytes % ALIGN:
            raise ValueError(
                f"block_bytes={self.block_bytes} must be a positive multiple of {ALIGN}"
            )
        if self.ring_slots < 0:
            raise ValueError(f"ring_slots={self.ring_slots} must be >= 0 (0: readers + 4)")
        if self.io not in IO_MODES:
            raise ValueError(f"io={self.io!r} is not supported; allowed: {', '.join(IO_MODES)}")

    @property
    def slots(self) -> int:
        return self.ring_slots or self.readers + 4


@dataclasses.dataclass
class LoadStats:
    """What one load did; `summary()` is the line the loader logs."""

    bytes_needed: int = 0  # tensor bytes this process's devices hold (before replication)
    bytes_read: int = 0  # bytes read from files (alignment and small gaps included)
    bytes_transferred: int = 0  # host → device, replicas included
    seconds: float = 0.0
    host_buffer_bytes: int = 0  # the ring (gathered shards come on top, one block at a time)
    blocks: int = 0
    pinned: bool = False
    direct_io: bool = False
    # Where the time went (seconds): ring and threads set up; the consumer waiting for reads,
    # issuing transfers, building weights (concatenations, fusing, their compilation); the wait
    # for the last transfers and the shutdown.
    setup_s: float = 0.0
    wait_s: float = 0.0
    put_s: float = 0.0
    fuse_s: float = 0.0
    drain_s: float = 0.0

    def summary(self) -> str:
        head = f"{self.bytes_needed / 1e9:.2f} GB of weights in {self.seconds:.2f} s"
        if not self.bytes_read:  # GGUF, Orbax as HF tensors: produced on the host, not read
            return f"{head} ({self.blocks} tensors produced on the host)"
        rate = self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0
        return (
            f"{head} ({rate:.2f} GB/s read; {self.blocks} blocks, "
            f"{self.host_buffer_bytes / 2**20:.0f} MiB {'pinned' if self.pinned else 'pageable'} "
            f"ring, {'direct' if self.direct_io else 'buffered'} I/O)"
        )


# --- the plan: which bytes, in which order, go to which device ------------------------------------


@dataclasses.dataclass(eq=False)
class _Job:
    """One piece's shard on one device: its box in piece coordinates and in the tensor's."""

    recipe: int
    piece: int
    device: Any
    box: tuple[tuple[int, int], ...]  # [start, stop) per axis of piece.shape
    src_box: tuple[tuple[int, int], ...]  # the same in src_shape (axis 0 divided by repeat)
    parts: list[Any] = dataclasses.field(default_factory=list)
    n_parts: int = 0
    part_shapes: list[tuple[int, ...]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, eq=False)
class _Part:
    """What of one segment goes to one job: `index` into the segment's array, then `take` along
    axis 0 (repeated KV heads)."""

    job: _Job
    index: tuple[slice, ...]
    take: np.ndarray | None

    def extract(self, segment: np.ndarray) -> np.ndarray:
        x = segment[self.index]
        if self.take is not None:
            x = np.take(x, self.take, axis=0)
        # Strided shards (a column range of each row: w_o, w_down under tensor parallelism) are
        # gathered here; everything else is transferred straight from the read buffer.
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)


@dataclasses.dataclass(eq=False)
class _Segment:
    """Rows [s0, s1) along the piece's split axis of one tensor, and who needs them."""

    piece: Piece
    dtype: np.dtype
    s0: int
    s1: int
    start: int  # byte range in the file (safetensors), or in the tensor (other sources)
    end: int
    parts: list[_Part] = dataclasses.field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.piece.src_shape)
        shape[self.piece.split] = self.s1 - self.s0
        return tuple(shape)


@dataclasses.dataclass(eq=False)
class _Block:
    """One read: a contiguous byte range of one file (or one tensor of another source)."""

    file: str  # a file path, or a tensor name for sources that are not safetensors
    start: int
    end: int
    segments: list[_Segment]


@dataclasses.dataclass
class Plan:
    recipes: list[Recipe]
    jobs: list[_Job]
    blocks: list[_Block]
    bytes_needed: int  # tensor bytes the local devices hold (each tensor counted once)
    dtypes: dict[str, np.dtype] | None = None  # per tensor, when known before reading

    @property
    def bytes_read(self) -> int:
        return sum(b.end - b.start for b in self.blocks)


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(sl.indices(n)[:2] for sl, n in zip(index, shape, strict=True))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def make_plan(
    source: TensorSource,
    plan_recipes: list[Recipe],
    devices: Sequence[Any],
    block_bytes: int,
    gap_bytes: int = 1 << 20,
) -> Plan:
    """Jobs for `devices` (this process's), and the blocks that feed them in on-disk order."""
    local = set(devices)
    jobs: list[_Job] = []
    by_tensor: dict[str, list[_Job]] = {}
    pieces: dict[str, Piece] = {}
    for ri, rec in enumerate(plan_recipes):
        for pi, piece in enumerate(rec.pieces):
            pieces[piece.name] = piece
            r = piece.repeat
            for device, index in rec.sharding.devices_indices_map(piece.shape).items():
                if device not in local:
                    continue
                box = _box(index, piece.shape)
                (a, b), rest = box[0], box[1:]
                src_box = ((a // r, (b - 1) // r + 1), *rest)
                job = _Job(ri, pi, device, box, src_box)
                jobs.append(job)
                by_tensor.setdefault(piece.name, []).append(job)

    files = isinstance(source, SafetensorsCheckpoint)
    if files:
        rank = {f.path: i for i, f in enumerate(source.files)}
        entries = {n: source.entry(n) for n in by_tensor}
        order = sorted(by_tensor, key=lambda n: (rank[entries[n].file], entries[n].offset))
    else:
        position = {n: i for i, n in enumerate(source.tensor_names())}
        order = sorted(by_tensor, key=lambda n: position[n])

    blocks: list[_Block] = []
    needed = 0
    for name in order:
        piece, tensor_jobs = pieces[name], by_tensor[name]
        split = piece.split
        if files:
            entry = entries[name]
            dtype, file, base = entry.dtype, entry.file, entry.offset
            if math.prod(entry.shape) != math.prod(piece.src_shape):
                raise ValueError(
                    f"{file}: tensor {name!r} has shape {entry.shape}, expected {piece.hf_shape}"
                )
        else:
            dtype, file, base = np.dtype(np.float32), name, 0  # dtype is known once produced
        stride = math.prod(piece.src_shape[split + 1 :]) * dtype.itemsize
        step = max(1, block_bytes // stride) if files else piece.src_shape[split]
        for lo, hi in _merge([j.src_box[split] for j in tensor_jobs]):
            needed += (hi - lo) * stride
            for s0 in range(lo, hi, step):
                s1 = min(s0 + step, hi)
                seg = _Segment(piece, dtype, s0, s1, base + s0 * stride, base + s1 * stride)
                _attach_parts(seg, tensor_jobs)
                last = blocks[-1] if blocks else None
                if (
                    files
                    and last is not None
                    and last.file == file
                    and 0 <= seg.start - last.end <= gap_bytes
                    and seg.end - last.start <= block_bytes
                ) or (not files and last is not None and last.file == file):
                    last.segments.append(seg)
                    last.end = seg.end
                else:
                    blocks.append(_Block(file, seg.start, seg.end, [seg]))
    dtypes = {n: entries[n].dtype for n in entries} if files else None
    return Plan(plan_recipes, jobs, blocks, needed, dtypes)


def _attach_parts(seg: _Segment, jobs: list[_Job]) -> None:
    split, r = seg.piece.split, seg.piece.repeat
    for job in jobs:
        lo, hi = job.src_box[split]
        u0, u1 = max(lo, seg.s0), min(hi, seg.s1)
        if u0 >= u1:
            continue
        index = [slice(a, b) for a, b in job.src_box]
        index[split] = slice(u0 - seg.s0, u1 - seg.s0)
        take = None
        if r > 1:
            a, b = job.box[0]
            if split == 0:  # only the heads of this segment
                a, b = max(a, u0 * r), min(b, u1 * r)
            first, last = a // r, (b - 1) // r + 1
            shift = seg.s0 if split == 0 else 0
            index[0] = slice(first - shift, last - shift)
            take = np.arange(a, b) // r - first
            if len(take) == 1:  # one head: a plain slice, no gather
                index[0] = slice(index[0].start + int(take[0]), index[0].start + int(take[0]) + 1)
                take = None
        seg.parts.append(_Part(job, tuple(index), take))
        job.n_parts += 1
        shape = [sl.stop - sl.start for sl in index]
        if take is not None:
            shape[0] = len(take)
        job.part_shapes.append(tuple(shape))


# --- readers: blocks in order, each as one array per segment --------------------------------------


class _Reader(Protocol):
    def __iter__(self) -> Iterator[tuple[_Block, list[np.ndarray], Any]]: ...

    def release(self, token: Any, arrays: list[Any]) -> None: ...

    def close(self) -> None: ...


class _FileReader:
    """Blocks of safetensors files through a `RingReader`, as one array per segment."""

    def __init__(self, blocks: list[_Block], opts: LoadOptions, direct: bool, client: Any):
        self.blocks = blocks
        self.ring = RingReader(
            [(b.file, b.start, b.end) for b in blocks],
            readers=opts.readers,
            slots=opts.slots,
            direct=direct,
            register=client.dma_map if client is not None else None,
            unregister=client.dma_unmap if client is not None else None,
            wait=lambda arrays: jax.block_until_ready(
                [a for a in arrays if isinstance(a, jax.Array)]
            ),
        )

    @property
    def pinned(self) -> bool:
        return self.ring.pinned

    @property
    def nbytes(self) -> int:
        return self.ring.nbytes

    def __iter__(self) -> Iterator[tuple[_Block, list[np.ndarray], Any]]:
        for block, (slot, data) in zip(self.blocks, self.ring, strict=True):
            views = [
                data[seg.start - block.start : seg.end - block.start]
                .view(seg.dtype)
                .reshape(seg.shape)
                for seg in block.segments
            ]
            yield block, views, slot

    def release(self, token: Any, arrays: list[Any]) -> None:
        self.ring.release(token, arrays)

    def close(self) -> None:
        self.ring.close()


class _SourceReader:
    """Tensors of any TensorSource (GGUF dequantised, Orbax, ...), produced in source order by a
    thread, at most `ahead` tensors ahead of the transfers."""

    def __init__(self, source: TensorSource, blocks: list[_Block], ahead: int = 2):
        self.source, self.blocks = source, blocks
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=ahead)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="rtpjax-source", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        for block in self.blocks:
            try:
                item: Any = np.asarray(self.source.tensor(block.file))
            except BaseException as e:
                item = e
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    pass
            if self.stop.is_set() or isinstance(item, BaseException):
                return

    def __iter__(self) -> Iterator[tuple[_Block, list[np.ndarray], Any]]:
        for block in self.blocks:
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            views = []
            for seg in block.segments:
                a = item.reshape(seg.piece.src_shape)
                index = [slice(None)] * a.ndim
                index[seg.piece.split] = slice(seg.s0, seg.s1)
                views.append(a[tuple(index)])
            yield block, views, None

    def release(self, token: Any, arrays: list[Any]) -> None:
        pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


# --- placers: where the parts go ------------------------------------------------------------------


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


# --- the load -------------------------------------------------------------------------------------


class _Builder:
    """Turns finished jobs into weights: a job's parts into its shard (concatenated on its device
    when read in several blocks), a piece's shards into one array, a weight's pieces into the
    weight. A step whose compiled program is not ready yet waits in `pending`, retried after
    every block, so the reads never stall behind compilation."""

    def __init__(self, plan: Plan, placer: Placer, stats: LoadStats):
        self.plan, self.placer, self.stats = plan, placer, stats
        self.jobs_left: dict[tuple[int, int], int] = {}  # (recipe, piece) → unfinished jobs
        for job in plan.jobs:
            key = (job.recipe, job.piece)
            self.jobs_left[key] = self.jobs_left.get(key, 0) + 1
        self.shards: dict[tuple[int, int], dict[Any, Any]] = {}
        self.pieces: dict[int, dict[int, Any]] = {}
        self.weights: list[Any] = [None] * len(plan.recipes)
        self.pending: list[tuple[Callable[[], bool], Callable[[], None]]] = []

    def job_done(self, job: _Job) -> None:
        piece = self.plan.recipes[job.recipe].pieces[job.piece]
        if job.n_parts > 1 and not self.placer.ready("concat", job.parts, piece.split):
            self.pending.append(
                (
                    lambda: self.placer.ready("concat", job.parts, piece.split),
                    lambda: self._finish(job),
                )
            )
        else:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        rec = self.plan.recipes[job.recipe]
        piece = rec.pieces[job.piece]
        shard = job.parts[0] if job.n_parts == 1 else self.placer.concat(job.parts, piece.split)
        job.parts = []
        key = (job.recipe, job.piece)
        self.shards.setdefault(key, {})[job.device] = shard
        self.jobs_left[key] -= 1
        if self.jobs_left[key]:
            return
        done = self.pieces.setdefault(job.recipe, {})
        done[job.piece] = self.placer.assemble(piece.shape, rec.sharding, self.shards.pop(key))
        if len(done) < len(rec.pieces):
            return
        pieces = [done[i] for i in range(len(rec.pieces))]
        del self.pieces[job.recipe]

        def fuse() -> None:
            self.weights[job.recipe] = self.placer.fuse(pieces, rec)

        if self.placer.ready("fuse", pieces, rec):
            fuse()
        else:
            self.pending.append((lambda: self.placer.ready("fuse", pieces, rec), fuse))

    def flush(self, wait: bool = False) -> None:
        """Run the pending steps whose programs are ready (all of them when `wait`)."""
        while self.pending:
            ready = [p for p in self.pending if wait or p[0]()]
            if not ready:
                return
            self.pending = [p for p in self.pending if p not in ready]
            for _, step in ready:
                step()  # may queue a later step (a concat completes a piece, ...)


def _execute(plan: Plan, reader: _Reader, placer: Placer, bar: Any, stats: LoadStats) -> list[Any]:
    """Consume blocks in order; return one value per recipe (its weight, built by `placer`)."""
    builder = _Builder(plan, placer, stats)
    clock = time.perf_counter
    blocks = iter(reader)
    while True:
        t0 = clock()
        item = next(blocks, None)
        stats.wait_s += clock() - t0
        if item is None:
            break
        block, views, token = item
        sent = []
        for seg, view in zip(block.segments, views, strict=True):
            for part in seg.parts:
                t0 = clock()
                host = part.extract(view)
                job = part.job
                job.parts.append(placer.put(host, job.device))
                sent.append(job.parts[-1])
                stats.bytes_transferred += host.nbytes
                t1 = clock()
                stats.put_s += t1 - t0
                if len(job.parts) == job.n_parts:
                    builder.job_done(job)
                    stats.fuse_s += clock() - t1
        del views
        reader.release(token, sent)
        t0 = clock()
        builder.flush()
        stats.fuse_s += clock() - t0
        if bar is not None:
            bar.update(block.end - block.start)
    t0 = clock()
    builder.flush(wait=True)
    stats.fuse_s += clock() - t0
    missing = [r.path for r, w in zip(plan.recipes, builder.weights, strict=True) if w is None]
    if missing:
        raise ValueError(f"internal: weights {missing[:3]} were never completed")
    return builder.weights


def _local_devices(mesh: Mesh) -> list[Any]:
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def _choose_direct(paths: list[str], io: str) -> bool:
    if io != "auto":
        return io == "direct"
    resident = resident_fraction(paths)
    return resident is not None and resident < 0.5


def _direct_works(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


def run_plan(
    source: TensorSource,
    plan: Plan,
    placer: Placer,
    options: LoadOptions,
    client: Any = None,
    progress: bool = False,
) -> tuple[list[Any], LoadStats]:
    """Read the plan's blocks and place them; nothing is returned unless every weight completed."""
    stats = LoadStats(bytes_needed=plan.bytes_needed, blocks=len(plan.blocks))
    t0 = time.perf_counter()
    # The collector would walk every live object many times over during a load, and each pass
    # runs jax's own collection hook: hold it off until the weights are in place.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    reader: Any = None
    bar = None
    try:
        if isinstance(source, SafetensorsCheckpoint):
            paths = list(dict.fromkeys(b.file for b in plan.blocks))
            direct = _choose_direct(paths, options.io) and all(_direct_works(p) for p in paths)
            reader = _FileReader(plan.blocks, options, direct, client if options.pin else None)
            stats.direct_io = direct
            stats.host_buffer_bytes = reader.nbytes
            stats.bytes_read = plan.bytes_read
        else:
            reader = _SourceReader(source, plan.blocks)
        placer.prepare(plan)
        if progress:
            bar = _progress_bar(source.path, stats.bytes_read or None)
        stats.setup_s = time.perf_counter() - t0
        weights = _execute(plan, reader, placer, bar, stats)
        t1 = time.perf_counter()
        jax.block_until_ready([w for w in weights if isinstance(w, jax.Array)])
    finally:
        if reader is not None:
            reader.close()
        placer.close()
        if bar is not None:
            bar.close()
        if gc_was_enabled:
            gc.enable()
    stats.drain_s = time.perf_counter() - t1
    stats.pinned = bool(getattr(reader, "pinned", False))
    stats.seconds = time.perf_counter() - t0
    return weights, stats


BAR_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]"
)


def _progress_bar(path: str, total: int | None) -> Any:
    """Bytes read so far, of how many, and the rate: "3.2GB/16.1GB [00:01<00:04, 3.1GB/s]"."""
    from tqdm.auto import tqdm

    name = os.path.basename(os.fspath(path).rstrip("/"))
    return tqdm(
        total=total,
        desc=f"loading {name}",
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        bar_format=BAR_FORMAT if total else None,
    )


def _prepare(source: TensorSource, cfg: ModelConfig, dtype: Any, mesh: Mesh) -> list[Recipe]:
    check_names(source, cfg)
    spec = llama.spec(cfg, dtype)
    rules.check_divisible(spec, mesh)
    plan_recipes = recipes(cfg, spec, rules.shardings(spec, mesh))
    check_shapes(source, plan_recipes)
    return plan_recipes


def _touch(devices: Sequence[Any]) -> None:
    with contextlib.suppress(Exception):  # only a head start: the load itself reports errors
        jax.block_until_ready([jax.device_put(np.zeros(1, np.uint8), d) for d in devices])


def load_params_fast(
    source: TensorSource,
    cfg: ModelConfig,
    dtype: Any = jnp.bfloat16,
    mesh: Mesh | None = None,
    *,
    progress: bool = False,
    options: LoadOptions | None = None,
) -> tuple[llama.Params, LoadStats]:
    """Every weight of `cfg` from `source`, in its declared sharding over `mesh`; bit-identical to
    `loader.load_params`. Reads only what this process's devices hold."""
    mesh = mesh or make_mesh(1, 1)
    options = options or LoadOptions()
    devices = _local_devices(mesh)
    # A process's first transfer to a device also sets up its memory allocator (about a second on
    # an H100 with jax's default preallocation): start it now, behind the planning and first reads.
    warmup = threading.Thread(target=_touch, args=(devices,), name="rtpjax-warmup", daemon=True)
    warmup.start()
    plan_recipes = _prepare(source, cfg, dtype, mesh)
    plan = make_plan(source, plan_recipes, devices, options.block_bytes)
    client = devices[0].client if devices and devices[0].platform != "cpu" else None
    weights, stats = run_plan(source, plan, DevicePlacer(), options, client, progress)
    spec = llama.spec(cfg, dtype)
    _, treedef = jax.tree.flatten(spec, is_leaf=is_info)
    logger.info("loaded %s", stats.summary())
    return treedef.unflatten(weights), stats


def read_local_shards(
    source: TensorSource,
    cfg: ModelConfig,
    dtype: Any,
    mesh: Mesh,
    devices: Sequence[Any],
    options: LoadOptions | None = None,
) -> tuple[dict[str, dict[Any, np.ndarray]], LoadStats]:
    """What one process of a multi-host run would load, as host arrays: {weight path: {device:
    its shard}} for `devices` only, reading only the rows they hold. For tests and planning."""
    options = options or LoadOptions()
    plan_recipes = _prepare(source, cfg, dtype, mesh)
    plan = make_plan(source, plan_recipes, devices, options.block_bytes)
    weights, stats = run_plan(source, plan, HostPlacer(), options)
    return {r.path: w for r, w in zip(plan_recipes, weights, strict=True)}, stats
