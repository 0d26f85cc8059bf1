"""Server settings: `ServerArgs`, the command-line flags (vLLM's spelling) and --config YAML files.

Flags override a YAML file, which overrides the dataclass defaults; every value is checked against
its field's kind, so a bad setting is one clear line, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import yaml

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
ATTENTION_IMPLS = ("auto", "triton", "xla")


@dataclasses.dataclass(frozen=True)
class ServerArgs:
    """Server settings; CLI flags (vLLM's spelling) override a --config YAML, which overrides
    these defaults. None means the engine's default."""

    model: str | None = None  # HF directory, GGUF file or Orbax checkpoint; None: the embedded one
    tokenizer: str | None = None  # tokenizer directory or GGUF; None: the model's own
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the startup line shows which)
    served_model_name: tuple[str, ...] | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    # Multi-step decode (vLLM's spelling): decode iterations per launch when no request waits; cuts
    # the host's work per token K-fold, but streams arrive K tokens at a time. 1: off.
    num_scheduler_steps: int = 1
    tensor_parallel_size: int = 1
    # The paged-attention path: "auto" (on Hopper the Mosaic GPU kernel for prefill steps, 0.9-1.0
    # of cuDNN, the Triton kernel for decode); "triton" (the Triton kernel for every step: each
    # prefill step variant compiles faster, so the first start's warm-up is shorter); "xla".
    attention_impl: str = "auto"
    kv_cache_memory_fraction: float = 0.9
    enable_prefix_caching: bool = True
    api_key: str | None = None
    max_waiting_requests: int = 1024  # sequences waiting for a running slot before 429
    dtype: str = "auto"
    seed: int = 0
    log_level: str = "info"
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    max_request_body_bytes: int = 8 * 2**20  # larger bodies get 413
    warmup: bool = True  # compile the common step shapes before serving
    # jax's persistent compilation cache on accelerators: a restart reloads the compiled step
    # variants instead of compiling them again (the full warm-up compiles ~36 of them). "": off.
    compilation_cache_dir: str = "~/.cache/rtpjax/xla"

    def __post_init__(self):
        if isinstance(self.served_model_name, str):
            object.__setattr__(self, "served_model_name", (self.served_model_name,))
        elif self.served_model_name is not None:
            object.__setattr__(self, "served_model_name", tuple(self.served_model_name))
        for f in dataclasses.fields(self):
            _check_field(f.name, getattr(self, f.name))
        if self.attention_impl not in ATTENTION_IMPLS:
            allowed = ", ".join(ATTENTION_IMPLS)
            raise ValueError(f"attention_impl={self.attention_impl!r} must be one of {allowed}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in [0, 65535]")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(
                f"kv_cache_memory_fraction={self.kv_cache_memory_fraction} must be in (0, 1]"
            )
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level={self.log_level!r} must be one of {', '.join(LOG_LEVELS)}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout={self.drain_timeout} must be >= 0 seconds")

    @staticmethod
    def from_yaml(path: str) -> dict[str, Any]:
        """The settings a YAML file holds (keys in snake_case or dashed), checked against the
        fields; an unknown key raises a one-line ValueError naming it."""
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: must hold a mapping of settings, not {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(ServerArgs)]
        out = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise ValueError(f"{path}: unknown key {key!r}; allowed: {', '.join(names)}")
            try:
                _check_field(name, value)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            out[name] = value
        return out


_KINDS: dict[str, tuple[type, ...]] = {
    "model": (str, type(None)),
    "tokenizer": (str, type(None)),
    "host": (str,),
    "port": (int,),
    "served_model_name": (str, tuple, list, type(None)),
    "max_model_len": (int, type(None)),
    "max_num_seqs": (int,),
    "max_num_batched_tokens": (int, type(None)),
    "num_scheduler_steps": (int,),
    "tensor_parallel_size": (int,),
    "attention_impl": (str,),
    "kv_cache_memory_fraction": (int, float),
    "enable_prefix_caching": (bool,),
    "api_key": (str, type(None)),
    "max_waiting_requests": (int,),
    "dtype": (str,),
    "seed": (int,),
    "log_level": (str,),
    "drain_timeout": (int, float),
    "max_request_body_bytes": (int,),
    "warmup": (bool,),
    "compilation_cache_dir": (str,),
}
_POSITIVE = (
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "num_scheduler_steps",
    "tensor_parallel_size",
    "max_request_body_bytes",
)


def _check_field(name: str, value: Any) -> None:
    kinds = _KINDS[name]
    is_bool = isinstance(value, bool)
    if not isinstance(value, kinds) or (is_bool and bool not in kinds):
        allowed = " or ".join(k.__name__ for k in kinds).replace("NoneType", "null")
        raise ValueError(f"{name}={value!r} must be {allowed}")
    if name in _POSITIVE and value is not None and value < 1:
        raise ValueError(f"{name}={value} must be >= 1")
    if name == "max_waiting_requests" and value < 0:
        raise ValueError(f"{name}={value} must be >= 0")


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    ap = argparse.ArgumentParser(
        prog="serve.py",
        description="Serve a model over OpenAI's API (rtpjax).",
        argument_default=argparse.SUPPRESS,
    )
    ap.add_argument("--config", default=None, help="YAML file of these settings (flags override)")
    ap.add_argument(
        "--model",
        help="HF directory, .gguf file or Orbax checkpoint "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    ap.add_argument(
        "--tokenizer",
        help="tokenizer directory (tokenizer.json) or .gguf file (default: the model's own)",
    )
    ap.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    ap.add_argument("--served-model-name", nargs="+", help="name(s) clients use for the model")
    ap.add_argument("--max-model-len", type=int, help="context length (prompt + output)")
    ap.add_argument("--max-num-seqs", type=int, help="sequences per step (default 256)")
    ap.add_argument("--max-num-batched-tokens", type=int, help="tokens per step")
    ap.add_argument(
        "--num-scheduler-steps",
        type=int,
        help="multi-step decode: decode iterations per launch when nothing waits (default 1: off)",
    )
    ap.add_argument("--tensor-parallel-size", type=int, help="devices to shard over (default 1)")
    ap.add_argument(
        "--attention-impl",
        help="paged attention: auto (default; on Hopper the Mosaic GPU kernel for prefill), "
        "triton (the Triton kernel for every step: a shorter first warm-up), xla",
    )
    ap.add_argument(
        "--kv-cache-memory-fraction",
        type=float,
        help="fraction of device memory for weights + KV cache (default 0.9)",
    )
    ap.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        help="reuse KV pages of shared prompt prefixes (default on)",
    )
    ap.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 and tokenizer endpoints"
    )
    ap.add_argument(
        "--max-waiting-requests",
        type=int,
        help="sequences that may wait for a running slot before 429 (default 1024)",
    )
    ap.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 (default auto)")
    ap.add_argument("--seed", type=int, help="seed of unseeded requests' sampling (default 0)")
    ap.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
    ap.add_argument(
        "--drain-timeout",
        type=float,
        help="seconds SIGTERM waits for in-flight requests (default 30)",
    )
    ap.add_argument("--max-request-body-bytes", type=int, help="default 8 MiB; larger get 413")
    ap.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        help="compile the common step shapes before serving (default on)",
    )
    ap.add_argument(
        "--compilation-cache-dir",
        help="persistent XLA compilation cache on GPUs/TPUs (default ~/.cache/rtpjax/xla; '' off)",
    )
    ns = vars(ap.parse_args(argv))
    config = ns.pop("config")
    base = ServerArgs.from_yaml(config) if config else {}
    return ServerArgs(**{**base, **ns})
