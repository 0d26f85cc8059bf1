"""The engine side of one HTTP request: `RequestRun` submits its prompts and gathers their outputs;
`collect` waits for the final outputs (aborting when the client leaves) and `sse` streams chunks
as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from rtpjax.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    QueueFullError,
    RequestStream,
)
from rtpjax.engine.outputs import CompletionOutput, RequestOutput
from rtpjax.sampling_params import SamplingParams
from rtpjax.serving import protocol as P
from rtpjax.serving.metrics import ServerMetrics

logger = logging.getLogger("rtpjax.serving")


class RequestRun:
    """The engine requests of one HTTP request (one per prompt), sharing one output queue."""

    def __init__(self, engine: AsyncLLMEngine, rid: str, num_prompts: int, metrics: ServerMetrics):
        self.engine = engine
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids = [f"{rid}-{i}" for i in range(num_prompts)]
        self.index = {sub: i for i, sub in enumerate(self.ids)}
        self.unfinished: set[str] = set()
        self.params: SamplingParams | None = None
        self.kind = "final"
        # Streaming: the engine sends deltas (it then copies nothing per step) and they are joined
        # here into the cumulative outputs the handlers read: (request id, index) → text, ids, lps.
        self._joined: dict[tuple[str, int], list] = {}

    async def submit(
        self,
        prompts: list[tuple[str | None, list[int]]],
        params: SamplingParams,
        priority: int,
        prompt_field: str,
        *,
        stream: bool = True,
    ) -> None:
        """Queue every prompt. Streaming requests get the engine's deltas, joined again in
        `outputs`; without `stream` only finished outputs come back."""
        kind = self.kind = "delta" if stream else "final"
        self.params = params
        adds = [
            self.engine.add_request(
                sub, text, ids, params, priority=priority, out_queue=self.queue, output_kind=kind
            )
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
            yield self._join(item) if self.kind == "delta" else item

    def _join(self, out: RequestOutput) -> RequestOutput:
        """Cumulative text, ids and logprobs so far from the engine's delta output `out`.

        A delta may carry the first characters of a stop string that a later token completes;
        the engine's own cumulative text is cut there, so the joined text is cut the same way
        (at the stop string's first occurrence, which is where the engine found it)."""
        outputs = []
        for o in out.outputs:
            acc = self._joined.setdefault((out.request_id, o.index), ["", [], None])
            acc[0] += o.text
            acc[1].extend(o.token_ids)
            if o.logprobs is not None:
                if acc[2] is None:
                    acc[2] = []
                acc[2].extend(o.logprobs)
            text = acc[0]
            if o.finish_reason == "stop" and isinstance(o.stop_reason, str):
                cut = text.find(o.stop_reason)
                if cut >= 0:
                    keep = self.params is not None and self.params.include_stop_str_in_output
                    text = acc[0] = text[: cut + (len(o.stop_reason) if keep else 0)]
            outputs.append(
                CompletionOutput(
                    o.index,
                    text,
                    acc[1],
                    o.cumulative_logprob,
                    acc[2],
                    o.finish_reason,
                    o.stop_reason,
                )
            )
        return RequestOutput(
            out.request_id,
            out.prompt,
            out.prompt_token_ids,
            out.prompt_logprobs,
            outputs,
            out.finished,
            out.metrics,
            out.error,
        )

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


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(run: RequestRun, request: Request) -> dict[int, RequestOutput] | None:
    """Final outputs, or None when the client went away first (its requests are aborted)."""
    gone = asyncio.ensure_future(_wait_disconnect(request))
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


def sse(gen: AsyncIterator[dict], run: RequestRun) -> StreamingResponse:
    """Stream `gen`'s chunks as server-sent events; whatever is unfinished at the end is aborted."""

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
