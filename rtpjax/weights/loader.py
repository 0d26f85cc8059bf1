"""Checkpoints → parameter trees placed in their target shardings: the simple loader.

Every source (HF safetensors directory, GGUF file) is first seen as HF-named, HF-layout tensors;
this module maps those names onto the declared parameter tree (models/llama.spec), fuses q/k/v and
gate/up, replicates KV heads when tensor parallelism is wider than K, checks every shape against the
declaration and puts each array straight into its NamedSharding. It builds every fused weight on the
host; `fast_loader` is the fast path (file-order reads, fused on the devices) and must give
bit-identical parameters (tests/weights/test_loading.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding

from rtpjax.config import ModelConfig
from rtpjax.models import llama
from rtpjax.models.params import ArrayInfo, info_leaves
from rtpjax.sharding import rules
from rtpjax.sharding.mesh import make_mesh

DTYPES = {
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float32": jnp.float32,
    "f32": jnp.float32,
    "float16": jnp.float16,
    "f16": jnp.float16,
}


def resolve_dtype(dtype: Any) -> Any:
    """'auto' is float32 on CPU (XLA's CPU bf16 matmuls are slow) and bfloat16 on accelerators."""
    if dtype is None or dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(
                f"dtype={dtype!r} is not supported; allowed: auto, {', '.join(DTYPES)}"
            )
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


class TensorSource(Protocol):
    path: str

    def tensor_names(self) -> list[str]: ...

    def tensor(self, name: str) -> np.ndarray: ...


# Tensors some checkpoints carry that the model derives itself.
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq$)")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.bias",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
}


def check_names(source: TensorSource, cfg: ModelConfig) -> None:
    """Unknown tensors mean an architecture feature we would silently drop: refuse them."""
    for name in source.tensor_names():
        if _IGNORED.match(name) or name in (
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
        ):
            continue
        m = _LAYER.match(name)
        if m and int(m.group(1)) < cfg.num_layers and m.group(2) in _LAYER_NAMES:
            continue
        raise ValueError(
            f"{source.path}: unexpected tensor {name!r} for model_type="
            f"{cfg.model_type!r} with {cfg.num_layers} layers"
        )


