"""HF safetensors checkpoints (one file or sharded with model.safetensors.index.json), read by mmap.

The format is an 8-byte little-endian header length, a JSON header of {name: {dtype, shape,
data_offsets}}, then the raw bytes. We parse it ourselves so every tensor is a zero-copy view of the
mapped file, its place on disk is known (the fast loader reads in file order), and a truncated or
corrupt file is caught before anything is loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in `file`
    nbytes: int


class SafetensorsFile:
    """One .safetensors file: a validated header and mmap views of its tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: not found")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(
                    f"{self.path}: corrupt safetensors header (length {n}, file {size} "
                    "bytes): truncated or not a safetensors file"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.entries: dict[str, TensorEntry] = {}
        for name, e in header.items():
            try:
                dtype = DTYPES[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"{self.path}: corrupt header entry for tensor {name!r}: {e}"
                ) from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != nbytes:
                raise ValueError(
                    f"{self.path}: tensor {name!r} has {end - begin} bytes, its shape "
                    f"{shape} and dtype {e['dtype']} need {nbytes}"
                )
            if base + end > size:
                raise ValueError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte {base + end}, "
                    f"the file has {size}"
                )
            self.entries[name] = TensorEntry(name, self.path, dtype, shape, base + begin, nbytes)
        self._mmap: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def tensor(self, name: str) -> np.ndarray:
        """A read-only view into the mapped file (no copy)."""
        e = self.entries[name]
        count = e.nbytes // e.dtype.itemsize
        return np.frombuffer(self._map(), e.dtype, count, e.offset).reshape(e.shape)


class SafetensorsCheckpoint:
    """An HF checkpoint directory (or a single .safetensors file): tensor names → arrays."""

    INDEX = "model.safetensors.index.json"

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.path = path
        if os.path.isfile(path):
            files = [path]
        elif not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not found")
        elif os.path.isfile(os.path.join(path, self.INDEX)):
            files = self._files_from_index(os.path.join(path, self.INDEX))
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            files = [os.path.join(path, "model.safetensors")]
        else:
            found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not found:
                raise FileNotFoundError(
                    f"{path}: no model.safetensors or {self.INDEX} "
                    "(only safetensors checkpoints are read; convert .bin files)"
                )
            files = [os.path.join(path, f) for f in found]
        self.files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.entries:
                if name in self._where:
                    raise ValueError(f"{f.path}: tensor {name!r} also in {self._where[name].path}")
                self._where[name] = f

    def _files_from_index(self, index: str) -> list[str]:
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: corrupt index ({e!r})") from None
        files = []
        for name in dict.fromkeys(weight_map.values()):
            p = os.path.join(os.path.dirname(index), name)
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: listed in {index} but missing")
            files.append(p)
        return files

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def entry(self, name: str) -> TensorEntry:
        if name not in self._where:
            raise KeyError(f"{self.path}: tensor {name!r} not in checkpoint")
        return self._where[name].entries[name]

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    @property
    def file_paths(self) -> list[str]:
        return [f.path for f in self.files]

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"{self.path}: tensor {name!r} not in checkpoint")
        return self._where[name].tensor(name)

    def entries_in_file_order(self) -> Iterator[TensorEntry]:
        for f in self.files:
            yield from sorted(f.entries.values(), key=lambda e: e.offset)


