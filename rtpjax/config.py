"""ModelConfig: what the model code needs to know, built from HF config.json or GGUF metadata.

One frozen dataclass for the Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2).
Anything the model code cannot honour raises a ValueError naming the field, never a silent fallback.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# HF model_type → (family, defaults that differ between the members of the family).
_MODEL_TYPES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
}
SUPPORTED_MODEL_TYPES = tuple(_MODEL_TYPES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling beyond plain `theta`; `rope_type` is one of SUPPORTED_ROPE_TYPES."""

    rope_type: str = "default"
    factor: float = 1.0
    # 'llama3' only:
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor={self.factor} must be > 0")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                f"low_freq_factor={self.low_freq_factor}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a Llama-family decoder. Letters as in docs/glossary.md."""

    model_type: str  # HF model_type: llama | mistral | qwen2 | qwen3
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    o_bias: bool = False  # Llama with attention_bias=True: bias on o_proj too
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    sliding_window: int | None = None  # Mistral: key j visible from i when i - j < window
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # How many times each checkpoint KV head is repeated (tensor parallelism wider than K): the
    # model
    # then runs with num_kv_heads = K_checkpoint * kv_head_replication. See with_tensor_parallel.
    kv_head_replication: int = 1

    def __post_init__(self):
        if self.model_type not in _MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or null")

    @property
    def q_per_kv(self) -> int:
        """G: query heads sharing one KV head."""
        return self.num_heads // self.num_kv_heads

    def with_tensor_parallel(self, tp: int) -> ModelConfig:
        """The config to run under `tp`-way tensor parallelism over heads.

        Query heads are split evenly; KV heads too when `tp` divides K. When K < tp and K divides
        tp, each KV head is replicated tp/K times (as vLLM does), so every shard holds the one KV
        head its query heads read: an exactly equivalent model with K' = tp. Anything else cannot
        be split
        without changing the arithmetic, and raises.
        """
        if tp < 1:
            raise ValueError(f"tensor_parallel_size={tp} must be >= 1")
        if tp == 1:
            return self
        if self.num_heads % tp:
            raise ValueError(
                f"tensor_parallel_size={tp} must divide num_attention_heads={self.num_heads} "
                f"(allowed: {_divisors(self.num_heads)})"
            )
        if self.num_kv_heads % tp == 0:
            return self
        if tp % self.num_kv_heads == 0:
            r = tp // self.num_kv_heads
            return dataclasses.replace(
                self,
                num_kv_heads=self.num_kv_heads * r,
                kv_head_replication=self.kv_head_replication * r,
            )
        raise ValueError(
            f"tensor_parallel_size={tp} must divide num_key_value_heads={self.num_kv_heads} "
            "or be a "
            f"multiple of it (allowed: {sorted(set(_divisors(self.num_heads)))})"
        )

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_hf(cls, config: dict[str, Any] | str | os.PathLike, source: str = "") -> ModelConfig:
        """From an HF config.json (a dict, the file, or its directory). Reads both the legacy
        `rope_theta`/`rope_scaling` keys and transformers v5's `rope_parameters`."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            config = read_json(path)
        where = f"{source}: " if source else ""
        try:
            return _from_hf_dict(config)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers would write for this model (legacy rope keys, which both
        transformers v4 and v5 read)."""
        if self.kv_head_replication != 1:
            raise ValueError(
                "to_hf() of a config with replicated KV heads: export the checkpoint's own"
            )
        arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }[self.model_type]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.o_bias
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            eos = list(self.eos_token_ids)
            out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def read_json(path: str) -> dict[str, Any]:
    """A JSON object from `path`; one-line errors naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _rope_from_hf(config: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers v5 folds theta and scaling into `rope_parameters`; v4 has `rope_theta` and
    # `rope_scaling` (whose type key was once `type`, later `rope_type`).
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" not in params and params:
        # Per-layer-type dicts (e.g. {"full_attention": {...}}) appear in hybrid models only.
        raise ValueError(f"rope_parameters={params!r}: per-attention-type rope is not supported")
    scaling = dict(params) if isinstance(params, dict) else dict(config.get("rope_scaling") or {})
    theta = float(scaling.pop("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type == "default" and not scaling.get("factor"):
        return theta, None
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    extra = sorted(k for k in scaling if k not in known)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling.rope_type={rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if extra and rope_type != "default":
        # Keys such as 'attention_factor' or 'partial_rotary_factor' change the arithmetic.
        raise ValueError(f"rope_scaling has unsupported keys {extra} for rope_type={rope_type!r}")
    kwargs = {k: scaling[k] for k in known if k in scaling and k != "rope_type"}
    if "original_max_position_embeddings" in kwargs:
        kwargs["original_max_position_embeddings"] = int(kwargs["original_max_position_embeddings"])
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        if k in kwargs:
            kwargs[k] = float(kwargs[k])
    if rope_type == "default":
        return theta, None
    return theta, RopeScaling(rope_type=rope_type, **kwargs)


def _from_hf_dict(c: dict[str, Any]) -> ModelConfig:
    model_type = c.get("model_type")
    if model_type not in _MODEL_TYPES:
        archs = c.get("architectures")
        raise ValueError(
            f"model_type={model_type!r} (architectures={archs}) is not supported; "
            f"supported model_type: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    family = _MODEL_TYPES[model_type]
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported; supported: 'silu'")
    if c.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={c['partial_rotary_factor']} is not supported")
    if c.get("quantization_config"):
        method = c["quantization_config"].get("quant_method")
        raise ValueError(
            f"quantization_config.quant_method={method!r}: pre-quantized HF checkpoints "
            "are not supported; use a bf16/f32 checkpoint or a GGUF file"
        )
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    missing = [k for k in required if k not in c]
    if missing:
        raise ValueError(f"config is missing required keys {missing}")
    num_heads = int(c["num_attention_heads"])
    hidden = int(c["hidden_size"])
    head_dim = c.get("head_dim") or hidden // num_heads
    theta, scaling = _rope_from_hf(c)
    sliding = None
    if model_type == "mistral":
        sliding = c.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and c.get("use_sliding_window"):
        # Qwen applies the window to layers >= max_window_layers only; not supported (yet).
        raise ValueError("use_sliding_window=true is not supported for qwen models")
    eos = c.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    attention_bias = bool(c.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(c["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(c.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        # transformers: Llama and Qwen3 put `attention_bias` on q/k/v/o, Qwen2 always has q/k/v bias
        # and no o bias, Mistral has none.
        qkv_bias=family.get("qkv_bias", False) or (attention_bias and model_type != "mistral"),
        o_bias=attention_bias and model_type in ("llama", "qwen3"),
        qk_norm=family.get("qk_norm", False),
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids),
    )
