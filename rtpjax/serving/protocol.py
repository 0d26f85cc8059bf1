"""The OpenAI wire protocol: request models, errors, and the JSON of responses and stream chunks.

Requests are pydantic models in OpenAI's shape plus vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, ...). Fields this server does not use
(best_of, user, suffix, lora_path, response_format, ...) are accepted and ignored. Values are
checked once, by SamplingParams; its ValueError becomes a 400 naming the request field.

Responses are built as plain dicts (the hot path of streaming); the pydantic response models below
document them in /openapi.json.
"""

from __future__ import annotations

import re
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from rtpjax.engine.outputs import CompletionOutput, Logprobs
from rtpjax.sampling_params import SamplingParams
from rtpjax.tokenizer import Tokenizer

# -- errors ---------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's JSON shape: {"error": {message, type, param, code}}."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable",
    }

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict:
    kind = APIError.TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- requests -------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of those lists"
    )
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    # Other keys (name, tool_calls, tool_call_id, ...) are kept: the chat template may use them.
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


# -- response models (documentation of the JSON built below) --------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ErrorResponse(BaseModel):
    error: dict[str, Any]


# -- request → SamplingParams ---------------------------------------------------------------------

_FIELD = re.compile(r"SamplingParams\.(\w+)")


def to_sampling_params(
    req: _SamplingRequest,
    *,
    max_tokens: int | None,
    max_tokens_field: str,
    logprobs: int | None,
    logprobs_field: str,
    prompt_logprobs: int | None,
    vocab_size: int,
) -> SamplingParams:
    """SamplingParams of a request; an invalid value raises APIError(400) naming the field."""
    bias = None
    if req.logit_bias is not None:
        bias = {}
        for key, value in req.logit_bias.items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise APIError(
                    400,
                    f"logit_bias key {key!r} is not a token id",
                    param="logit_bias",
                    code="invalid_value",
                ) from None
    top_k = 0 if req.top_k is None else req.top_k
    if top_k > vocab_size:  # keeping more than the whole vocabulary is no filter at all
        top_k = 0
    opt = lambda value, default: default if value is None else value
    fields = {"max_tokens": max_tokens_field, "logprobs": logprobs_field}
    try:
        return SamplingParams(
            n=req.n,
            temperature=opt(req.temperature, 1.0),
            top_p=opt(req.top_p, 1.0),
            top_k=top_k,
            min_p=opt(req.min_p, 0.0),
            presence_penalty=opt(req.presence_penalty, 0.0),
            frequency_penalty=opt(req.frequency_penalty, 0.0),
            repetition_penalty=opt(req.repetition_penalty, 1.0),
            seed=req.seed,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logit_bias=bias,
        )
    except ValueError as e:
        message = str(e).replace("SamplingParams.", "")
        m = _FIELD.search(str(e))
        if m is None:
            raise APIError(400, message, code="invalid_value") from None
        field = fields.get(m.group(1), m.group(1))
        message = message.replace(f"{m.group(1)}=", f"{field}=", 1)
        raise APIError(400, message, param=field, code="invalid_value") from None


def engine_error_param(message: str, prompt_field: str) -> str | None:
    """Which request field an LLMEngine.validate message is about."""
    if message.startswith("prompt"):
        return prompt_field
    for field in ("stop_token_ids", "logit_bias", "n"):
        if message.startswith(field):
            return field
    return None


# -- responses ------------------------------------------------------------------------------------


class TokenText:
    """Per-token strings and bytes for logprobs (special tokens shown, as OpenAI does)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._pieces = tokenizer.byte_level_pieces()
        self._cache: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._cache) < 200_000:
                self._cache[token_id] = s
        return s

    def bytes(self, token_id: int) -> list[int]:
        if self._pieces is not None:
            raw = self._pieces.get(token_id, skip_special_tokens=False)
            if raw:
                return list(raw)
        return list(self.text(token_id).encode("utf-8"))


def _sorted_top(d: Logprobs, k: int) -> list[tuple[int, float]]:
    return sorted(d.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(
    tt: TokenText, token_ids: list[int], logprobs: list[Logprobs | None], k: int, text_offset: int
) -> dict:
    """Legacy completions logprobs over `token_ids` (a None entry: no logprob, e.g. the first
    prompt token)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = text_offset
    for tid, d in zip(token_ids, logprobs):
        s = tt.text(tid)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
        if d is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(_finite(d.get(tid)))
        top = {tt.text(t): _finite(v) for t, v in _sorted_top(d, k)}
        top.setdefault(s, _finite(d.get(tid)))
        tops.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(tt: TokenText, token_ids: list[int], logprobs: list[Logprobs], k: int) -> dict:
    content = []
    for tid, d in zip(token_ids, logprobs):
        top = [
            {"token": tt.text(t), "logprob": _finite(v), "bytes": tt.bytes(t)}
            for t, v in _sorted_top(d, k)
        ]
        content.append(
            {
                "token": tt.text(tid),
                "logprob": _finite(d.get(tid)),
                "bytes": tt.bytes(tid),
                "top_logprobs": top,
            }
        )
    return {"content": content}


def _finite(x: float | None) -> float | None:
    # JSON has no -inf; OpenAI clients expect a number. -9999.0 is what OpenAI itself returns.
    if x is None:
        return None
    return x if x > -9999.0 else -9999.0


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(rid: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
        "system_fingerprint": None,
    }


def chat_response(rid: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
        "system_fingerprint": None,
    }


def _chunk(
    kind: str,
    rid: str,
    model: str,
    created: int,
    choices: list[dict],
    usage_: dict | None,
    with_usage: bool,
) -> dict:
    chunk = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def completion_chunk(
    rid: str,
    model: str,
    created: int,
    choices: list[dict],
    usage_: dict | None = None,
    with_usage: bool = False,
) -> dict:
    return _chunk("text_completion", rid, model, created, choices, usage_, with_usage)


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    choices: list[dict],
    usage_: dict | None = None,
    with_usage: bool = False,
) -> dict:
    return _chunk("chat.completion.chunk", rid, model, created, choices, usage_, with_usage)


class DeltaTracker:
    """What each streamed choice has sent so far, and the next delta to send.

    Text is held back by (longest stop string − 1) characters until the choice finishes, so a
    stop string's prefix is never streamed (the engine truncates the final text at the stop)."""

    def __init__(self, params: SamplingParams):
        self.want_logprobs = params.logprobs is not None
        self.holdback = max(map(len, params.stop), default=1) - 1
        self.text_sent: dict[int, int] = {}
        self.tokens_sent: dict[int, int] = {}
        self.done: set[int] = set()

    def delta(self, out: CompletionOutput) -> tuple[str, int, int] | None:
        """(new text, first new token, end token) of `out`, or None when it has nothing new."""
        i = out.index
        if i in self.done:
            return None
        sent, t0 = self.text_sent.get(i, 0), self.tokens_sent.get(i, 0)
        finished = out.finish_reason is not None
        end = len(out.text) if finished else max(sent, len(out.text) - self.holdback)
        text = out.text[sent:end]
        t1 = len(out.token_ids)
        if not text and not finished and (t1 == t0 or not self.want_logprobs):
            return None
        self.text_sent[i] = sent + len(text)
        self.tokens_sent[i] = t1
        if finished:
            self.done.add(i)
        return text, t0, t1
