"""rtpjax: serve LLMs fast and fine-tune many LoRA adapters at once, in JAX/XLA.

Public API (imported lazily so `import rtpjax` stays cheap):
    LLM, SamplingParams, RequestOutput, CompletionOutput, ModelConfig, load_model
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "rtpjax.engine.llm",
    "SamplingParams": "rtpjax.sampling_params",
    "RequestOutput": "rtpjax.engine.outputs",
    "CompletionOutput": "rtpjax.engine.outputs",
    "ModelConfig": "rtpjax.config",
    "load_model": "rtpjax.weights.checkpoint",
}

if TYPE_CHECKING:  # re-exported names, for type checkers and IDEs
    from rtpjax.config import ModelConfig  # noqa: F401
    from rtpjax.engine.llm import LLM  # noqa: F401
    from rtpjax.engine.outputs import CompletionOutput, RequestOutput  # noqa: F401
    from rtpjax.sampling_params import SamplingParams  # noqa: F401
    from rtpjax.weights.checkpoint import load_model  # noqa: F401


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rtpjax' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
