"""The frozen base model of a fine-tuning run: config, parameters, tokenizer."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from rtpjax.config import ModelConfig
from rtpjax.finetune.config import FinetuneConfig
from rtpjax.finetune.data import ByteTokenizer
from rtpjax.models import llama


@dataclasses.dataclass
class Base:
    name: str
    config: ModelConfig
    params: llama.Params
    tokenizer: Any


def load_base(cfg: FinetuneConfig) -> Base:
    """The frozen base model and tokenizer of a run."""
    from rtpjax.weights.loader import load_params, resolve_dtype

    dtype = resolve_dtype(cfg.dtype)
    model = cfg.resolve(cfg.model)
    if cfg.tokenizer == "bytes":
        from rtpjax.weights.safetensors_io import SafetensorsCheckpoint

        if model is None or not os.path.isdir(model):
            raise ValueError(f"model={cfg.model!r}: tokenizer 'bytes' needs an HF model directory")
        mcfg = ModelConfig.from_hf(model)
        return Base(
            os.path.basename(model.rstrip("/")),
            mcfg,
            load_params(SafetensorsCheckpoint(model), mcfg, dtype),
            ByteTokenizer(),
        )
    from rtpjax.weights.checkpoint import load_model

    lm = load_model(model, dtype=dtype, tokenizer=cfg.resolve(cfg.tokenizer))
    return Base(lm.name, lm.config, lm.params, lm.tokenizer)