def save_file(
    tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a .safetensors file (tensors in the given order)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        header[name] = {
            "dtype": DTYPE_NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as safetensors does
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)


def save_sharded(
    tensors: Iterable[tuple[str, np.ndarray]],
    directory: str | os.PathLike,
    max_shard_bytes: int = 5 * 10**9,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[int], None] | None = None,
) -> list[str]:
    """Write (name, array) pairs, in order, as HF does: model.safetensors, or
    model-0000i-of-0000n.safetensors plus model.safetensors.index.json when they exceed
    `max_shard_bytes`. Holds at most one shard in memory. Returns the file names written."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be >= 1")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    temps: list[str] = []
    weight_map: dict[str, int] = {}
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush() -> None:
        temps.append(os.path.join(directory, f".shard-{len(temps):05d}.safetensors"))
        save_file(shard, temps[-1], metadata)
        shard.clear()

    for name, a in tensors:
        a = np.asarray(a)
        if name in weight_map:
            raise ValueError(f"tensor {name!r} given twice")
        if shard and size + a.nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = a
        weight_map[name] = len(temps)
        size += a.nbytes
        total += a.nbytes
        if on_tensor is not None:
            on_tensor(a.nbytes)
    if shard or not temps:
        flush()
    n = len(temps)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    for tmp, name in zip(temps, names, strict=True):
        os.replace(tmp, os.path.join(directory, name))
    if n > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: names[i] for k, i in weight_map.items()},
        }
        with open(os.path.join(directory, SafetensorsCheckpoint.INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    return names


# --- page cache -----------------------------------------------------------------------------------

_PAGE = mmap.PAGESIZE


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


def resident_fraction(paths: Iterable[str | os.PathLike]) -> float | None:
    """Fraction of the files' pages in the OS page cache (mincore), or None where unknown."""
    libc = _libc()
    if libc is None:
        return None
    resident = pages = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        n = (size + _PAGE - 1) // _PAGE
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = np.zeros(n, np.uint8)
                if libc.mincore(addr, size, vec.ctypes.data) != 0:
                    return None
                resident += int(np.count_nonzero(vec & 1))
                pages += n
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / pages if pages else 1.0


