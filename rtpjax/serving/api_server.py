"""The OpenAI-compatible HTTP server: the FastAPI app factory and the uvicorn runner.

    python scripts/serve.py [--model PATH] [--port 8000] [--config configs/serve/default.yaml] ...

Settings live in `config` (ServerArgs, flags, YAML), the gate and error JSON in `middleware`, the
endpoints in `handlers`, and the engine side of a request (abort on disconnect, server-sent
events) in `streaming`. Handlers never touch the device: they tokenize, hand requests to the
AsyncLLMEngine (the engine loop on its own thread) and turn its cumulative outputs into OpenAI
JSON or server-sent events. A client that goes away aborts its requests; SIGTERM stops accepting,
lets in-flight requests finish for up to --drain-timeout seconds, and exits 0. See
docs/serving.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys

from fastapi import FastAPI

from rtpjax.engine.async_engine import AsyncLLMEngine
from rtpjax.serving.config import LOG_LEVELS, ServerArgs, parse_args
from rtpjax.serving.handlers import add_routes
from rtpjax.serving.metrics import ServerMetrics
from rtpjax.serving.middleware import Gate, add_error_handlers
from rtpjax.tokenizer import Tokenizer

__all__ = ["LOG_LEVELS", "ServerArgs", "build_app", "main", "parse_args", "run_server"]

logger = logging.getLogger("rtpjax.serving")


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
        Gate, api_key=args.api_key, max_body=args.max_request_body_bytes, metrics=metrics
    )
    add_error_handlers(app)
    add_routes(
        app,
        engine,
        tokenizer,
        names=names,
        metrics=metrics,
        max_model_len=max_model_len,
        vocab_size=vocab_size,
        model_path=model_path,
    )
    return app


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
    from rtpjax import env

    if not env.jax_started():
        env.configure_xla()  # before anything starts jax: rtpjax/env.py
    import jax
    import uvicorn

    from rtpjax.engine.async_engine import warm_up
    from rtpjax.engine.llm import LLM

    _configure_logging(args.log_level)
    if args.compilation_cache_dir and jax.default_backend() != "cpu":
        cache = os.path.expanduser(args.compilation_cache_dir)
        jax.config.update("jax_compilation_cache_dir", cache)
        print(f"compilation cache: {cache}", file=sys.stderr, flush=True)
    try:
        llm = LLM(
            args.model,
            tokenizer=args.tokenizer,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            num_scheduler_steps=args.num_scheduler_steps,
            kv_cache_memory_fraction=args.kv_cache_memory_fraction,
            enable_prefix_caching=args.enable_prefix_caching,
            tensor_parallel_size=args.tensor_parallel_size,
            attention_impl=args.attention_impl,
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
            "warming up: compiling the step shapes (prefill and decode, greedy and sampled; on "
            "accelerators every batch and token bucket)...",
            file=sys.stderr,
            flush=True,
        )
        full = jax.default_backend() != "cpu"
        seconds = engine.call_sync(lambda e: warm_up(e, full=full))
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
