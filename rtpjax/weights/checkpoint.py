"""Open any supported checkpoint (HF safetensors directory, GGUF file) and load a whole model:
config, parameters in their shardings, tokenizer. `load_model(None)` loads the embedded default."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
from jax.sharding import Mesh

from rtpjax.config import ModelConfig, read_json
from rtpjax.env import DEFAULT_MODEL_NAME, default_model_path
from rtpjax.models import llama
from rtpjax.models.params import num_bytes
from rtpjax.sharding.mesh import make_mesh
from rtpjax.tokenizer import Tokenizer
from rtpjax.weights.loader import TensorSource, load_params, resolve_dtype
from rtpjax.weights.safetensors_io import SafetensorsCheckpoint

logger = logging.getLogger("rtpjax.weights")


@dataclasses.dataclass
class Checkpoint:
    path: str
    kind: str  # "hf" | "gguf"
    hf_config: dict[str, Any]
    source: TensorSource


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if os.path.isfile(path) and path.endswith(".gguf") or _is_gguf(path):
        from rtpjax.weights.gguf_file import read_gguf

        g = read_gguf(path)
        return Checkpoint(path, "gguf", g.hf_config(), g)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path}: not found (an HF model directory needs config.json)")
        return Checkpoint(path, "hf", read_json(cfg_path), SafetensorsCheckpoint(path))
    raise ValueError(f"{path}: not a model directory or a .gguf file")


def _is_gguf(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


@dataclasses.dataclass
class LoadedModel:
    name: str  # served model name
    path: str
    config: ModelConfig  # as run (tensor-parallel adjusted)
    params: llama.Params
    tokenizer: Tokenizer
    mesh: Mesh
    dtype: Any

    @property
    def weight_bytes(self) -> int:
        return num_bytes(llama.spec(self.config, self.dtype))


def load_model(model: str | os.PathLike | None = None, *, dtype: Any = "auto",
               tensor_parallel_size: int = 1, mesh: Mesh | None = None,
               tokenizer: str | os.PathLike | None = None, progress: bool = False) -> LoadedModel:
    path = default_model_path() if model is None else os.fspath(model)
    ckpt = open_checkpoint(path)
    base = ModelConfig.from_hf(ckpt.hf_config, source=path)
    cfg = base.with_tensor_parallel(tensor_parallel_size)
    dt = resolve_dtype(dtype)
    mesh = mesh or make_mesh(tensor_parallel_size=tensor_parallel_size)
    _check_fits(cfg, dt, mesh, path)
    params = load_params(ckpt.source, cfg, dt, mesh, progress=progress)
    tok = Tokenizer.from_pretrained(tokenizer or path)
    name = DEFAULT_MODEL_NAME if model is None else os.path.basename(path.rstrip("/"))
    return LoadedModel(name, path, cfg, params, tok, mesh, dt)


def _check_fits(cfg: ModelConfig, dtype: Any, mesh: Mesh, path: str) -> None:
    """A model larger than the devices' memory gets a clear error before anything is loaded."""
    need = num_bytes(llama.spec(cfg, dtype))
    stats = mesh.devices.flat[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit is None:
        return
    tp = mesh.shape.get("tensor", 1)
    per_device = need / tp
    if per_device > 0.95 * limit:
        raise ValueError(
            f"{path}: weights need {need / 2**30:.1f} GiB ({per_device / 2**30:.1f} GiB per device "
            f"at tensor_parallel_size={tp}); each {jax.default_backend()} device has "
            f"{limit / 2**30:.1f} GiB. Use more devices (tensor_parallel_size) or a smaller dtype")
