"""The fine-tuning YAML: datasets, adapters, tasks, dispatcher, trainer. Frozen dataclasses.

`FinetuneConfig.from_yaml(path)` reads the file; every wrong key or value raises one ValueError line
naming the file, the YAML path (`tasks[1].batch_size`), the value and what is allowed. The schema
is the dataclasses below; docs/finetune.md shows a complete file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from typing import Any

import yaml

from rtpjax.layers.lora import TARGETS

ADAPTER_KINDS = ("lora", "lora_plus", "dora")
OPTIMIZERS = ("adamw", "sgd", "lion")
SCHEDULES = ("constant", "linear", "cosine")
DATA_FORMATS = ("auto", "alpaca", "chat")
ATTENTION_IMPLS = ("xla", "cudnn")
LORA_IMPLS = ("auto", "reference", "xla", "gpu", "tpu")


class ConfigError(ValueError):
    """A bad value of one field; the loader prefixes the file and the YAML path."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(field, message)


def _positive(field: str, v: int | None, optional: bool = False) -> None:
    if v is None and optional:
        return
    _require(isinstance(v, int) and v >= 1, field, f"{v!r} must be a positive integer")


def _one_of(field: str, v: Any, allowed: tuple) -> None:
    _require(v in allowed, field, f"{v!r} is not allowed; allowed: {', '.join(map(str, allowed))}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # adamw | sgd | lion
    betas: tuple[float, float] = (0.9, 0.999)  # adamw, lion
    eps: float = 1e-8  # adamw
    weight_decay: float = 0.0  # adamw, lion (decoupled)
    momentum: float = 0.0  # sgd

    def __post_init__(self):
        _one_of("name", self.name, OPTIMIZERS)
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            f"{list(self.betas)} must be two numbers in [0, 1)",
        )
        _require(self.eps > 0, "eps", f"{self.eps} must be > 0")
        _require(self.weight_decay >= 0, "weight_decay", f"{self.weight_decay} must be >= 0")
        _require(0 <= self.momentum < 1, "momentum", f"{self.momentum} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    name: str = "constant"  # constant | linear | cosine (after a linear warmup from 0)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # final learning rate / peak, for linear and cosine

    def __post_init__(self):
        _one_of("name", self.name, SCHEDULES)
        _require(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            "warmup_steps",
            f"{self.warmup_steps!r} must be an integer >= 0",
        )
        _require(
            0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"{self.min_lr_ratio} must be in [0, 1]"
        )


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    kind: str = "lora"  # lora | lora_plus | dora
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    learning_rate: float = 2e-4
    loraplus_lr_ratio: float = 16.0  # lora_plus: B's learning rate / A's
    max_grad_norm: float | None = 1.0  # clip this adapter's gradient by its own norm; null: off
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    seed: int = 0  # initialisation of A

    def __post_init__(self):
        _one_of("kind", self.kind, ADAPTER_KINDS)
        _positive("rank", self.rank)
        _require(self.alpha > 0, "alpha", f"{self.alpha} must be > 0")
        _require(0 <= self.dropout < 1, "dropout", f"{self.dropout} must be in [0, 1)")
        _require(len(self.target_modules) > 0, "target_modules", "must name at least one module")
        for i, t in enumerate(self.target_modules):
            _one_of(f"target_modules[{i}]", t, TARGETS)
        _require(
            len(set(self.target_modules)) == len(self.target_modules),
            "target_modules",
            f"{list(self.target_modules)} has duplicates",
        )
        _require(self.learning_rate > 0, "learning_rate", f"{self.learning_rate} must be > 0")
        _require(
            self.loraplus_lr_ratio > 0, "loraplus_lr_ratio", f"{self.loraplus_lr_ratio} must be > 0"
        )
        _require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_grad_norm",
            f"{self.max_grad_norm} must be > 0 or null",
        )

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def b_lr_ratio(self) -> float:
        return self.loraplus_lr_ratio if self.kind == "lora_plus" else 1.0


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    task: str  # one of rtpjax.finetune.tasks.TASKS
    train_examples: int = 2000
    eval_examples: int = 100
    seed: int = 0

    def __post_init__(self):
        from rtpjax.finetune.tasks import TASKS

        _one_of("task", self.task, tuple(TASKS))
        _positive("train_examples", self.train_examples)
        _require(
            isinstance(self.eval_examples, int) and self.eval_examples >= 0,
            "eval_examples",
            f"{self.eval_examples!r} must be an integer >= 0",
        )


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    path: str | None = None  # JSONL file: alpaca {instruction, input, output} or chat {messages}
    format: str = "auto"  # auto | alpaca | chat
    eval_path: str | None = None
    eval_fraction: float = 0.0  # held out of `path` when there is no eval_path
    system_prompt: str | None = None  # prepended as a system message when a record has none
    synthetic: SyntheticConfig | None = None  # generated offline instead of read from `path`

    def __post_init__(self):
        _one_of("format", self.format, DATA_FORMATS)
        _require(
            (self.path is None) != (self.synthetic is None),
            "path",
            "give exactly one of `path` (a JSONL file) and `synthetic`",
        )
        _require(
            0 <= self.eval_fraction < 1, "eval_fraction", f"{self.eval_fraction} must be in [0, 1)"
        )


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    name: str
    adapter: str  # a key of `adapters`
    dataset: str  # a key of `datasets`
    batch_size: int = 8  # examples (packed rows with packing) per optimizer step
    micro_batch_size: int | None = None  # rows per device step (gradient accumulation); = batch
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops earlier than `epochs` if reached
    max_length: int = 512  # tokens per row; longer examples are cut
    packing: bool = False  # several examples per row (first-fit) instead of one padded example
    shuffle_seed: int = 0
    save_interval: int | None = None  # optimizer steps between PEFT exports (the end always)
    eval_interval: int | None = None  # optimizer steps between evaluations (the end always)
    eval_examples: int | None = None  # evaluate on at most this many held-out examples

    def __post_init__(self):
        _require(
            bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or "")),
            "name",
            f"{self.name!r} must be letters, digits, '_', '.', '-'",
        )
        _positive("batch_size", self.batch_size)
        _positive("micro_batch_size", self.micro_batch_size, optional=True)
        if self.micro_batch_size is not None:
            _require(
                self.batch_size % self.micro_batch_size == 0,
                "micro_batch_size",
                f"{self.micro_batch_size} must divide batch_size={self.batch_size}",
            )
        _positive("epochs", self.epochs)
        _positive("max_steps", self.max_steps, optional=True)
        _require(
            isinstance(self.max_length, int) and self.max_length >= 8,
            "max_length",
            f"{self.max_length!r} must be an integer >= 8",
        )
        _positive("save_interval", self.save_interval, optional=True)
        _positive("eval_interval", self.eval_interval, optional=True)
        _positive("eval_examples", self.eval_examples, optional=True)

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro


