"""The fast loader's plan: which bytes, in which order, go to which device.

Every declared weight is a `Recipe` of `Piece`s, one per HF tensor (q, k, v → w_qkv), each a
reshape of its tensor into the model's layout. The shardings say which box of every piece each of
this process's devices holds (a `Job`); the rows those boxes need, taken in on-disk order (files,
then offsets), are cut into `Segment`s and packed into `Block`s of at most `block_bytes`, each
segment carrying the `Part`s of it that go to each job. A process of a multi-host run plans only
the rows its own devices hold. Executing a plan is `fast_loader.run_plan`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from rtpjax.config import ModelConfig
from rtpjax.models import llama
from rtpjax.sharding import rules
from rtpjax.weights.loader import Piece, Recipe, TensorSource, check_names, check_shapes, recipes
from rtpjax.weights.safetensors_io import SafetensorsCheckpoint


@dataclasses.dataclass(eq=False)
class Job:
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
class Part:
    """What of one segment goes to one job: `index` into the segment's array, then `take` along
    axis 0 (repeated KV heads)."""

    job: Job
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
class Segment:
    """Rows [s0, s1) along the piece's split axis of one tensor, and who needs them."""

    piece: Piece
    dtype: np.dtype
    s0: int
    s1: int
    start: int  # byte range in the file (safetensors), or in the tensor (other sources)
    end: int
    parts: list[Part] = dataclasses.field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.piece.src_shape)
        shape[self.piece.split] = self.s1 - self.s0
        return tuple(shape)


@dataclasses.dataclass(eq=False)
class Block:
    """One read: a contiguous byte range of one file (or one tensor of another source)."""

    file: str  # a file path, or a tensor name for sources that are not safetensors
    start: int
    end: int
    segments: list[Segment]


@dataclasses.dataclass
class Plan:
    recipes: list[Recipe]
    jobs: list[Job]
    blocks: list[Block]
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
    jobs: list[Job] = []
    by_tensor: dict[str, list[Job]] = {}
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
                job = Job(ri, pi, device, box, src_box)
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

    blocks: list[Block] = []
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
                seg = Segment(piece, dtype, s0, s1, base + s0 * stride, base + s1 * stride)
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
                    blocks.append(Block(file, seg.start, seg.end, [seg]))
    dtypes = {n: entries[n].dtype for n in entries} if files else None
    return Plan(plan_recipes, jobs, blocks, needed, dtypes)


def _attach_parts(seg: Segment, jobs: list[Job]) -> None:
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
        seg.parts.append(Part(job, tuple(index), take))
        job.n_parts += 1
        shape = [sl.stop - sl.start for sl in index]
        if take is not None:
            shape[0] = len(take)
        job.part_shapes.append(tuple(shape))


def prepare_recipes(source: TensorSource, cfg: ModelConfig, dtype: Any, mesh: Mesh) -> list[Recipe]:
    """The recipes of every weight of `cfg` in its sharding over `mesh`, after checking that
    `source` has no tensor we would drop and every piece in the shape the config implies."""
    check_names(source, cfg)
    spec = llama.spec(cfg, dtype)
    rules.check_divisible(spec, mesh)
    plan_recipes = recipes(cfg, spec, rules.shardings(spec, mesh))
    check_shapes(source, plan_recipes)
    return plan_recipes
