"""Adapters in and out in PEFT's format: adapter_config.json + adapter_model.safetensors.

Tensor names are PEFT's: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in],
…lora_B.weight [out, r], and for DoRA …lora_magnitude_vector [out]. Our weights are [in, R] /
[R, out] (the transposes), padded to the bank's rank R; export writes only the adapter's own rank.
LoRA+ is a training recipe (a learning rate for B), so its adapters export as plain LoRA.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.config import ModelConfig
from rtpjax.finetune.config import AdapterConfig
from rtpjax.layers.lora import TARGETS, AdapterWeights, LoraLayout, target_shape
from rtpjax.weights.safetensors_io import SafetensorsFile, save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_MODULE = {
    t: ("self_attn." if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp.") + t
    for t in TARGETS
}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\."
    r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$"
)


@dataclasses.dataclass
class PeftAdapter:
    """One adapter read from disk: per layer, per target, a [I, r], b [r, O], m [O] or None."""

    rank: int
    alpha: float
    use_rslora: bool
    use_dora: bool
    dropout: float
    targets: tuple[str, ...]
    weights: list[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]]

    @property
    def scale(self) -> float:
        return self.alpha / (np.sqrt(self.rank) if self.use_rslora else self.rank)

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(
            kind="dora" if self.use_dora else "lora",
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=self.targets,
            use_rslora=self.use_rslora,
        )


def export_adapter(
    path: str, bank: AdapterWeights, slot: int, a: AdapterConfig, base_model: str = ""
) -> None:
    """Write slot `slot` of a bank as a PEFT adapter directory."""
    os.makedirs(path, exist_ok=True)
    r = a.rank
    tensors: dict[str, np.ndarray] = {}
    host = jax.device_get([{t: layer[t] for t in a.target_modules} for layer in bank])
    for i, layer in enumerate(host):
        for t in a.target_modules:
            w = layer[t]
            prefix = f"base_model.model.model.layers.{i}.{_MODULE[t]}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(
                w.a[slot, :, :r].T, np.float32
            )  # [r, I]
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(
                w.b[slot, :r, :].T, np.float32
            )  # [O, r]
            if a.kind == "dora":
                tensors[f"{prefix}.lora_magnitude_vector"] = np.asarray(w.m[slot], np.float32)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": a.alpha,
        "lora_dropout": a.dropout,
        "target_modules": list(a.target_modules),
        "use_dora": a.kind == "dora",
        "use_rslora": a.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    tmp = os.path.join(path, CONFIG_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(path, CONFIG_FILE))


def read_adapter(path: str, model: ModelConfig) -> PeftAdapter:
    """Read a PEFT LoRA/DoRA adapter directory; one-line errors for what we cannot honour."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    w_path = os.path.join(path, WEIGHTS_FILE)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"{p}: not found (a PEFT adapter directory needs {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
    with open(cfg_path, encoding="utf-8") as f:
        c = json.load(f)
    if c.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type={c.get('peft_type')!r}; only LORA is supported")
    for key, ok in (("fan_in_fan_out", False), ("bias", "none")):
        if c.get(key, ok) != ok:
            raise ValueError(f"{cfg_path}: {key}={c[key]!r} is not supported (only {ok!r})")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if c.get(key):
            raise ValueError(f"{cfg_path}: {key}={c[key]!r} is not supported (must be empty)")
    r, alpha = int(c["r"]), float(c.get("lora_alpha", 8))
    f = SafetensorsFile(w_path)
    weights: list[dict[str, list]] = [{} for _ in range(model.num_layers)]
    for name in f.entries:
        m = _KEY.match(name)
        if not m:
            raise ValueError(
                f"{w_path}: tensor {name!r} is not a LoRA/DoRA weight of a Llama-family projection"
            )
        i, t, kind = int(m.group(1)), m.group(2), m.group(3)
        if i >= model.num_layers or t not in TARGETS:
            raise ValueError(
                f"{w_path}: tensor {name!r}: layer {i} / module {t!r} is not in the model"
            )
        slot = weights[i].setdefault(t, [None, None, None])
        arr = np.asarray(f.tensor(name), np.float32)
        I, O = target_shape(model, t)
        if kind == "lora_A.weight":
            _check(arr.shape, (r, I), w_path, name)
            slot[0] = arr.T
        elif kind == "lora_B.weight":
            _check(arr.shape, (O, r), w_path, name)
            slot[1] = arr.T
        else:
            _check(arr.shape, (O,), w_path, name)
            slot[2] = arr
    targets = tuple(t for t in TARGETS if any(t in layer for layer in weights))
    use_dora = bool(c.get("use_dora", False))
    out = []
    for i, layer in enumerate(weights):
        row = {}
        for t in targets:
            a, b, mag = layer.get(t, [None, None, None])
            if a is None or b is None or (use_dora and mag is None):
                raise ValueError(f"{w_path}: layer {i} {t}: missing lora_A, lora_B or magnitude")
            row[t] = (a, b, mag)
        out.append(row)
    return PeftAdapter(
        rank=r,
        alpha=alpha,
        use_rslora=bool(c.get("use_rslora", False)),
        use_dora=use_dora,
        dropout=float(c.get("lora_dropout", 0.0)),
        targets=targets,
        weights=out,
    )


def _check(shape, want, path, name):
    if tuple(shape) != tuple(want):
        raise ValueError(
            f"{path}: tensor {name!r} has shape {tuple(shape)}, expected {tuple(want)}"
        )


def place_adapter(
    bank: AdapterWeights, slot: int, adapter: PeftAdapter, layout: LoraLayout
) -> AdapterWeights:
    """The bank with `adapter` written into `slot` (rank padded to R with zeros)."""
    if adapter.rank > layout.rank:
        raise ValueError(f"adapter rank {adapter.rank} exceeds the bank's rank {layout.rank}")
    missing = [t for t in adapter.targets if t not in layout.targets]
    if missing:
        raise ValueError(
            f"adapter targets {missing} are not in the bank's targets {layout.targets}"
        )
    if adapter.use_dora and not layout.dora:
        raise ValueError("a DoRA adapter needs a bank built with dora=True")
    r = adapter.rank
    out = []
    for i, layer in enumerate(bank):
        row = {}
        for t, w in layer.items():
            if t in adapter.targets:
                a, b, m = adapter.weights[i][t]
                new_a = jnp.zeros(w.a.shape[1:], w.a.dtype).at[:, :r].set(a)
                new_b = jnp.zeros(w.b.shape[1:], w.b.dtype).at[:r, :].set(b)
                w = w.replace(a=w.a.at[slot].set(new_a), b=w.b.at[slot].set(new_b))
                if w.m is not None and m is not None:
                    w = w.replace(m=w.m.at[slot].set(m))
            else:
                w = w.replace(a=w.a.at[slot].set(0.0), b=w.b.at[slot].set(0.0))
            row[t] = w
        out.append(row)
    return out