@dataclasses.dataclass(frozen=True)
class DispatcherConfig:
    max_concurrent: int = 4  # adapter slots of the compiled step (G)
    memory_budget: int | None = None  # bytes ("8GiB" in YAML); null: the device's limit, if known

    def __post_init__(self):
        _positive("max_concurrent", self.max_concurrent)
        _positive("memory_budget", self.memory_budget, optional=True)


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    checkpoint_interval: int = 50  # device steps between Orbax checkpoints (and at the end)
    keep_checkpoints: int = 2
    log_interval: int = 10  # device steps between loss lines in the log
    remat: bool = False  # recompute each layer in the backward pass (activation memory ≈ 1 layer)
    attention: str = "xla"  # xla | cudnn (GPU, causal rows only)
    lora_impl: str = "auto"  # the batched LoRA operator's path (kernels/lora.py)
    loss_chunk: int = 1024  # tokens per chunk of the vocabulary projection in the loss
    progress: bool = True  # tqdm bars, one per running task
    plot: bool = True  # loss-curve PNG at the end

    def __post_init__(self):
        _positive("checkpoint_interval", self.checkpoint_interval)
        _positive("keep_checkpoints", self.keep_checkpoints)
        _positive("log_interval", self.log_interval)
        _one_of("attention", self.attention, ATTENTION_IMPLS)
        _one_of("lora_impl", self.lora_impl, LORA_IMPLS)
        _positive("loss_chunk", self.loss_chunk)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    datasets: dict[str, DatasetConfig]
    adapters: dict[str, AdapterConfig]
    tasks: tuple[TaskConfig, ...]
    model: str | None = None  # HF directory or GGUF file; null: the embedded default model
    tokenizer: str | None = None  # null: the model's; "bytes": UTF-8 bytes (tiny test models)
    dtype: str = "auto"  # base weights: auto | float32 | bfloat16
    output_dir: str = "runs/finetune"  # relative to the working directory (data paths: the YAML)
    seed: int = 0
    dispatcher: DispatcherConfig = DispatcherConfig()
    trainer: TrainerConfig = TrainerConfig()
    base_dir: str = dataclasses.field(default=".", metadata={"yaml": False})

    def __post_init__(self):
        _require(len(self.tasks) > 0, "tasks", "must list at least one task")
        _one_of("dtype", self.dtype, ("auto", "float32", "bfloat16", "bf16", "f32"))
        names = set()
        for i, t in enumerate(self.tasks):
            _require(t.name not in names, f"tasks[{i}].name", f"{t.name!r} is used twice")
            names.add(t.name)
            _require(
                t.adapter in self.adapters,
                f"tasks[{i}].adapter",
                f"{t.adapter!r} is not defined; defined: {', '.join(self.adapters) or 'none'}",
            )
            _require(
                t.dataset in self.datasets,
                f"tasks[{i}].dataset",
                f"{t.dataset!r} is not defined; defined: {', '.join(self.datasets) or 'none'}",
            )

    def resolve(self, path: str | None) -> str | None:
        """A path from the YAML, relative to the YAML's directory."""
        if path is None or os.path.isabs(path):
            return path
        return os.path.normpath(os.path.join(self.base_dir, path))

    def adapter_of(self, task: TaskConfig) -> AdapterConfig:
        return self.adapters[task.adapter]

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> FinetuneConfig:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: config file not found")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        return cls.from_dict(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", base_dir: str = ".") -> FinetuneConfig:
        try:
            cfg = _build(cls, data, "")
        except _PathError as e:
            raise ValueError(f"{source}: {e}") from None
        return dataclasses.replace(cfg, base_dir=base_dir)


# ------------------------------------------------------------------------------ the YAML walker


class _PathError(ValueError):
    pass


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and not key.startswith("[") else f"{path}{key}"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _PathError(f"{path}: expected a mapping of names, got {_show(value)}")
        return {str(k): _convert(vt, v, _join(path, str(k))) for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise _PathError(f"{path}: expected a list, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _PathError(f"{path}: expected a list of {len(args)}, got {_show(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise _PathError(f"{path}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if path.endswith("memory_budget") and isinstance(value, str):
            return _size(value, path)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _PathError(f"{path}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _PathError(f"{path}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _PathError(f"{path}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"{path}: unsupported schema type {tp}")


def _size(text: str, path: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise _PathError(f"{path}: {text!r} is not a size; write bytes or e.g. 8GiB, 512MB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if value is not None else "null"


def _build(cls: type, data: Any, path: str) -> Any:
    where = path or "the top level"
    if not isinstance(data, dict):
        raise _PathError(f"{where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    for key in data:
        if key not in fields:
            raise _PathError(f"{_join(path, str(key))}: unknown key; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _PathError(f"{_join(path, name)}: required key missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise _PathError(f"{_join(path, e.field)}: {e.message}") from None
