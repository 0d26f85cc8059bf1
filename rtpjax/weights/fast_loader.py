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

The plan lives in `load_plan`, the placers in `placers`; this module reads and transfers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rtpjax.config import ModelConfig
from rtpjax.models import llama
from rtpjax.models.params import is_info
from rtpjax.sharding.mesh import make_mesh
from rtpjax.weights.load_plan import Block, Job, Plan, make_plan, prepare_recipes
from rtpjax.weights.loader import Piece, Recipe, TensorSource
from rtpjax.weights.placers import DevicePlacer, HostPlacer, Placer
from rtpjax.weights.safetensors_io import (
    ALIGN,
    RingReader,
    SafetensorsCheckpoint,
    resident_fraction,
)

__all__ = [
    "IO_MODES",
    "DevicePlacer",
    "HostPlacer",
    "LoadOptions",
    "LoadStats",
    "Piece",
    "Placer",
    "Plan",
    "Recipe",
    "load_params_fast",
    "make_plan",
    "read_local_shards",
    "run_plan",
]


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


# --- readers: blocks in order, each as one array per segment --------------------------------------


class _Reader(Protocol):
    def __iter__(self) -> Iterator[tuple[Block, list[np.ndarray], Any]]: ...

    def release(self, token: Any, arrays: list[Any]) -> None: ...

    def close(self) -> None: ...


class _FileReader:
    """Blocks of safetensors files through a `RingReader`, as one array per segment."""

    def __init__(self, blocks: list[Block], opts: LoadOptions, direct: bool, client: Any):
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

    def __iter__(self) -> Iterator[tuple[Block, list[np.ndarray], Any]]:
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

    def __init__(self, source: TensorSource, blocks: list[Block], ahead: int = 2):
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

    def __iter__(self) -> Iterator[tuple[Block, list[np.ndarray], Any]]:
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

    def job_done(self, job: Job) -> None:
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

    def _finish(self, job: Job) -> None:
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
    plan_recipes = prepare_recipes(source, cfg, dtype, mesh)
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
    plan_recipes = prepare_recipes(source, cfg, dtype, mesh)
    plan = make_plan(source, plan_recipes, devices, options.block_bytes)
    weights, stats = run_plan(source, plan, HostPlacer(), options)
    return {r.path: w for r, w in zip(plan_recipes, weights, strict=True)}, stats
