"""Open any supported checkpoint (HF safetensors directory, GGUF file, rtpjax Orbax directory) and
load a whole model: config, parameters in their shardings, tokenizer. `load_model(None)` loads the
embedded default.

Every source is validated before anything reaches a device (headers, sizes, names, shapes), and a
load either returns every weight or raises: no half-loaded model is ever returned."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rtpjax import env
from rtpjax.config import ModelConfig, read_json
from rtpjax.env import DEFAULT_MODEL_NAME, default_model_path
from rtpjax.models import llama
from rtpjax.models.params import num_bytes
from rtpjax.sharding.mesh import make_mesh
from rtpjax.tokenizer import Tokenizer
from rtpjax.weights.fast_loader import LoadOptions, LoadStats, load_params_fast
from rtpjax.weights.loader import TensorSource, load_params, resolve_dtype
from rtpjax.weights.orbax_io import (
    OrbaxCheckpoint,
    is_orbax_checkpoint,
    load_orbax_params,
    save_orbax,
    write_tokenizer_files,
)
from rtpjax.weights.safetensors_io import DTYPE_NAMES, DTYPES, SafetensorsCheckpoint, save_sharded

LOADERS = ("fast", "simple")

logger = logging.getLogger("rtpjax.weights")


@dataclasses.dataclass
class Checkpoint:
    path: str
    kind: str  # "hf" | "gguf" | "orbax"
    hf_config: dict[str, Any]
    source: TensorSource


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if (os.path.isfile(path) and path.endswith(".gguf")) or _is_gguf(path):
        from rtpjax.weights.gguf_file import read_gguf

        g = read_gguf(path)
        return Checkpoint(path, "gguf", g.hf_config(), g)
    if os.path.isdir(path) and is_orbax_checkpoint(path):
        ckpt = OrbaxCheckpoint(path)
        return Checkpoint(path, "orbax", ckpt.hf_config, ckpt)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(
                f"{cfg_path}: not found (an HF model directory needs config.json)"
            )
        return Checkpoint(path, "hf", read_json(cfg_path), SafetensorsCheckpoint(path))
    raise ValueError(f"{path}: not a model directory (HF or rtpjax Orbax) or a .gguf file")


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
    load_stats: LoadStats | None = None  # the fast loader's figures, when it loaded the weights

    @property
    def weight_bytes(self) -> int:
        return num_bytes(llama.spec(self.config, self.dtype))


def load_model(
    model: str | os.PathLike | None = None,
    *,
    dtype: Any = "auto",
    tensor_parallel_size: int = 1,
    mesh: Mesh | None = None,
    tokenizer: str | os.PathLike | None = None,
    progress: bool = False,
    loader: str = "fast",
    load_options: LoadOptions | None = None,
) -> LoadedModel:
    """Config, weights on `mesh` (default: tensor_parallel_size devices) and tokenizer of `model`:
    an HF directory, a .gguf file or an rtpjax Orbax directory (None: the embedded default).
    `loader`: "fast" (file-order reads overlapped with transfers, fused on the devices) or
    "simple" (tensor by tensor through host numpy); both give bit-identical weights."""
    if loader not in LOADERS:
        raise ValueError(f"loader={loader!r} is not supported; allowed: {', '.join(LOADERS)}")
    if isinstance(model, str) and model.startswith(RANDOM_PREFIX):
        return random_model(
            model,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            mesh=mesh,
            tokenizer=tokenizer,
        )
    path = default_model_path() if model is None else os.fspath(model)
    ckpt = open_checkpoint(path)
    base = ModelConfig.from_hf(ckpt.hf_config, source=path)
    cfg = base.with_tensor_parallel(tensor_parallel_size)
    dt = resolve_dtype(dtype)
    mesh = mesh or make_mesh(tensor_parallel_size=tensor_parallel_size)
    _check_fits(cfg, dt, mesh, path)
    stats = None
    if ckpt.kind == "orbax":
        params = load_orbax_params(ckpt.source, cfg, dt, mesh)
    elif loader == "fast":
        params, stats = load_params_fast(
            ckpt.source, cfg, dt, mesh, progress=progress, options=load_options
        )
    else:
        params = load_params(ckpt.source, cfg, dt, mesh, progress=progress)
    tok = Tokenizer.from_pretrained(tokenizer or path)
    name = DEFAULT_MODEL_NAME if model is None else os.path.basename(path.rstrip("/"))
    return LoadedModel(name, path, cfg, params, tok, mesh, dt, stats)


RANDOM_PREFIX = "random:"


def random_model(
    model: str,
    *,
    dtype: Any = "auto",
    tensor_parallel_size: int = 1,
    mesh: Mesh | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> LoadedModel:
    """`random:<preset>` (e.g. random:llama3-8b): the preset's shapes with random weights made on
    the devices, for benchmarks. The tokenizer is `tokenizer` or the embedded default model's, and
    the vocabulary and end ids are that tokenizer's so every sampled id decodes (the model is
    then the preset's body with a different embedding size)."""
    from rtpjax.models.presets import PRESETS, preset, random_params

    name = model[len(RANDOM_PREFIX) :]
    if name not in PRESETS:
        raise ValueError(f"model={model!r}: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    tok = Tokenizer.from_pretrained(tokenizer or default_model_path())
    base = preset(name, vocab_size=tok.vocab_size, eos_token_ids=tuple(sorted(tok.eos_token_ids)))
    cfg = base.with_tensor_parallel(tensor_parallel_size)
    dt = resolve_dtype(dtype)
    mesh = mesh or make_mesh(tensor_parallel_size=tensor_parallel_size)
    _check_fits(cfg, dt, mesh, model)
    return LoadedModel(name, model, cfg, random_params(cfg, dt, mesh), tok, mesh, dt)


def _check_fits(cfg: ModelConfig, dtype: Any, mesh: Mesh, path: str) -> None:
    """A model larger than the devices' memory gets a clear error before anything is loaded."""
    need = num_bytes(llama.spec(cfg, dtype))
    memory = env.device_memory(mesh.devices.flat[0])
    if memory is None:
        return
    limit = memory[0]
    tp = mesh.shape.get("tensor", 1)
    per_device = need / tp
    if per_device > 0.95 * limit:
        raise ValueError(
            f"{path}: weights need {need / 2**30:.1f} GiB ({per_device / 2**30:.1f} GiB per device "
            f"at tensor_parallel_size={tp}); each {jax.default_backend()} device has "
            f"{limit / 2**30:.1f} GiB. Use more devices (tensor_parallel_size) or a smaller dtype"
        )


# --- conversion -----------------------------------------------------------------------------------

FORMATS = ("orbax", "hf")
CONVERT_DTYPES = ("float32", "bfloat16", "float16")


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    max_shard_bytes: int = 5 * 10**9,
) -> str:
    """Convert `src` (HF directory, GGUF file or rtpjax Orbax directory) to `to` ("orbax" or "hf")
    at `dst`, the tokenizer files carried along. Without `dtype` every tensor keeps its values and
    dtype exactly (GGUF: its float32 dequantisation). Written beside `dst`, then renamed into
    place: an interrupted conversion leaves no checkpoint behind. Returns `dst`."""
    if to not in FORMATS:
        raise ValueError(f"to={to!r} is not supported; allowed: {', '.join(FORMATS)}")
    if dtype is not None and dtype not in CONVERT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(CONVERT_DTYPES)}")
    dst = os.fspath(dst).rstrip("/")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst}: exists; pass overwrite=True (--overwrite) to replace it")
    ckpt = open_checkpoint(src)
    if ckpt.kind == to == "orbax":  # (HF → HF re-shards, or changes the dtype)
        raise ValueError(f"{ckpt.path}: already an orbax checkpoint")
    tmp = f"{dst}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if to == "orbax":
            _to_orbax(ckpt, tmp, dtype, progress)
        else:
            _to_hf(ckpt, tmp, dtype, progress, max_shard_bytes)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _to_orbax(ckpt: Checkpoint, out: str, dtype: str | None, progress: bool) -> None:
    cfg = ModelConfig.from_hf(ckpt.hf_config, source=ckpt.path)
    names = ckpt.source.tensor_names()
    if isinstance(ckpt.source, SafetensorsCheckpoint):
        stored = {n: ckpt.source.entry(n).dtype for n in names}
    else:  # GGUF: its float32 dequantisation
        stored = {n: np.dtype(np.float32) for n in names}
    hf_dtypes: dict[str, str] = {}
    if dtype is not None:
        tree_dtype = np.dtype(jnp.dtype(dtype))
    else:
        # One dtype for the tree: the tensors' own, or float32 (which holds every narrower float
        # exactly) with each tensor's dtype recorded so the export restores it.
        kinds = set(stored.values())
        tree_dtype = kinds.pop() if len(kinds) == 1 else np.dtype(np.float32)
        if tree_dtype.itemsize > 4:
            raise ValueError(f"{ckpt.path}: {tree_dtype} tensors; convert with dtype='float32'")
        hf_dtypes = {n: DTYPE_NAMES[d] for n, d in stored.items() if d != tree_dtype}
    params, _ = load_params_fast(ckpt.source, cfg, tree_dtype, make_mesh(1, 1), progress=progress)
    save_orbax(
        out, params, cfg, hf_config=ckpt.hf_config, tokenizer_from=ckpt.path, hf_dtypes=hf_dtypes
    )


def _to_hf(
    ckpt: Checkpoint, out: str, dtype: str | None, progress: bool, max_shard_bytes: int
) -> None:
    source = ckpt.source
    tensors = (
        source.tensors()
        if hasattr(source, "tensors")
        else ((n, source.tensor(n)) for n in source.tensor_names())
    )
    if dtype is not None:
        cast = DTYPES[DTYPE_NAMES[np.dtype(jnp.dtype(dtype))]]
        tensors = ((n, a.astype(cast)) for n, a in tensors)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        name = os.path.basename(out.split(".partial-")[0])
        bar = tqdm(desc=f"writing {name}", unit="B", unit_scale=True, unit_divisor=1000)
    try:
        save_sharded(
            tensors,
            out,
            max_shard_bytes,
            {"format": "pt"},
            on_tensor=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    config = dict(ckpt.hf_config)
    if dtype is not None:
        config["torch_dtype"] = dtype
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    write_tokenizer_files(ckpt.path, out)
