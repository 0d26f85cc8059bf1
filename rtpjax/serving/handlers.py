"""The endpoint handlers: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics,
/tokenize, /detokenize and /debug/engine.

Handlers never touch the device: they tokenize, hand requests to the AsyncLLMEngine and turn its
cumulative outputs into OpenAI JSON or server-sent events (see `streaming`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from rtpjax.engine.async_engine import AsyncLLMEngine
from rtpjax.engine.outputs import CompletionOutput, RequestOutput
from rtpjax.serving import protocol as P
from rtpjax.serving.metrics import CONTENT_TYPE, ServerMetrics
from rtpjax.serving.streaming import RequestRun, collect, sse
from rtpjax.tokenizer import Tokenizer

# Prompts longer than this many characters are tokenized off the event loop.
_OFFLOOP_CHARS = 8192


def add_routes(
    app: FastAPI,
    engine: AsyncLLMEngine,
    tokenizer: Tokenizer,
    *,
    names: list[str],
    metrics: ServerMetrics,
    max_model_len: int,
    vocab_size: int,
    model_path: str = "",
) -> None:
    """Register every endpoint on `app`; `names[0]` is the model name answers carry."""
    token_text = P.TokenText(tokenizer)
    started = int(time.time())

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

    def observe(out: RequestOutput) -> None:
        if out.finished:
            metrics.observe_finished(out)

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
        run = RequestRun(engine, rid, len(prompts), metrics)
        await run.submit(prompts, params, body.priority, "prompt", stream=bool(body.stream))
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
        run = RequestRun(engine, rid, 1, metrics)
        await run.submit([(None, ids)], params, body.priority, "messages", stream=bool(body.stream))

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