class _Fetch:
    def __init__(self, source: TensorSource):
        self.source = source
        self.names = set(source.tensor_names())

    def __call__(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self.names:
            raise ValueError(f"{self.source.path}: missing tensor {name!r}")
        a = self.source.tensor(name)
        if shape is not None and tuple(a.shape) != shape:
            raise ValueError(
                f"{self.source.path}: tensor {name!r} has shape {tuple(a.shape)}, "
                f"the config implies {shape}"
            )
        return a


def hf_layer_tensors(fetch: _Fetch, cfg: ModelConfig, i: int) -> dict[str, np.ndarray | None]:
    """The layer's fused host arrays, keyed like llama.Layer fields, in checkpoint dtype."""
    D, F, H = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    r = cfg.kv_head_replication
    K0 = cfg.num_kv_heads // r  # checkpoint KV heads
    K, G = cfg.num_kv_heads, cfg.q_per_kv
    p = f"model.layers.{i}."
    q = fetch(p + "self_attn.q_proj.weight", (K * G * H, D)).reshape(K, G, H, D)
    k = fetch(p + "self_attn.k_proj.weight", (K0 * H, D)).reshape(K0, 1, H, D)
    v = fetch(p + "self_attn.v_proj.weight", (K0 * H, D)).reshape(K0, 1, H, D)
    # KV head j of the replicated model is checkpoint head j // r (see with_tensor_parallel).
    k, v = np.repeat(k, r, axis=0), np.repeat(v, r, axis=0)
    out: dict[str, np.ndarray | None] = {
        "attn_norm": fetch(p + "input_layernorm.weight", (D,)),
        "w_qkv": np.concatenate([q, k, v], axis=1),
        "b_qkv": None,
        "q_norm": None,
        "k_norm": None,
        "b_o": None,
        "w_o": fetch(p + "self_attn.o_proj.weight", (D, K * G * H)).reshape(D, K, G, H),
        "mlp_norm": fetch(p + "post_attention_layernorm.weight", (D,)),
        "w_gate_up": np.stack(
            [fetch(p + "mlp.gate_proj.weight", (F, D)), fetch(p + "mlp.up_proj.weight", (F, D))]
        ),
        "w_down": fetch(p + "mlp.down_proj.weight", (D, F)),
    }
    if cfg.qkv_bias:
        bq = fetch(p + "self_attn.q_proj.bias", (K * G * H,)).reshape(K, G, H)
        bk = np.repeat(fetch(p + "self_attn.k_proj.bias", (K0 * H,)).reshape(K0, 1, H), r, axis=0)
        bv = np.repeat(fetch(p + "self_attn.v_proj.bias", (K0 * H,)).reshape(K0, 1, H), r, axis=0)
        out["b_qkv"] = np.concatenate([bq, bk, bv], axis=1)
    if cfg.o_bias:
        out["b_o"] = fetch(p + "self_attn.o_proj.bias", (D,))
    if cfg.qk_norm:
        out["q_norm"] = fetch(p + "self_attn.q_norm.weight", (H,))
        out["k_norm"] = fetch(p + "self_attn.k_norm.weight", (H,))
    return out


def _place(a: np.ndarray, info: ArrayInfo, sharding: Any, where: str) -> jax.Array:
    if tuple(a.shape) != info.shape:
        raise ValueError(f"{where}: shape {tuple(a.shape)} differs from the declared {info.shape}")
    target = np.dtype(ml_dtypes.bfloat16) if info.dtype == jnp.bfloat16 else np.dtype(info.dtype)
    host = a if a.dtype == target else a.astype(target)
    return jax.device_put(host, sharding)


def load_params(
    source: TensorSource,
    cfg: ModelConfig,
    dtype: Any = jnp.bfloat16,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> llama.Params:
    """Read every weight of `cfg` from `source` into device arrays sharded over `mesh`."""
    check_names(source, cfg)
    mesh = mesh or make_mesh(1, 1)
    spec = llama.spec(cfg, dtype)
    rules.check_divisible(spec, mesh)
    shards = rules.shardings(spec, mesh)
    fetch = _Fetch(source)
    bar = _progress(cfg.num_layers + 1, source.path) if progress else None

    layers = []
    for i, (lspec, lshard) in enumerate(zip(spec.layers, shards.layers)):
        host = hf_layer_tensors(fetch, cfg, i)
        fields = {}
        for f in dataclasses.fields(llama.Layer):
            a, info = host[f.name], getattr(lspec, f.name)
            fields[f.name] = (
                None
                if info is None
                else _place(a, info, getattr(lshard, f.name), f"{source.path}: layer {i} {f.name}")
            )
        layers.append(llama.Layer(**fields))
        if bar:
            bar.update(1)
    D, V = cfg.hidden_size, cfg.vocab_size
    embed = _place(
        fetch("model.embed_tokens.weight", (V, D)),
        spec.embed,
        shards.embed,
        f"{source.path}: embed",
    )
    lm_head = None
    if not cfg.tie_word_embeddings:
        lm_head = _place(
            fetch("lm_head.weight", (V, D)), spec.lm_head, shards.lm_head, f"{source.path}: lm_head"
        )
    final_norm = _place(
        fetch("model.norm.weight", (D,)),
        spec.final_norm,
        shards.final_norm,
        f"{source.path}: final_norm",
    )
    if bar:
        bar.update(1)
        bar.close()
    return llama.Params(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


def _progress(total: int, path: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"loading {os.path.basename(path.rstrip('/'))}", unit="layer")


# --- recipes: which HF tensors make each declared weight ------------------------------------------


@dataclasses.dataclass(frozen=True)
class Piece:
    """One HF tensor as (part of) a model weight: the tensor of `hf_shape` reshaped to `src_shape`,
    then axis 0 repeated `repeat` times element-wise (KV heads under tensor parallelism wider than
    the checkpoint's K)."""

    name: str
    hf_shape: tuple[int, ...]
    src_shape: tuple[int, ...]
    repeat: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.src_shape[0] * self.repeat, *self.src_shape[1:])

    @property
    def split(self) -> int:
        """The axis along which the tensor's bytes are cut: the first of extent > 1. Every axis
        before it has extent 1, so a range along it is one contiguous byte range."""
        return next((i for i, n in enumerate(self.src_shape) if n > 1), 0)


@dataclasses.dataclass(frozen=True)
class Recipe:
    path: str  # dotted path in the parameter tree, e.g. "layers.3.w_qkv"
    info: ArrayInfo
    sharding: Any  # NamedSharding
    pieces: tuple[Piece, ...]
    axis: int = 0  # concatenation axis of the pieces


def recipes(
    cfg: ModelConfig, spec: llama.Params, shardings: llama.Params | None = None
) -> list[Recipe]:
    """Every declared weight of the Llama family as HF tensors, in parameter-tree order."""
    D, F, V, H = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    K, G, r = cfg.num_kv_heads, cfg.q_per_kv, cfg.kv_head_replication
    K0, NH = K // r, K * G * H  # checkpoint KV heads; query rows

    def one(name: str, hf_shape: tuple[int, ...], shape: tuple[int, ...] | None = None):
        return (Piece(name, hf_shape, shape or hf_shape),), 0

    table: dict[str, tuple[tuple[Piece, ...], int]] = {
        "embed": one("model.embed_tokens.weight", (V, D)),
        "final_norm": one("model.norm.weight", (D,)),
        "lm_head": one("lm_head.weight", (V, D)),
    }
    for i in range(cfg.num_layers):
        p, L = f"model.layers.{i}.", f"layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        table |= {
            L + "attn_norm": one(p + "input_layernorm.weight", (D,)),
            L + "q_norm": one(a + "q_norm.weight", (H,)),
            L + "k_norm": one(a + "k_norm.weight", (H,)),
            L + "w_o": one(a + "o_proj.weight", (D, NH), (D, K, G, H)),
            L + "b_o": one(a + "o_proj.bias", (D,)),
            L + "mlp_norm": one(p + "post_attention_layernorm.weight", (D,)),
            L + "w_down": one(m + "down_proj.weight", (D, F)),
            L + "w_qkv": (
                (
                    Piece(a + "q_proj.weight", (NH, D), (K, G, H, D)),
                    Piece(a + "k_proj.weight", (K0 * H, D), (K0, 1, H, D), r),
                    Piece(a + "v_proj.weight", (K0 * H, D), (K0, 1, H, D), r),
                ),
                1,
            ),
            L + "b_qkv": (
                (
                    Piece(a + "q_proj.bias", (NH,), (K, G, H)),
                    Piece(a + "k_proj.bias", (K0 * H,), (K0, 1, H), r),
                    Piece(a + "v_proj.bias", (K0 * H,), (K0, 1, H), r),
                ),
                1,
            ),
            L + "w_gate_up": (
                (
                    Piece(m + "gate_proj.weight", (F, D), (1, F, D)),
                    Piece(m + "up_proj.weight", (F, D), (1, F, D)),
                ),
                0,
            ),
        }
    leaves = info_leaves(spec)
    shard_leaves = (
        [None] * len(leaves)
        if shardings is None
        else jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    )
    out = []
    for (path, info), sharding in zip(leaves, shard_leaves, strict=True):
        if path not in table:
            raise ValueError(f"declared weight {path!r} has no loading recipe")
        pieces, axis = table[path]
        if (
            len(pieces) > 1
            and sharding is not None
            and sharding.spec[axis : axis + 1] not in ((), (None,))
        ):
            raise ValueError(
                f"{path}: its pieces are concatenated along axis {axis}, which the "
                f"sharding rules split ({sharding.spec}); that axis must stay whole"
            )
        out.append(Recipe(path, info, sharding, pieces, axis))
    return out


def source_shape(source: TensorSource, name: str) -> tuple[int, ...]:
    if hasattr(source, "tensor_shape"):
        return tuple(source.tensor_shape(name))
    return tuple(source.tensor(name).shape)


def check_shapes(source: TensorSource, plan: Sequence[Recipe]) -> None:
    """Every piece present with the shape the config implies, and the pieces make the weight."""
    names = set(source.tensor_names())
    for rec in plan:
        for piece in rec.pieces:
            if piece.name not in names:
                raise ValueError(f"{source.path}: missing tensor {piece.name!r}")
            got = source_shape(source, piece.name)
            if got != piece.hf_shape:
                raise ValueError(
                    f"{source.path}: tensor {piece.name!r} has shape {got}, the config implies "
                    f"{piece.hf_shape}"
                )
        fused = list(rec.pieces[0].shape)
        fused[rec.axis] = sum(p.shape[rec.axis] for p in rec.pieces)
        if tuple(fused) != rec.info.shape:
            raise ValueError(
                f"{rec.path}: its pieces make {tuple(fused)}, declared {rec.info.shape}"
            )