def drop_from_page_cache(paths: Iterable[str | os.PathLike]) -> None:
    """Ask the kernel to drop the files' clean pages (posix_fadvise DONTNEED; no privileges)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- reading in file order into a bounded ring ----------------------------------------------------

ALIGN = 4096  # O_DIRECT offset, length and buffer alignment (covers 512- and 4096-byte sectors)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class RingReader:
    """Byte ranges of files, read in the given order by `readers` threads into a ring of `slots`
    page-aligned host buffers, each range with one large pread (O_DIRECT when `direct`).

    Iterating yields (slot, uint8 view of exactly the range) in order. `release(slot, pending)`
    gives the slot back once `wait(pending)` returns (a releaser thread waits: transfers out of the
    slot must have completed before it is overwritten). Slots are handed out strictly in range
    order, so a consumer that also goes in order can never wait on a range that waits on a slot.
    `register(address, size)`, when given, is called on each slot after its first read and before
    the consumer sees it (DMA registration, e.g. PJRT's `client.dma_map`), by the reader threads,
    so the pinning overlaps the reads;
    `unregister(address)` undoes it at close. A short read (the file changed since it was opened)
    raises, in the consumer, a one-line ValueError naming the file.
    """

    def __init__(
        self,
        ranges: list[tuple[str, int, int]],
        *,
        readers: int,
        slots: int,
        direct: bool = False,
        register: Callable[[int, int], None] | None = None,
        unregister: Callable[[int], None] | None = None,
        wait: Callable[[Any], None] | None = None,
    ):
        self.ranges = ranges
        span = max((end - start for _, start, end in ranges), default=0)
        self.slot_bytes = _round_up(span + 2 * ALIGN, ALIGN)
        self.n_slots = max(1, min(slots, len(ranges)))
        self.mem = mmap.mmap(-1, self.n_slots * self.slot_bytes)
        self._anchor = ctypes.c_char.from_buffer(self.mem)
        self.address = ctypes.addressof(self._anchor)
        self._register_fn, self._unregister_fn = register, unregister
        self.registered: set[int] = set()
        self._register_lock = threading.Lock()
        self._wait = wait
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(self.n_slots):
            self.free.put(i)
        self.results: dict[int, Any] = {}
        self.cond = threading.Condition()
        self.claim = threading.Lock()
        self.next = 0
        self.stop = threading.Event()
        self.fds: dict[str, int] = {}
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        try:
            for path in dict.fromkeys(p for p, _, _ in ranges):
                self.fds[path] = os.open(path, flags)
                if not direct:
                    os.posix_fadvise(self.fds[path], 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError as e:
            for fd in self.fds.values():
                os.close(fd)
            raise FileNotFoundError(f"{e.filename}: cannot open ({e.strerror})") from None
        self.pending: queue.Queue[Any] = queue.Queue()
        self.release_error: BaseException | None = None
        self.threads = [
            threading.Thread(target=self._read_loop, name=f"rtpjax-read-{i}", daemon=True)
            for i in range(min(readers, max(1, len(ranges))))
        ]
        self.releaser = threading.Thread(
            target=self._release_loop, name="rtpjax-release", daemon=True
        )
        for t in [*self.threads, self.releaser]:
            t.start()

    @property
    def pinned(self) -> bool:
        return bool(self.registered)

    @property
    def nbytes(self) -> int:
        return len(self.mem)

    def _register(self, slot: int) -> None:
        with self._register_lock:
            if self._register_fn is None or slot in self.registered:
                return
            try:
                self._register_fn(self.address + slot * self.slot_bytes, self.slot_bytes)
                self.registered.add(slot)
            except Exception:  # e.g. "DmaMap is not supported" (CPU): stay pageable
                self._register_fn = None

    def _read_loop(self) -> None:
        while not self.stop.is_set():
            with self.claim:
                if self.next >= len(self.ranges):
                    return
                i = self.next
                self.next += 1
                slot = None
                while slot is None:
                    if self.stop.is_set():
                        return
                    with contextlib.suppress(queue.Empty):
                        slot = self.free.get(timeout=0.05)
            try:
                # Read first, register after: the read faults the slot's pages in with the GIL
                # released, so the registration (which holds it) only pins resident pages.
                result: Any = (slot, self._read(i, slot))
                self._register(slot)
            except BaseException as e:  # delivered to the consumer, which raises it
                result = e
            with self.cond:
                self.results[i] = result
                self.cond.notify_all()

    def _read(self, i: int, slot: int) -> int:
        """Read range i into the slot; return the offset of its first byte within the slot."""
        path, start, end = self.ranges[i]
        a0 = start - start % ALIGN
        want = _round_up(end - a0, ALIGN)
        begin = slot * self.slot_bytes
        got = 0
        with memoryview(self.mem) as mv:
            view = mv[begin : begin + want]
            while got < want:
                n = os.preadv(self.fds[path], [view[got:]], a0 + got)
                if n == 0:
                    break
                got += n
            del view
        if a0 + got < end:
            raise ValueError(
                f"{path}: truncated: reading bytes up to {end}, the file ended at {a0 + got} "
                "(it changed since it was opened)"
            )
        return start - a0

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for i, (_, start, end) in enumerate(self.ranges):
            with self.cond:
                while i not in self.results:
                    self.cond.wait()
                result = self.results.pop(i)
            if isinstance(result, BaseException):
                raise result
            slot, offset = result
            begin = slot * self.slot_bytes + offset
            yield slot, np.frombuffer(self.mem, np.uint8, end - start, begin)

    def release(self, slot: int, pending: Any = None) -> None:
        self.pending.put((slot, pending))

    def _release_loop(self) -> None:
        while (item := self.pending.get()) is not None:
            slot, pending = item
            try:
                if self._wait is not None:
                    self._wait(pending)
            except BaseException as e:
                self.release_error = e
            del pending, item
            self.free.put(slot)

    def close(self) -> None:
        """Stop the readers, wait for every pending transfer, free the ring; re-raise a transfer
        error the releaser saw."""
        self.stop.set()
        for t in self.threads:
            t.join()
        self.pending.put(None)  # the releaser drains: nothing still reads the ring after this
        self.releaser.join()
        for fd in self.fds.values():
            os.close(fd)
        for slot in self.registered:
            if self._unregister_fn is not None:
                self._unregister_fn(self.address + slot * self.slot_bytes)
        del self._anchor
        with contextlib.suppress(BufferError):  # a view still lives: the mapping goes with it
            self.mem.close()
        if self.release_error is not None:
            raise self.release_error
