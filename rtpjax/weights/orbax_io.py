"""Orbax checkpoints of rtpjax models: the fused parameter tree, sharded, beside its HF config.

A checkpoint directory holds:
- `params/`: the parameter tree as nested dicts (`layers/3/w_qkv`), saved by orbax-checkpoint with
  OCDBT and zarr3, in chunks of at most 64 MiB, so a process restores only the chunks its devices
  hold, on any mesh;
- `config.json` (the HF config, verbatim), the tokenizer files, and `rtpjax_checkpoint.json`
  (layout, dtype, and each HF tensor's dtype so the export to HF is bit-exact), written last: a
  directory without it is not a checkpoint.

The tree is always the checkpoint's own (KV heads not replicated). Loading onto a mesh whose tensor
axis is wider than K restores the checkpoint heads and replicates them on the devices.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rtpjax.config import ModelConfig, read_json
from rtpjax.models import llama
from rtpjax.models.params import ArrayInfo, info_leaves, is_info
from rtpjax.sharding import rules
from rtpjax.sharding.mesh import make_mesh
from rtpjax.weights.loader import recipes

logger = logging.getLogger("rtpjax.weights")

MARKER = "rtpjax_checkpoint.json"
PARAMS = "params"
LAYOUT = "rtpjax.llama.fused.v1"
CHUNK_BYTES = 64 << 20
# Files of an HF model directory that are not weights and travel with every conversion.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
TOKENIZER_DIRS = ("additional_chat_templates",)


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The checkpoint's own config: KV heads not replicated."""
    r = cfg.kv_head_replication
    if r == 1:
        return cfg
    return dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads // r, kv_head_replication=1)


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


# --- KV-head replication on the devices -----------------------------------------------------------


