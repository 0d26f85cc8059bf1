"""SamplingParams: how one request is sampled, with vLLM's field names, defaults and meanings.

Validated once, on the host, when the request is made: a bad value raises a one-line ValueError
naming the field, the value and what is allowed, before anything is queued.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

# Temperatures below this are greedy, as in vLLM: dividing logits by a tiny temperature overflows.
SAMPLING_EPS = 1e-5
# Most top logprobs a request may ask for per token (OpenAI's limit; vLLM's default cap).
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _real(name: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """value as a float in [lo, hi] (or (lo, hi] when lo_open), else a ValueError naming it."""
    ok = _is_real(value) and math.isfinite(value)  # type: ignore[arg-type]
    ok = ok and (lo < value if lo_open else lo <= value) and value <= hi  # type: ignore[operator]
    if not ok:
        allowed = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"SamplingParams.{name}={value!r} must be a finite number in {allowed}")
    return float(value)  # type: ignore[arg-type]


def _optional_count(name: str, value: object) -> int | None:
    if value is not None and not (_is_int(value) and 0 <= value <= MAX_LOGPROBS):  # type: ignore[operator]
        raise ValueError(
            f"SamplingParams.{name}={value!r} must be None or an int in [0, {MAX_LOGPROBS}]"
        )
    return value  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request (vLLM's names and semantics; `dataclasses.replace` works).

    temperature 0 (below 1e-5) or top_k 1 is greedy. top_k 0 or -1 is off, top_p 1 is off, min_p 0
    is off, repetition_penalty 1 is off. stop and stop_token_ids are normalised to tuples.
    max_tokens None means up to the model's context length. logprobs / prompt_logprobs count the
    top logprobs returned per token besides the sampled (or prompt) one. best_of is accepted and
    ignored.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        if not (_is_int(self.n) and self.n >= 1):
            raise ValueError(f"SamplingParams.n={self.n!r} must be an int >= 1")
        if self.best_of is not None and not (_is_int(self.best_of) and self.best_of >= self.n):
            raise ValueError(
                f"SamplingParams.best_of={self.best_of!r} must be None or an int >= n={self.n}"
            )
        set_("presence_penalty", _real("presence_penalty", self.presence_penalty, -2.0, 2.0))
        set_("frequency_penalty", _real("frequency_penalty", self.frequency_penalty, -2.0, 2.0))
        for name, strict in (("repetition_penalty", True), ("temperature", False)):
            value = getattr(self, name)
            ok = _is_real(value) and math.isfinite(value)
            if not (ok and (value > 0 if strict else value >= 0)):
                bound = "> 0" if strict else ">= 0"
                raise ValueError(f"SamplingParams.{name}={value!r} must be a finite number {bound}")
            set_(name, float(value))
        set_("top_p", _real("top_p", self.top_p, 0.0, 1.0, lo_open=True))
        set_("min_p", _real("min_p", self.min_p, 0.0, 1.0))
        if not (_is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1)):
            raise ValueError(
                f"SamplingParams.top_k={self.top_k!r} must be an int: 0 or -1 (off), or >= 1"
            )
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"SamplingParams.seed={self.seed!r} must be None or an int")
        set_("stop", self._check_stop(self.stop))
        set_("stop_token_ids", self._check_stop_token_ids(self.stop_token_ids))
        for name in (
            "ignore_eos",
            "detokenize",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "include_stop_str_in_output",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} must be a bool")
        if self.max_tokens is not None and not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            raise ValueError(
                f"SamplingParams.max_tokens={self.max_tokens!r} must be None or an int >= 1"
            )
        max_min = self.max_tokens if self.max_tokens is not None else "max_tokens"
        if not (_is_int(self.min_tokens) and self.min_tokens >= 0) or (
            self.max_tokens is not None and self.min_tokens > self.max_tokens
        ):
            raise ValueError(
                f"SamplingParams.min_tokens={self.min_tokens!r} must be an int in [0, {max_min}]"
            )
        _optional_count("logprobs", self.logprobs)
        _optional_count("prompt_logprobs", self.prompt_logprobs)
        set_("logit_bias", self._check_logit_bias(self.logit_bias))

    @staticmethod
    def _check_stop(stop: object) -> tuple[str, ...]:
        items = (stop,) if isinstance(stop, str) else stop
        if items is None:
            return ()
        if not isinstance(items, Sequence) or not all(isinstance(s, str) and s for s in items):
            raise ValueError(
                f"SamplingParams.stop={stop!r} must be None, a non-empty str or a list of them"
            )
        return tuple(items)

    @staticmethod
    def _check_stop_token_ids(ids: object) -> tuple[int, ...]:
        if ids is None:
            return ()
        if (
            isinstance(ids, str)
            or not isinstance(ids, Sequence)
            or not all(_is_int(i) and i >= 0 for i in ids)
        ):
            raise ValueError(
                f"SamplingParams.stop_token_ids={ids!r} must be None or a list of ints >= 0"
            )
        return tuple(ids)

    @staticmethod
    def _check_logit_bias(bias: object) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, Mapping):
            raise ValueError(f"SamplingParams.logit_bias={bias!r} must be None or a dict")
        out: dict[int, float] = {}
        for token, value in bias.items():
            if not (_is_int(token) and token >= 0):
                raise ValueError(
                    f"SamplingParams.logit_bias has key {token!r}: keys must be token ids >= 0"
                )
            out[token] = _real(f"logit_bias[{token}]", value, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        return out

    def is_greedy(self) -> bool:
        """True when the request always takes the most likely token (temperature 0 or top_k 1)."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    def uses_penalties(self) -> bool:
        """Any of the repetition, presence or frequency penalties is on."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def uses_top_k_top_p(self) -> bool:
        """top-k or top-p narrows this (non-greedy) request's choice."""
        return not self.is_greedy() and (self.top_k > 1 or self.top_p < 1.0)
