"""The server's edge: the ASGI gate (API key, body size cap, per-status request counter) and the
exception handlers that turn every failure into OpenAI's error JSON."""

from __future__ import annotations

import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rtpjax.serving import protocol as P
from rtpjax.serving.metrics import ServerMetrics

logger = logging.getLogger("rtpjax.serving")

_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


class Gate:
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


def add_error_handlers(app: FastAPI) -> None:
    """Answer API errors, validation errors, HTTP errors and crashes with OpenAI's error JSON."""

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