def _replicate(x: jax.Array, field: str, r: int) -> jax.Array:
    """A checkpoint weight → its layout with every KV head repeated r times (see llama.spec)."""
    if field == "w_o":  # [D, K0, G0, H] → [D, K0·r, G0/r, H]: the same query heads, regrouped
        D, K0, G0, H = x.shape
        return x.reshape(D, K0 * r, G0 // r, H)
    G0 = x.shape[1] - 2  # w_qkv [K0, G0+2, H, D], b_qkv [K0, G0+2, H]
    q, k, v = x[:, :G0], x[:, G0 : G0 + 1], x[:, G0 + 1 :]
    q = q.reshape(x.shape[0] * r, G0 // r, *x.shape[2:])
    k, v = jnp.repeat(k, r, axis=0), jnp.repeat(v, r, axis=0)
    return jnp.concatenate([q, k, v], axis=1)


def _unreplicate(x: np.ndarray, field: str, r: int) -> np.ndarray:
    """Inverse of _replicate, on the host (one weight at a time, when saving)."""
    if field == "w_o":
        D, K, G, H = x.shape
        return x.reshape(D, K // r, G * r, H)
    G = x.shape[1] - 2
    q = x[:, :G].reshape(x.shape[0] // r, G * r, *x.shape[2:])
    k, v = x[::r, G : G + 1], x[::r, G + 1 :]
    return np.concatenate([q, k, v], axis=1)


@functools.lru_cache(maxsize=64)
def _converter(field: str, r: int, dtype: Any, sharding: Any) -> Any:
    def convert(x: jax.Array) -> jax.Array:
        return (_replicate(x, field, r) if r > 1 else x).astype(dtype)

    return jax.jit(convert, out_shardings=sharding)


_REPLICATED_FIELDS = ("w_qkv", "b_qkv", "w_o")


# --- save -----------------------------------------------------------------------------------------


def save_orbax(
    path: str | os.PathLike,
    params: llama.Params,
    cfg: ModelConfig,
    *,
    hf_config: dict[str, Any] | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    hf_dtypes: dict[str, str] | None = None,
    overwrite: bool = False,
) -> None:
    """Save `params` (as loaded for `cfg`, any mesh) as an Orbax checkpoint at `path`.

    `hf_config`: the config.json to keep (default cfg.to_hf()); `tokenizer_from`: an HF directory
    whose tokenizer files are copied, or a GGUF file whose tokenizer is written as tokenizer.json;
    `hf_dtypes`: {HF tensor name: safetensors dtype} when the tensors had other dtypes than the
    tree's (so that the export to HF restores them)."""
    import orbax.checkpoint as ocp

    path = os.fspath(path)
    if os.path.exists(path):
        if not overwrite:
            raise FileExistsError(
                f"{path}: exists; pass overwrite=True (--overwrite) to replace it"
            )
        shutil.rmtree(path)
    r = cfg.kv_head_replication
    base = base_config(cfg)
    tree: dict[str, Any] = {}
    for (p, _), x in zip(info_leaves(llama.spec(cfg)), jax.tree.leaves(params), strict=True):
        field = p.rsplit(".", 1)[-1]
        if r > 1 and field in _REPLICATED_FIELDS:
            x = _unreplicate(np.asarray(x), field, r)
        tree[p] = x
    tmp = f"{path}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), _nest(tree))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True))
    checkpointer.save(
        os.path.join(tmp, PARAMS), args=ocp.args.PyTreeSave(_nest(tree), save_args=save_args)
    )
    config = dict(hf_config) if hf_config is not None else base.to_hf()
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    if tokenizer_from is not None:
        write_tokenizer_files(tokenizer_from, tmp)
    dtype = _dtype_name(next(iter(tree.values())).dtype)
    marker = {
        "format": "rtpjax-orbax",
        "layout": LAYOUT,
        "dtype": dtype,
        "hf_dtypes": hf_dtypes or {},
    }
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)
    os.replace(tmp, path)


def write_tokenizer_files(source: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy an HF directory's tokenizer files into `dst`, or write those of a GGUF file's tokenizer
    (tokenizer.json, tokenizer_config.json, generation_config.json); a GGUF without a usable
    vocabulary gets a warning and none. Returns the names written."""
    source, dst = os.fspath(source), os.fspath(dst)
    os.makedirs(dst, exist_ok=True)
    if os.path.isdir(source):
        done = []
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(dst, name))
                done.append(name)
        for name in TOKENIZER_DIRS:
            if os.path.isdir(os.path.join(source, name)):
                shutil.copytree(
                    os.path.join(source, name), os.path.join(dst, name), dirs_exist_ok=True
                )
                done.append(name)
        return done
    from rtpjax.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_gguf_file(source)
    except ValueError as e:  # weights without a usable vocabulary still convert
        logger.warning("no tokenizer files written: %s", e)
        return []
    tok.backend.save(os.path.join(dst, "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        **{k: v for k, v in tok.special_tokens.items() if v is not None},
    }
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    with open(os.path.join(dst, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    generation = {"eos_token_id": sorted(tok.eos_token_ids)}
    if tok.bos_token_id is not None:
        generation["bos_token_id"] = tok.bos_token_id
    with open(os.path.join(dst, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


# --- open and restore -----------------------------------------------------------------------------


class OrbaxCheckpoint:
    """An rtpjax Orbax checkpoint: its HF config, and its weights as HF-named host tensors (for
    export; `load_orbax_params` restores straight onto devices)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        marker = read_json(os.path.join(self.path, MARKER))
        if marker.get("layout") != LAYOUT:
            raise ValueError(
                f"{self.path}: layout {marker.get('layout')!r} is not supported; "
                f"this rtpjax reads {LAYOUT!r}"
            )
        self.marker = marker
        self.hf_config = read_json(os.path.join(self.path, "config.json"))
        self.config = ModelConfig.from_hf(self.hf_config, source=self.path)
        self.params_dir = os.path.join(self.path, PARAMS)
        self._metadata: dict[str, Any] | None = None
        self._cache: tuple[str, dict[str, np.ndarray]] | None = None
        self._recipes = {r.path: r for r in recipes(self.config, llama.spec(self.config))}
        self._where = {
            pc.name: (r.path, i) for r in self._recipes.values() for i, pc in enumerate(r.pieces)
        }

    def metadata(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{weight path: (shape, dtype)} as stored."""
        if self._metadata is None:
            import orbax.checkpoint as ocp

            try:
                meta = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(self.params_dir)
                tree = meta.item_metadata.tree
            except Exception as e:
                raise _unreadable(self.params_dir, e) from None
            self._metadata = {
                p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in _flatten(dict(tree)).items()
            }
            spec = dict(info_leaves(llama.spec(self.config)))
            if set(spec) != set(self._metadata):
                missing = sorted(set(spec) - set(self._metadata))[:3]
                extra = sorted(set(self._metadata) - set(spec))[:3]
                raise ValueError(
                    f"{self.params_dir}: weights do not match config.json "
                    f"(missing {missing}, unexpected {extra})"
                )
            for p, info in spec.items():
                if self._metadata[p][0] != info.shape:
                    raise ValueError(
                        f"{self.params_dir}: {p} has shape {self._metadata[p][0]}, "
                        f"config.json implies {info.shape}"
                    )
        return self._metadata

    def restore(
        self, paths: list[str] | None = None, *, targets: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Weights by path: as numpy arrays, or as jax.Arrays for ShapeDtypeStruct `targets`."""
        import orbax.checkpoint as ocp

        meta = self.metadata()
        if targets is not None:
            item = _nest(targets)
            restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        else:
            paths = list(meta) if paths is None else paths
            item = _nest({p: np.zeros((), meta[p][1]) for p in paths})
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        try:
            out = checkpointer.restore(
                self.params_dir,
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                ),
            )
        except Exception as e:
            raise _unreadable(self.params_dir, e) from None
        return _flatten(out)

    # TensorSource, for the export to HF safetensors.
    def tensor_names(self) -> list[str]:
        return list(self._where)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        path, i = self._where[name]
        return self._recipes[path].pieces[i].hf_shape

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"{self.path}: tensor {name!r} not in checkpoint")
        path, i = self._where[name]
        group = path.rsplit(".", 1)[0] if path.startswith("layers.") else path
        if self._cache is None or self._cache[0] != group:
            paths = [p for p in self.metadata() if p == group or p.startswith(group + ".")]
            self._cache = (group, self.restore(paths))
        x = self._cache[1][path]
        rec = self._recipes[path]
        bounds = np.cumsum([0] + [pc.shape[rec.axis] for pc in rec.pieces])
        index = [slice(None)] * x.ndim
        index[rec.axis] = slice(int(bounds[i]), int(bounds[i + 1]))
        piece = rec.pieces[i]
        out = x[tuple(index)].reshape(piece.hf_shape)
        want = self.marker.get("hf_dtypes", {}).get(name)
        if want is not None:
            from rtpjax.weights.safetensors_io import DTYPES

            out = out.astype(DTYPES[want])
        return np.ascontiguousarray(out)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, array) for every tensor, one layer in memory at a time."""
        for name in self.tensor_names():
            yield name, self.tensor(name)


def _unreadable(path: str, e: Exception) -> ValueError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ValueError(
        f"{path}: unreadable Orbax checkpoint (truncated or corrupt?): "
        f"{type(e).__name__}: {first[:300]}"
    )


def _fit(info: ArrayInfo, mesh: Mesh) -> NamedSharding:
    """The declared sharding, with any axis that does not split evenly left whole."""
    spec = rules.partition_spec(info.axes, mesh)
    fitted = [
        None if ax is None or n % mesh.shape[ax] else ax
        for n, ax in zip(info.shape, tuple(spec) + (None,) * (len(info.shape) - len(spec)))
    ]
    return NamedSharding(mesh, PartitionSpec(*fitted))


def load_orbax_params(
    ckpt: OrbaxCheckpoint | str | os.PathLike,
    cfg: ModelConfig,
    dtype: Any = jnp.bfloat16,
    mesh: Mesh | None = None,
) -> llama.Params:
    """Restore onto `mesh` (any shape: each process reads only its chunks), then replicate KV heads
    and convert the dtype on the devices: bit-identical to loading the HF checkpoint it came
    from."""
    if not isinstance(ckpt, OrbaxCheckpoint):
        ckpt = OrbaxCheckpoint(ckpt)
    mesh = mesh or make_mesh(1, 1)
    r = cfg.kv_head_replication
    if base_config(cfg) != dataclasses.replace(ckpt.config, kv_head_replication=1):
        raise ValueError(f"{ckpt.path}: the requested config differs from the checkpoint's")
    spec = llama.spec(cfg, dtype)
    rules.check_divisible(spec, mesh)
    target = rules.shardings(spec, mesh)
    stored = ckpt.metadata()
    base_infos = dict(info_leaves(llama.spec(base_config(cfg), dtype)))
    targets = {
        p: jax.ShapeDtypeStruct(shape, dt, sharding=_fit(base_infos[p], mesh))
        for p, (shape, dt) in stored.items()
    }
    restored = ckpt.restore(targets=targets)
    leaves = []
    for (p, info), sharding in zip(
        info_leaves(spec),
        jax.tree.leaves(target, is_leaf=lambda x: isinstance(x, NamedSharding)),
        strict=True,
    ):
        x = restored.pop(p)
        field = p.rsplit(".", 1)[-1]
        rr = r if field in _REPLICATED_FIELDS else 1
        if rr > 1 or x.dtype != info.dtype or x.sharding != sharding:
            x = _converter(field, rr, jnp.dtype(info.dtype), sharding)(x)
        leaves.append(x)
    _, treedef = jax.tree.flatten(spec, is_leaf=is_info)
    params = treedef.unflatten(leaves)
    jax.block_until_ready(leaves)
    return params
