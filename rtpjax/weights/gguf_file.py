"""GGUF checkpoints seen as an HF checkpoint: a config.json-shaped dict and HF-named float tensors.

llama.cpp stores a model as one GGUF file: metadata keys (`llama.embedding_length`, …), tensors
named `blk.N.attn_q.weight` in ggml order (shapes reversed), many quantised in blocks.
`read_gguf` turns that into exactly what an HF safetensors directory would give, so the weight
loader and the model code treat both sources alike:

- names: `blk.0.attn_q.weight` → `model.layers.0.self_attn.q_proj.weight` (table below);
- layout: ggml's [in, out] shape order read as HF's [out, in] (numpy order is already reversed);
- values: dequantised to float32 at load (gguf.quants does the block formats);
- rotary layout: llama.cpp's converter interleaves the rotary halves of q_proj/k_proj rows for the
  llama architecture (its rope pairs neighbours, HF's pairs the two halves); that is undone here.
  qwen2/qwen3 use NEOX-style rope in llama.cpp and are stored unpermuted.

Supported: `general.architecture` llama (also Llama-2/3, Mistral), qwen2, qwen3; tensor types F32,
F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K. Anything else is a one-line ValueError naming the file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as GGMLType

# general.architecture → (HF model_type, HF architectures[0])
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
SUPPORTED_TYPES: frozenset[GGMLType] = frozenset(
    {
        GGMLType.F32,
        GGMLType.F16,
        GGMLType.BF16,
        GGMLType.Q8_0,
        GGMLType.Q4_0,
        GGMLType.Q4_1,
        GGMLType.Q4_K,
        GGMLType.Q6_K,
    }
)
_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # llama3-style rope scaling, precomputed by llama.cpp


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor name, or None when it has none (e.g. rope_freqs.weight)."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        hf_part = _BLOCK_NAMES.get(part)
        return None if hf_part is None else f"model.layers.{layer}.{hf_part}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if kind in ("weight", "bias") and base in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[base]}.{kind}"
    return None


def unpermute_llama_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, interleaved rotary pairs → HF's two halves.

    `w` is f32[n_head·H, …] (a weight [rows, D] or a bias [rows]); returns the same shape.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows} rows into {n_head} heads of an even head_dim")
    half = rows // n_head // 2
    # [n_head, H/2, 2, …] (pairs) → [n_head, 2, H/2, …] (halves)
    return np.ascontiguousarray(
        w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def llama3_rope_freq_factors(scaling: dict, head_dim: int, rope_theta: float) -> np.ndarray:
    """The divisors llama3 rope scaling applies to each rotary frequency: f64[head_dim / 2]."""
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor, old_ctx = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (old_ctx / wavelen - low) / (high - low)
    divisor = 1.0 / ((1.0 - smooth) / factor + smooth)
    divisor = np.where(wavelen < old_ctx / high, 1.0, divisor)
    return np.where(wavelen > old_ctx / low, factor, divisor)


def fit_llama3_rope_scaling(freq_factors: np.ndarray, head_dim: int, rope_theta: float) -> dict:
    """Recover HF's llama3 rope_scaling from llama.cpp's rope_freqs tensor, or raise ValueError.

    In the smoothing band 1/factor_i = (1 − s_i)/factor + s_i with s_i = a/wavelen_i + b, where
    a = old_ctx/(high − low) and b = −low/(high − low). Only a and b (and `factor`) are observable,
    and they fix both band edges, so choosing low_freq_factor = 1 gives exactly the same factors.
    The fit is accepted only if the parameters reproduce every stored factor (rtol 1e-5).
    """
    ff = np.asarray(freq_factors, dtype=np.float64)  # f64[H/2]
    if ff.shape != (head_dim // 2,):
        raise ValueError(f"{_ROPE_FREQS} has shape {ff.shape}, expected ({head_dim // 2},)")
    factor = float(ff.max())
    wavelen = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    unscaled, full = np.isclose(ff, 1.0, rtol=1e-5), np.isclose(ff, factor, rtol=1e-5)
    band = ~(unscaled | full)
    if factor <= 1.0 or band.sum() < 2 or not unscaled.any() or not full.any():
        raise ValueError(f"{_ROPE_FREQS} does not look like llama3 rope scaling")
    s = (1.0 / ff[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
    a, b = np.polyfit(1.0 / wavelen[band], s, 1)
    if a <= 0 or b >= 0:
        raise ValueError(f"{_ROPE_FREQS} does not look like llama3 rope scaling")
    width = -1.0 / b  # high − low with low = 1
    raw = {
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": float(1.0 + width),
        "original_max_position_embeddings": float(a * width),
    }
    snapped = {
        "factor": round(factor, 4),
        "low_freq_factor": 1.0,
        "high_freq_factor": round(float(1.0 + width), 4),
        "original_max_position_embeddings": round(float(a * width)),
    }
    for params in (snapped, raw):
        if np.allclose(
            llama3_rope_freq_factors(params, head_dim, rope_theta), ff, rtol=1e-5, atol=0
        ):
            return {"rope_type": "llama3", **params}
    raise ValueError(f"{_ROPE_FREQS} is not reproduced by any llama3 rope scaling parameters")


def _plain(field: Any) -> Any:
    """A GGUF metadata field as a plain Python value (str, int, float, bool or a list of them)."""
    main = field.types[0] if field.types else None
    if main == gguf.GGUFValueType.ARRAY and field.types[-1] == gguf.GGUFValueType.STRING:
        # surrogateescape: a token that is not valid UTF-8 survives as a reversible str.
        return [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
    if main == gguf.GGUFValueType.ARRAY:
        return [v for i in field.data for v in field.parts[i].tolist()]
    if main == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", "surrogateescape")
    return field.parts[-1].tolist()[0]


class GGUFCheckpoint:
    """One GGUF file, read lazily: metadata parsed at open, tensors dequantised on request."""

    def __init__(self, path: str, reader: gguf.GGUFReader) -> None:
        self.path = path
        self._reader = reader
        self.metadata: dict[str, Any] = {
            key: _plain(field)
            for key, field in reader.fields.items()
            if not key.startswith("GGUF.")
        }
        self.architecture: str = self._require("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{path}: general.architecture={self.architecture!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self._tensors: dict[str, Any] = {}  # HF name → gguf ReaderTensor, in file order
        self._rope_freqs: np.ndarray | None = (
            None  # f32[H/2] when the file scales rope llama3-style
        )
        for t in reader.tensors:
            if t.tensor_type not in SUPPORTED_TYPES:
                raise ValueError(
                    f"{path}: tensor {t.name!r} has type {t.tensor_type.name}; supported: "
                    f"{', '.join(sorted(q.name for q in SUPPORTED_TYPES))}"
                )
            if t.name == _ROPE_FREQS:
                self._rope_freqs = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
                continue
            hf_name = hf_tensor_name(t.name)
            if hf_name is None:
                raise ValueError(
                    f"{path}: tensor {t.name!r} has no HF equivalent for architecture "
                    f"{self.architecture!r}"
                )
            self._tensors[hf_name] = t

    def _key(self, suffix: str) -> str:
        return f"{self.architecture}.{suffix}"

    def _require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ValueError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return self.metadata[key]

    def _uniform_int(self, key: str) -> int:
        """An int key that llama.cpp may also store per layer (then every layer must agree)."""
        value = self._require(key)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ValueError(
                    f"{self.path}: {key}={value} varies per layer; only uniform supported"
                )
            value = value[0]
        return int(value)

    def hf_config(self) -> dict:
        """The config.json an HF checkpoint of this model would carry (the fields rtpjax reads)."""
        model_type, hf_class = SUPPORTED_ARCHITECTURES[self.architecture]
        hidden = self._uniform_int(self._key("embedding_length"))
        heads = self._uniform_int(self._key("attention.head_count"))
        kv_key = self._key("attention.head_count_kv")
        kv_heads = self._uniform_int(kv_key) if kv_key in self.metadata else heads
        # key_length is written when head_dim ≠ hidden/heads (Mistral-Nemo, Qwen3); the rotary width
        # equals head_dim for every supported architecture, so it is the next best witness.
        head_dim = int(
            self.metadata.get(self._key("attention.key_length"))
            or self.metadata.get(self._key("rope.dimension_count"))
            or hidden // heads
        )
        rope_theta = float(self.metadata.get(self._key("rope.freq_base"), 10000.0))
        vocab = self.metadata.get(self._key("vocab_size"))
        if vocab is None:
            tokens = self.metadata.get("tokenizer.ggml.tokens")
            vocab = (
                len(tokens) if tokens else int(self._tensors["model.embed_tokens.weight"].shape[1])
            )
        has_bias = "model.layers.0.self_attn.q_proj.bias" in self._tensors
        return {
            "architectures": [hf_class],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": self._uniform_int(self._key("feed_forward_length")),
            "num_hidden_layers": self._uniform_int(self._key("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rms_norm_eps": float(self._require(self._key("attention.layer_norm_rms_epsilon"))),
            "rope_theta": rope_theta,
            "rope_scaling": self._rope_scaling(head_dim, rope_theta),
            "max_position_embeddings": self._uniform_int(self._key("context_length")),
            "vocab_size": int(vocab),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id"),
            "attention_bias": True if self.architecture == "qwen2" else has_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }

    def _rope_scaling(self, head_dim: int, rope_theta: float) -> dict | None:
        type_key = self._key("rope.scaling.type")
        kind = self.metadata.get(type_key, "none")
        factor = self.metadata.get(self._key("rope.scaling.factor"))
        if self._rope_freqs is not None:
            if kind != "none":
                raise ValueError(f"{self.path}: both {_ROPE_FREQS} and {type_key}={kind!r} are set")
            try:
                if np.allclose(self._rope_freqs, 1.0):
                    return None
                return fit_llama3_rope_scaling(self._rope_freqs, head_dim, rope_theta)
            except ValueError as e:
                raise ValueError(f"{self.path}: unsupported rope scaling: {e}") from None
        if kind == "none":
            legacy = self.metadata.get(self._key("rope.scale_linear"))  # pre-2024 files
            return None if legacy in (None, 1.0) else {"rope_type": "linear", "factor": legacy}
        if kind == "linear" and factor is not None:
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn" and factor is not None:
            scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
            orig = self.metadata.get(self._key("rope.scaling.original_context_length"))
            if orig is not None:
                scaling["original_max_position_embeddings"] = int(orig)
            for gguf_suffix, hf_key in (
                ("yarn_beta_fast", "beta_fast"),
                ("yarn_beta_slow", "beta_slow"),
            ):
                if (v := self.metadata.get(self._key(f"rope.scaling.{gguf_suffix}"))) is not None:
                    scaling[hf_key] = float(v)
            for gguf_suffix in (
                "yarn_ext_factor",
                "yarn_attn_factor",
                "yarn_log_multiplier",
                "attn_factor",
            ):
                if self._key(f"rope.scaling.{gguf_suffix}") in self.metadata:
                    raise ValueError(
                        f"{self.path}: {self._key(f'rope.scaling.{gguf_suffix}')} is not supported"
                    )
            return scaling
        raise ValueError(
            f"{self.path}: {type_key}={kind!r} (factor {factor}) is not supported; supported: "
            f"none, linear, yarn, and llama3 via {_ROPE_FREQS}"
        )

    def tensor_names(self) -> list[str]:
        """HF names of every tensor, in file order."""
        return list(self._tensors)

    def _entry(self, hf_name: str) -> Any:
        if hf_name not in self._tensors:
            raise KeyError(f"{self.path}: no tensor {hf_name!r} in this checkpoint")
        return self._tensors[hf_name]

    def tensor_shape(self, hf_name: str) -> tuple[int, ...]:
        """HF shape of a tensor without reading it ([out, in] for linears)."""
        return tuple(int(d) for d in reversed(self._entry(hf_name).shape.tolist()))

    def tensor_type(self, hf_name: str) -> str:
        """GGML type name of a tensor as stored ("Q4_K", "F16", …)."""
        return self._entry(hf_name).tensor_type.name

    def tensor(self, hf_name: str) -> np.ndarray:
        """One tensor, dequantised to a fresh float32 array in HF layout."""
        t = self._entry(hf_name)
        w = np.array(
            gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32
        )  # f32[out, in]
        w = w.reshape(self.tensor_shape(hf_name))
        if self.architecture == "llama":
            if ".self_attn.q_proj." in hf_name:
                w = unpermute_llama_rows(w, self._uniform_int(self._key("attention.head_count")))
            elif ".self_attn.k_proj." in hf_name:
                kv_key = self._key("attention.head_count_kv")
                heads_key = kv_key if kv_key in self.metadata else self._key("attention.head_count")
                w = unpermute_llama_rows(w, self._uniform_int(heads_key))
        return w

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, float32 array) for every tensor, in file order, one at a time."""
        for name in self._tensors:
            yield name, self.tensor(name)


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Open a GGUF file; every problem with the file is one line naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GGUF file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails deep inside (IndexError, reshape…) on short files
        raise ValueError(
            f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e}); size {size} bytes"
        ) from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise ValueError(
                f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes up to {end}, the file "
                f"has {size}"
            )
    return GGUFCheckpoint(path, reader)
