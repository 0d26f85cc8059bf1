"""The OpenAI-compatible HTTP server: settings, the FastAPI app factory, and the uvicorn runner.

    python scripts/serve.py [--model PATH] [--port 8000] [--config configs/serve/default.yaml] ...

Handlers never touch the device: they tokenize, hand requests to the AsyncLLMEngine (the engine
loop on its own thread) and turn its cumulative outputs into OpenAI JSON or server-sent events. A
client that goes away aborts its requests; SIGTERM stops accepting, lets in-flight requests finish
for up to --drain-timeout seconds, and exits 0. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rtpjax.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    QueueFullError,
    RequestStream,
)
from rtpjax.engine.outputs import CompletionOutput, RequestOutput
from rtpjax.sampling_params import SamplingParams
from rtpjax.serving import protocol as P
from rtpjax.serving.metrics import CONTENT_TYPE, ServerMetrics
from rtpjax.tokenizer import Tokenizer

logger = logging.getLogger("rtpjax.serving")

# Prompts longer than this many characters are tokenized off the event loop.
_OFFLOOP_CHARS = 8192
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


# -- settings -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServerArgs:
    """Server settings; CLI flags (vLLM's spelling) override a --config YAML, which overrides
    these defaults. None means the engine's default."""

    model: str | None = None  # HF directory, GGUF file or Orbax checkpoint; None: the embedded one
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the startup line shows which)
    served_model_name: tuple[str, ...] | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    tensor_parallel_size: int = 1
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

    def __post_init__(self):
        if isinstance(self.served_model_name, str):
            object.__setattr__(self, "served_model_name", (self.served_model_name,))
        elif self.served_model_name is not None:
            object.__setattr__(self, "served_model_name", tuple(self.served_model_name))
        for f in dataclasses.fields(self):
            _check_field(f.name, getattr(self, f.name))
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
    "host": (str,),
    "port": (int,),
    "served_model_name": (str, tuple, list, type(None)),
    "max_model_len": (int, type(None)),
    "max_num_seqs": (int,),
    "max_num_batched_tokens": (int, type(None)),
    "tensor_parallel_size": (int,),
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
}
_POSITIVE = (
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
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
    ap.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    ap.add_argument("--served-model-name", nargs="+", help="name(s) clients use for the model")
    ap.add_argument("--max-model-len", type=int, help="context length (prompt + output)")
    ap.add_argument("--max-num-seqs", type=int, help="sequences per step (default 256)")
    ap.add_argument("--max-num-batched-tokens", type=int, help="tokens per step")
    ap.add_argument("--tensor-parallel-size", type=int, help="devices to shard over (default 1)")
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
    ns = vars(ap.parse_args(argv))
    config = ns.pop("config")
    base = ServerArgs.from_yaml(config) if config else {}
    return ServerArgs(**{**base, **ns})


# -- the app --------------------------------------------------------------------------------------


class _Gate:
    """ASGI middleware: API key, body size cap (bodies are small; read whole, then replayed),
    and the per-status request counter. Rejections use OpenAI's error JSON."""

    def __init__(self, app, *, api_key: str | None, max_body: int, metrics: ServerMetrics):
        self.app = app
        self.api_key = api_key
        self.max_body = max_body
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = [0]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        failed = False
        try:
            if self.api_key is not None and _needs_key(path) and not self._authorized(scope):
                return await _send_error(
                    send_counted,
                    P.APIError(
                        401,
                        "invalid or missing API key (send 'Authorization: Bearer <key>')",
                        code="invalid_api_key",
                    ),
                )
            headers = dict(scope.get("headers") or [])
            too_big = P.APIError(
                413,
                f"request body exceeds max_request_body_bytes={self.max_body}",
                code="request_too_large",
            )
            try:
                declared = int(headers.get(b"content-length", b"0"))
            except ValueError:
                declared = 0
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                size += len(body)
                if size > self.max_body or declared > self.max_body:
                    # Read (and drop) a moderately larger body, so the client sees the 413
                    # rather than a reset while it is still sending.
                    while message.get("more_body", False) and size <= 8 * self.max_body:
                        message = await receive()
                        size += len(message.get("body", b""))
                    return await _send_error(send_counted, too_big)
                chunks.append(body)
                if not message.get("more_body", False):
                    break
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def receive_replayed():
                return replay.pop() if replay else await receive()

            await self.app(scope, receive_replayed, send_counted)
        except BaseException:
            failed = True
            raise
        finally:
            # No status sent: the app crashed (500 goes out from the outer error middleware) or
            # the client left first (499, nginx's "client closed request").
            self.metrics.count_http(path, status[0] or (500 if failed else 499))

    def _authorized(self, scope) -> bool:
        for key, value in scope.get("headers") or []:
            if key == b"authorization":
                token = value.decode("latin-1")
                if token.lower().startswith("bearer "):
                    return hmac.compare_digest(token[7:].strip(), self.api_key)
        return False


def _needs_key(path: str) -> bool:
    return path.startswith(("/v1/", "/debug/")) or path in ("/v1", "/tokenize", "/detokenize")


async def _send_error(send, err: P.APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_response(err: P.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


class _Run:
    """The engine requests of one HTTP request (one per prompt), sharing one output queue."""

    def __init__(self, engine: AsyncLLMEngine, rid: str, num_prompts: int, metrics: ServerMetrics):
        self.engine = engine
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids = [f"{rid}-{i}" for i in range(num_prompts)]
        self.index = {sub: i for i, sub in enumerate(self.ids)}
        self.unfinished: set[str] = set()

    async def submit(
        self,
        prompts: list[tuple[str | None, list[int]]],
        params: SamplingParams,
        priority: int,
        prompt_field: str,
    ) -> None:
        adds = [
            self.engine.add_request(sub, text, ids, params, priority=priority, out_queue=self.queue)
            for sub, (text, ids) in zip(self.ids, prompts)
        ]
        try:
            results = await asyncio.gather(*adds, return_exceptions=True)
        except asyncio.CancelledError:
            for sub in self.ids:
                self.engine.abort(sub)
            raise
        self.unfinished = {s.request_id for s in results if isinstance(s, RequestStream)}
        errors = [(i, e) for i, e in enumerate(results) if isinstance(e, BaseException)]
        if errors:
            self.abort_unfinished()
            i, e = errors[0]
            raise _api_error(e, prompt_field if len(prompts) == 1 else f"{prompt_field}[{i}]")

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        while self.unfinished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield item

    async def finals(self) -> dict[int, RequestOutput]:
        return {self.index[o.request_id]: o async for o in self.outputs() if o.finished}

    def abort_unfinished(self) -> None:
        """Abort what is still running (the client left, or a sibling request was refused)."""
        for sub in self.unfinished:
            self.engine.abort(sub)
        self.metrics.count_aborted(len(self.unfinished))
        self.unfinished.clear()


def _api_error(e: BaseException, prompt_field: str) -> P.APIError:
    if isinstance(e, QueueFullError):
        return P.APIError(429, str(e), code="queue_full", retry_after=1)
    if isinstance(e, EngineDeadError):
        return P.APIError(503, str(e), code="shutting_down", retry_after=5)
    if isinstance(e, ValueError):
        msg = str(e)
        return P.APIError(
            400, msg, param=P.engine_error_param(msg, prompt_field), code="invalid_value"
        )
    raise e


def build_app(
    engine: AsyncLLMEngine,
    tokenizer: Tokenizer,
    args: ServerArgs,
    *,
    model_name: str,
    max_model_len: int,
    vocab_size: int,
    model_path: str = "",
) -> FastAPI:
    """The FastAPI app serving `engine` (already started; the app's shutdown stops it)."""
    names = list(args.served_model_name or (model_name,))
    metrics = ServerMetrics(names[0])
    token_text = P.TokenText(tokenizer)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn has already waited (drain_timeout) for connections; cancelled handlers have
        # queued their aborts, so this only stops the thread.
        aborted = await engine.shutdown(drain_timeout=2.0)
        logger.info("engine stopped (%d requests aborted)", aborted)

    app = FastAPI(title="rtpjax OpenAI-compatible server", lifespan=lifespan, version="0.1.0")
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(
        _Gate, api_key=args.api_key, max_body=args.max_request_body_bytes, metrics=metrics
    )

    @app.exception_handler(P.APIError)
    async def _on_api_error(request: Request, e: P.APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        # Union members appear in pydantic's location as type tags ("str", "list[int]"): drop them.
        loc = [
            str(x)
            for x in first.get("loc", ())
            if x != "body" and not (isinstance(x, str) and ("[" in x or x in _TYPE_TAGS))
        ]
        if first.get("type") == "json_invalid":
            return _error_response(
                P.APIError(
                    400,
                    f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                    code="invalid_json",
                )
            )
        param = ".".join(loc) or None
        msg = (
            f"{param}: {first.get('msg', 'invalid value')}"
            if param
            else first.get("msg", "invalid request")
        )
        return _error_response(P.APIError(400, msg, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, e: StarletteHTTPException):
        return JSONResponse(
            P.error_body(e.status_code, str(e.detail)),
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, e: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(
            P.error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500
        )

    def check_model(model: str | None) -> str:
        if model is None or model in names:
            return names[0] if model is None else model
        raise P.APIError(
            404,
            f"model {model!r} not found; this server serves {names}",
            param="model",
            code="model_not_found",
        )

    async def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > _OFFLOOP_CHARS:
            return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)
        return tokenizer.encode(text, add_special_tokens)

    async def render_chat(
        messages: list[P.ChatMessage],
        add_generation_prompt: bool,
        tools: list | None,
        kwargs: dict | None,
    ) -> list[int]:
        chat = [_message_dict(m, i) for i, m in enumerate(messages)]
        render = lambda: tokenizer.apply_chat_template(
            chat,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            tools=tools,
            **(kwargs or {}),
        )
        try:
            if sum(len(str(m.get("content") or "")) for m in chat) > _OFFLOOP_CHARS:
                return await asyncio.to_thread(render)
            return render()
        except Exception as e:  # template errors of any kind are the request's fault
            raise P.APIError(
                400,
                f"messages could not be rendered with the chat template: {e}",
                param="messages",
                code="invalid_value",
            ) from None

    async def wait_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def collect(run: _Run, request: Request) -> dict[int, RequestOutput] | None:
        """Final outputs, or None when the client went away first (its requests are aborted)."""
        gone = asyncio.ensure_future(wait_disconnect(request))
        done = asyncio.ensure_future(run.finals())
        try:
            await asyncio.wait({gone, done}, return_when=asyncio.FIRST_COMPLETED)
            if done.done():
                return done.result()
            return None
        finally:
            gone.cancel()
            done.cancel()
            run.abort_unfinished()

    def observe(out: RequestOutput) -> None:
        if out.finished:
            metrics.observe_finished(out)

    def sse(gen: AsyncIterator[dict], run: _Run) -> StreamingResponse:
        async def body():
            try:
                async for chunk in gen:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except Exception as e:  # headers are sent: report in-band, as OpenAI does
                logger.error("stream failed: %s", e)
                yield f"data: {json.dumps(P.error_body(500, str(e)))}\n\n"
            finally:
                run.abort_unfinished()
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- /v1/completions --------------------------------------------------------------------------

    @app.post(
        "/v1/completions",
        response_model=None,
        responses={200: {"model": P.CompletionResponse}, 400: {"model": P.ErrorResponse}},
    )
    async def completions(body: P.CompletionRequest, request: Request):
        model = check_model(body.model)
        prompts = await _completion_prompts(body.prompt, encode)
        echo_only = body.echo and body.max_tokens == 0  # score the prompt: generate nothing
        k = body.logprobs
        params = P.to_sampling_params(
            body,
            max_tokens=1 if echo_only else body.max_tokens,
            max_tokens_field="max_tokens",
            logprobs=k,
            logprobs_field="logprobs",
            prompt_logprobs=k if body.echo and k is not None else None,
            vocab_size=vocab_size,
        )
        rid = f"cmpl-{uuid.uuid4().hex}"
        run = _Run(engine, rid, len(prompts), metrics)
        await run.submit(prompts, params, body.priority, "prompt")
        n = params.n
        echo_text = [
            (t if t is not None else tokenizer.decode(ids)) if body.echo else ""
            for t, ids in prompts
        ]

        def shown(o: CompletionOutput) -> CompletionOutput:
            if not echo_only:
                return o
            return dataclasses.replace(
                o,
                text="",
                token_ids=[],
                logprobs=None if o.logprobs is None else [],
                finish_reason=o.finish_reason and "length",
            )

        def logprobs_of(
            out: RequestOutput,
            o: CompletionOutput,
            t0: int,
            t1: int,
            offset: int,
            with_prompt: bool,
        ) -> dict | None:
            if k is None:
                return None
            ids, lps = o.token_ids[t0:t1], (o.logprobs or [])[t0:t1]
            if with_prompt:
                pl = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                ids, lps = out.prompt_token_ids + ids, list(pl) + lps
            return P.completion_logprobs(token_text, ids, lps, k, offset)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            created = int(time.time())

            async def chunks():
                trackers = [P.DeltaTracker(params) for _ in prompts]
                echoed: set[int] = set()
                prompt_tokens = completion_tokens = 0
                async for out in run.outputs():
                    pi = run.index[out.request_id]
                    for o in map(shown, out.outputs):
                        d = trackers[pi].delta(o)
                        if d is None:
                            continue
                        text, t0, t1 = d
                        idx = pi * n + o.index
                        first = body.echo and idx not in echoed
                        echoed.add(idx)
                        offset = trackers[pi].text_sent[o.index] - len(text)
                        choice = {
                            "index": idx,
                            "text": (echo_text[pi] if first else "") + text,
                            "logprobs": logprobs_of(out, o, t0, t1, offset, first),
                            "finish_reason": o.finish_reason,
                            "stop_reason": o.stop_reason,
                        }
                        yield P.completion_chunk(rid, model, created, [choice], None, include_usage)
                    if out.finished:
                        observe(out)
                        prompt_tokens += len(out.prompt_token_ids)
                        completion_tokens += sum(len(shown(o).token_ids) for o in out.outputs)
                if include_usage:
                    yield P.completion_chunk(
                        rid, model, created, [], P.usage(prompt_tokens, completion_tokens), True
                    )

            return sse(chunks(), run)

        finals = await collect(run, request)
        if finals is None:
            return Response(status_code=499)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for pi in range(len(prompts)):
            out = finals[pi]
            observe(out)
            prompt_tokens += len(out.prompt_token_ids)
            for o in map(shown, out.outputs):
                completion_tokens += len(o.token_ids)
                choices.append(
                    {
                        "index": pi * n + o.index,
                        "text": echo_text[pi] + o.text,
                        "logprobs": logprobs_of(out, o, 0, len(o.token_ids), 0, body.echo),
                        "finish_reason": o.finish_reason,
                        "stop_reason": o.stop_reason,
                    }
                )
        return JSONResponse(
            P.completion_response(rid, model, choices, P.usage(prompt_tokens, completion_tokens))
        )

    # -- /v1/chat/completions ---------------------------------------------------------------------

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={200: {"model": P.ChatCompletionResponse}, 400: {"model": P.ErrorResponse}},
    )
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        model = check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise P.APIError(
                400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value"
            )
        k = (body.top_logprobs or 0) if body.logprobs else None
        use_mct = body.max_completion_tokens is not None
        params = P.to_sampling_params(
            body,
            max_tokens=body.max_completion_tokens if use_mct else body.max_tokens,
            max_tokens_field="max_completion_tokens" if use_mct else "max_tokens",
            logprobs=k,
            logprobs_field="top_logprobs",
            prompt_logprobs=None,
            vocab_size=vocab_size,
        )
        ids = await render_chat(
            body.messages, body.add_generation_prompt, body.tools, body.chat_template_kwargs
        )
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        run = _Run(engine, rid, 1, metrics)
        await run.submit([(None, ids)], params, body.priority, "messages")

        def logprobs_of(o: CompletionOutput, t0: int, t1: int) -> dict | None:
            if k is None:
                return None
            return P.chat_logprobs(token_text, o.token_ids[t0:t1], (o.logprobs or [])[t0:t1], k)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            created = int(time.time())

            async def chunks():
                tracker = P.DeltaTracker(params)
                for i in range(params.n):
                    role = {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    yield P.chat_chunk(rid, model, created, [role], None, include_usage)
                completion_tokens = 0
                async for out in run.outputs():
                    for o in out.outputs:
                        d = tracker.delta(o)
                        if d is None:
                            continue
                        text, t0, t1 = d
                        delta = {"content": text} if text or not o.finish_reason else {}
                        choice = {
                            "index": o.index,
                            "delta": delta,
                            "logprobs": logprobs_of(o, t0, t1),
                            "finish_reason": o.finish_reason,
                            "stop_reason": o.stop_reason,
                        }
                        yield P.chat_chunk(rid, model, created, [choice], None, include_usage)
                    if out.finished:
                        observe(out)
                        completion_tokens = sum(len(o.token_ids) for o in out.outputs)
                if include_usage:
                    yield P.chat_chunk(
                        rid, model, created, [], P.usage(len(ids), completion_tokens), True
                    )

            return sse(chunks(), run)

        finals = await collect(run, request)
        if finals is None:
            return Response(status_code=499)
        out = finals[0]
        observe(out)
        choices = [
            {
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": logprobs_of(o, 0, len(o.token_ids)),
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            }
            for o in out.outputs
        ]
        completion_tokens = sum(len(o.token_ids) for o in out.outputs)
        return JSONResponse(
            P.chat_response(rid, model, choices, P.usage(len(ids), completion_tokens))
        )

    # -- the rest ---------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models():
        data = [
            {
                "id": name,
                "object": "model",
                "created": started,
                "owned_by": "rtpjax",
                "root": model_path or name,
                "parent": None,
                "max_model_len": max_model_len,
            }
            for name in names
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        if engine.accepting:
            return {"status": "ok"}
        state = "stopping" if engine.is_running else "engine stopped"
        return JSONResponse(P.error_body(503, state), status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(engine.snapshot), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise P.APIError(
                400,
                "give exactly one of 'prompt' or 'messages'",
                param="prompt",
                code="invalid_value",
            )
        if body.prompt is not None:
            ids = await encode(body.prompt, body.add_special_tokens)
        else:
            ids = await render_chat(body.messages, body.add_generation_prompt, None, None)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise P.APIError(
                400,
                f"tokens contains {bad[0]}, outside the vocabulary [0, {tokenizer.vocab_size})",
                param="tokens",
                code="invalid_value",
            )
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/debug/engine")
    async def debug_engine():
        snap = engine.snapshot._asdict()
        return {
            **snap,
            "accepting": engine.accepting,
            "error": engine.error,
            "max_waiting": engine.max_waiting,
        }

    return app


def _message_dict(m: P.ChatMessage, i: int) -> dict:
    d = m.model_dump(exclude_none=True)
    if isinstance(m.content, list):
        texts = []
        for part in m.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise P.APIError(
                    400,
                    f"messages[{i}].content: only text parts are supported "
                    f"(got type {part.get('type')!r})",
                    param=f"messages[{i}].content",
                    code="invalid_value",
                )
            texts.append(part["text"])
        d["content"] = "\n".join(texts)
    return d


async def _completion_prompts(prompt, encode) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        return [(prompt, await encode(prompt))]
    if not prompt:
        raise P.APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if all(isinstance(t, int) for t in prompt):
        return [(None, list(prompt))]
    out = []
    for p in prompt:
        out.append((p, await encode(p)) if isinstance(p, str) else (None, list(p)))
    return out


# -- the runner -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_server(args)


def run_server(args: ServerArgs) -> int:
    """Load, warm up, listen, print the address line, serve until SIGTERM/SIGINT; exit status."""
    import uvicorn

    from rtpjax.engine.async_engine import warm_up
    from rtpjax.engine.llm import LLM

    _configure_logging(args.log_level)
    try:
        llm = LLM(
            args.model,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_memory_fraction=args.kv_cache_memory_fraction,
            enable_prefix_caching=args.enable_prefix_caching,
            tensor_parallel_size=args.tensor_parallel_size,
            dtype=args.dtype,
            seed=args.seed,
            progress=True,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = AsyncLLMEngine(llm.engine, max_waiting=args.max_waiting_requests)
    engine.start()
    if args.warmup:
        print(
            "warming up: compiling the common step shapes (prefill and decode, greedy and "
            "sampled)...",
            file=sys.stderr,
            flush=True,
        )
        seconds = engine.call_sync(warm_up)
        variants = engine.call_sync(lambda e: e.runner.num_compiled_variants)
        print(
            f"warm-up done in {seconds:.1f} s ({variants} compiled step variants)",
            file=sys.stderr,
            flush=True,
        )
    cfg = llm.engine.config
    app = build_app(
        engine,
        llm.tokenizer,
        args,
        model_name=llm.model.name,
        max_model_len=cfg.max_model_len,
        vocab_size=llm.model.config.vocab_size,
        model_path=llm.model.path,
    )
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.create_server((args.host, args.port), family=family, backlog=2048)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        engine.stop()
        return 2
    port = sock.getsockname()[1]
    debug = args.log_level == "debug"
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=debug,
        log_level="debug" if debug else "warning",
        timeout_graceful_shutdown=args.drain_timeout,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it is done; with these handlers in place
    # that is a no-op, so a drained SIGTERM exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    names = args.served_model_name or (llm.model.name,)
    print(f"rtpjax serving {names[0]} on http://{host}:{port}", flush=True)
    server.run(sockets=[sock])
    engine.stop()
    engine.join(10.0)
    return 0


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if level != "debug":
        logging.getLogger("jax").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'"
        logging.getLogger("uvicorn").setLevel(logging.WARNING)
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
