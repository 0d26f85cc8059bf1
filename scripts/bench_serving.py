"""Load generator for any OpenAI-compatible server: latency percentiles, throughput, goodput.

    python scripts/bench_serving.py --base-url http://127.0.0.1:8000 --num-prompts 200 \
        --concurrency 1,8,32,64 --random-input-len 512 --random-output-len 128 --out bench.json
    python scripts/bench_serving.py --request-rate 4 --dataset prompts.jsonl --endpoint chat

Traffic: fixed concurrency (N clients, each sending its next request when the last one ends) or a
Poisson process at --request-rate requests/s (optionally capped by --concurrency). Prompts:
random token ids (exact lengths; sent as token-id prompts, so no tokenizer is needed here) or a
JSONL file, one {"prompt": str} or {"messages": [...]} per line, with an optional "max_tokens".

Every request streams (SSE). Measured per request: TTFT (send → first text), inter-token latency
(gaps between text chunks), time per output token ((end − first) / (tokens − 1)) and end-to-end
latency; reported at mean/P50/P95/P99, with request and token throughput and goodput (requests/s
meeting every --goodput target, e.g. `--goodput ttft:500 tpot:50` in ms). Prints a table per run and
writes all runs as JSON (--out).

Dependency-free on purpose (stdlib asyncio HTTP/1.1, http and https), so it runs on a GPU image
that lacks httpx/aiohttp/openai.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import random
import ssl
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# Random prompts draw ids from here: inside any real vocabulary, past most special tokens.
DEFAULT_VOCAB = (1000, 20000)
_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case "
    "point government company number group problem fact"
)
WORDS = tuple(_WORDS.split())  # chat prompts of random words, about one token each


# -- a minimal streaming HTTP client --------------------------------------------------------------


@dataclasses.dataclass
class Target:
    scheme: str
    host: str
    port: int
    base_path: str
    api_key: str | None

    @classmethod
    def parse(cls, url: str, api_key: str | None) -> Target:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"--base-url={url!r} must look like http://host:port")
        port = u.port or (443 if u.scheme == "https" else 80)
        return cls(u.scheme, u.hostname, port, u.path.rstrip("/"), api_key)


class HTTPError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


async def _open(t: Target):
    ctx = ssl.create_default_context() if t.scheme == "https" else None
    return await asyncio.open_connection(t.host, t.port, ssl=ctx, limit=2**22)


def _request_bytes(t: Target, method: str, path: str, body: bytes | None) -> bytes:
    lines = [
        f"{method} {t.base_path}{path} HTTP/1.1",
        f"Host: {t.host}:{t.port}",
        "Connection: close",
        "Accept: text/event-stream, application/json",
    ]
    if t.api_key:
        lines.append(f"Authorization: Bearer {t.api_key}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def _body_chunks(
    reader: asyncio.StreamReader, headers: dict[str, str]
) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while chunk := await reader.read(65536):
            yield chunk


async def _send(t: Target, method: str, path: str, payload: dict | None):
    reader, writer = await _open(t)
    body = None if payload is None else json.dumps(payload).encode()
    writer.write(_request_bytes(t, method, path, body))
    await writer.drain()
    status_line = (await reader.readline()).decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        writer.close()
        raise HTTPError(0, f"bad status line {status_line!r}")
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers, reader, writer


async def get_json(t: Target, path: str) -> dict:
    status, headers, reader, writer = await _send(t, "GET", path, None)
    try:
        data = b"".join([c async for c in _body_chunks(reader, headers)])
    finally:
        writer.close()
    if status != 200:
        raise HTTPError(status, data.decode("utf-8", "replace"))
    return json.loads(data)


async def stream_events(t: Target, path: str, payload: dict) -> AsyncIterator[dict]:
    """POST and yield each SSE `data:` JSON object (until [DONE])."""
    status, headers, reader, writer = await _send(t, "POST", path, payload)
    try:
        if status != 200:
            data = b"".join([c async for c in _body_chunks(reader, headers)])
            raise HTTPError(status, data.decode("utf-8", "replace"))
        buf = b""
        async for chunk in _body_chunks(reader, headers):
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.splitlines():
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    yield json.loads(data)
    finally:
        writer.close()


# -- requests and their timings -------------------------------------------------------------------


@dataclasses.dataclass
class Prompt:
    prompt: str | list[int] | None
    messages: list[dict] | None
    input_len: int | None  # tokens, when known
    max_tokens: int


@dataclasses.dataclass
class Result:
    ok: bool
    error: str | None = None
    input_len: int | None = None
    output_len: int = 0
    ttft: float | None = None  # seconds
    e2e: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    start: float = 0.0

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_len < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)


def random_prompts(
    n: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab: tuple[int, int],
    rng: random.Random,
    chat: bool,
) -> list[Prompt]:
    out = []
    for _ in range(n):
        lo = max(1, int(input_len * (1 - range_ratio)))
        il = rng.randint(lo, max(lo, input_len))
        ol = rng.randint(max(1, int(output_len * (1 - range_ratio))), max(1, output_len))
        if chat:  # chat needs text: random words, about one token each
            text = " ".join(rng.choice(WORDS) for _ in range(il))
            out.append(Prompt(None, [{"role": "user", "content": text}], None, ol))
        else:
            out.append(Prompt([rng.randrange(*vocab) for _ in range(il)], None, il, ol))
    return out


def file_prompts(path: str, n: int, output_len: int, chat: bool) -> list[Prompt]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
            text, messages = d.get("prompt"), d.get("messages")
            if text is None and messages is None:
                raise ValueError(f"{path}:{lineno}: needs a 'prompt' or 'messages' field")
            if chat and messages is None:
                messages = [{"role": "user", "content": text}]
            if not chat and text is None:
                text = "\n".join(str(m.get("content", "")) for m in messages)
            mt = int(d.get("max_tokens", output_len))
            rows.append(Prompt(None if chat else text, messages if chat else None, None, mt))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return [rows[i % len(rows)] for i in range(n)]


def payload(p: Prompt, model: str, args: argparse.Namespace) -> dict:
    d = {
        "model": model,
        "max_tokens": p.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        d["ignore_eos"] = True  # vLLM/SGLang/rtpjax extension: exact output lengths
    if p.messages is not None:
        d["messages"] = p.messages
    else:
        d["prompt"] = p.prompt
    return d


async def one_request(t: Target, path: str, body: dict, input_len: int | None) -> Result:
    r = Result(ok=False, input_len=input_len, start=time.perf_counter())
    last = None
    chunks_with_text = 0
    try:
        async for ev in stream_events(t, path, body):
            if "error" in ev:
                raise HTTPError(500, json.dumps(ev["error"]))
            now = time.perf_counter()
            if ev.get("usage"):
                r.output_len = ev["usage"].get("completion_tokens", 0)
                r.input_len = ev["usage"].get("prompt_tokens", r.input_len)
            for c in ev.get("choices", []):
                text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                if not text:
                    continue
                chunks_with_text += 1
                if r.ttft is None:
                    r.ttft = now - r.start
                else:
                    r.itl.append(now - last)
                last = now
        r.e2e = time.perf_counter() - r.start
        if not r.output_len:  # the server sent no usage: count text chunks instead
            r.output_len = chunks_with_text
        r.ok = r.ttft is not None
        if not r.ok:
            r.error = "no text received"
    except (OSError, HTTPError, ValueError, asyncio.IncompleteReadError) as e:
        r.error = str(e) or type(e).__name__
    return r


async def run_load(
    t: Target,
    path: str,
    prompts: list[Prompt],
    model: str,
    args: argparse.Namespace,
    concurrency: int | None,
    rate: float | None,
    rng: random.Random,
) -> tuple[list[Result], float]:
    results: list[Result] = []
    start = time.perf_counter()
    if rate is None:  # fixed concurrency: N workers over one queue
        todo = list(prompts)

        async def worker():
            while todo:
                p = todo.pop(0)
                results.append(await one_request(t, path, payload(p, model, args), p.input_len))

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency or 1))))
    else:  # Poisson arrivals, optionally capped
        sem = asyncio.Semaphore(concurrency) if concurrency else None

        async def fire(p: Prompt):
            if sem is None:
                results.append(await one_request(t, path, payload(p, model, args), p.input_len))
                return
            async with sem:
                results.append(await one_request(t, path, payload(p, model, args), p.input_len))

        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(fire(p)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


# -- statistics -----------------------------------------------------------------------------------


def percentiles(xs: list[float], scale: float = 1e3) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "p50": None, "p95": None, "p99": None}
    s = sorted(xs)

    def q(p: float) -> float:  # linear interpolation, as numpy's default
        k = (len(s) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return (s[lo] + (s[hi] - s[lo]) * (k - lo)) * scale

    return {"mean": statistics.fmean(s) * scale, "p50": q(0.5), "p95": q(0.95), "p99": q(0.99)}


def parse_goodput(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2e") or not value:
            raise ValueError(f"--goodput {item!r}: use ttft:MS, tpot:MS or e2e:MS")
        out[name] = float(value)
    return out


def summarize(results: list[Result], duration: float, slo: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.input_len or 0 for r in ok)

    def meets(r: Result) -> bool:
        got = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
        return all(got[k] is None or got[k] * 1e3 <= v for k, v in slo.items())

    good = [r for r in ok if meets(r)]
    errors = [r.error for r in results if not r.ok]
    return {
        "completed": len(ok),
        "failed": len(errors),
        "errors": sorted(set(errors))[:10],
        "duration_s": duration,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "goodput": len(good) / duration if duration else 0.0,
        "goodput_slo_ms": slo,
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": percentiles([x for r in ok for x in r.itl]),
        "e2e_ms": percentiles([r.e2e for r in ok if r.e2e is not None]),
    }


def print_table(runs: list[dict]) -> None:
    cols = [
        "load",
        "ok",
        "fail",
        "req/s",
        "out tok/s",
        "goodput",
        "TTFT p50/p99 ms",
        "TPOT p50/p99 ms",
        "ITL p50/p99 ms",
        "E2E p50/p99 ms",
    ]
    f = lambda d: "-" if d["p50"] is None else f"{d['p50']:.1f}/{d['p99']:.1f}"
    rows = [
        [
            r["load"],
            str(r["completed"]),
            str(r["failed"]),
            f"{r['request_throughput']:.2f}",
            f"{r['output_throughput']:.1f}",
            f"{r['goodput']:.2f}",
            f(r["ttft_ms"]),
            f(r["tpot_ms"]),
            f(r["itl_ms"]),
            f(r["e2e_ms"]),
        ]
        for r in runs
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


# -- main -----------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            [
                "git",
                "-C",
                os.path.dirname(os.path.abspath(__file__)),
                "rev-parse",
                "--short",
                "HEAD",
            ],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="completions")
    ap.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--num-prompts", type=int, default=100, help="requests per run")
    ap.add_argument(
        "--concurrency",
        default=None,
        help="clients in flight, or a comma list for several runs (e.g. 1,8,32)",
    )
    ap.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="Poisson arrivals per second (inf: all at once); --concurrency caps it",
    )
    ap.add_argument("--dataset", default="random", help="'random' or a JSONL file of prompts")
    ap.add_argument("--random-input-len", type=int, default=128)
    ap.add_argument("--random-output-len", type=int, default=128)
    ap.add_argument(
        "--random-range-ratio", type=float, default=0.0, help="lengths drawn from [len*(1-r), len]"
    )
    ap.add_argument(
        "--vocab-range",
        type=int,
        nargs=2,
        default=DEFAULT_VOCAB,
        metavar=("LO", "HI"),
        help="token ids of random prompts",
    )
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask for exact output lengths (default on)",
    )
    ap.add_argument(
        "--goodput",
        nargs="*",
        default=[],
        metavar="KEY:MS",
        help="latency targets, e.g. ttft:500 tpot:50 e2e:10000",
    )
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured requests first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the runs as JSON here")
    ap.add_argument("--label", default=None, help="free text stored in the JSON (device, model)")
    args = ap.parse_args(argv)
    if args.num_prompts < 1:
        ap.error(f"--num-prompts={args.num_prompts} must be >= 1")
    if args.request_rate is not None and not args.request_rate > 0:
        ap.error(f"--request-rate={args.request_rate} must be > 0 (or inf)")
    try:
        args.concurrency = (
            [int(c) for c in args.concurrency.split(",")] if args.concurrency else None
        )
    except ValueError:
        ap.error(f"--concurrency={args.concurrency!r} must be an int or a comma list of ints")
    if args.concurrency and min(args.concurrency) < 1:
        ap.error("--concurrency values must be >= 1")
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = [1]
    try:
        args.slo = parse_goodput(args.goodput)
    except ValueError as e:
        ap.error(str(e))
    return args


async def amain(args: argparse.Namespace) -> dict:
    t = Target.parse(args.base_url, args.api_key)
    model = args.model
    if model is None:
        model = (await get_json(t, "/v1/models"))["data"][0]["id"]
    chat = args.endpoint == "chat"
    path = ENDPOINTS[args.endpoint]
    rng = random.Random(args.seed)
    if args.dataset == "random":
        prompts = random_prompts(
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            tuple(args.vocab_range),
            rng,
            chat,
        )
    else:
        prompts = file_prompts(args.dataset, args.num_prompts, args.random_output_len, chat)
    for p in prompts[: args.warmup]:
        r = await one_request(t, path, payload(p, model, args), p.input_len)
        if not r.ok:
            raise RuntimeError(f"warm-up request failed: {r.error}")
    runs = []
    if args.request_rate is None:
        loads = args.concurrency
    else:  # one Poisson run, capped by the first --concurrency value if given
        loads = [args.concurrency[0] if args.concurrency else None]
    for c in loads:
        results, duration = await run_load(t, path, prompts, model, args, c, args.request_rate, rng)
        if args.request_rate is None:
            label = f"concurrency {c}"
        else:
            label = f"rate {args.request_rate}/s" + (f" (max {c})" if c else "")
        runs.append(
            {
                "load": label,
                "concurrency": c,
                "request_rate": args.request_rate,
                **summarize(results, duration, args.slo),
            }
        )
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "label": args.label,
        "base_url": args.base_url,
        "model": model,
        "endpoint": path,
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = asyncio.run(amain(args))
    except (OSError, HTTPError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{report['model']} at {report['base_url']}{report['endpoint']}")
    print_table(report["runs"])
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0 if all(r["failed"] == 0 for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
