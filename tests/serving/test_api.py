"""The OpenAI endpoints against a real server process, driven by the official `openai` client.

Greedy text must equal the offline engine's (`LLM(...).generate` / `.chat` with the same settings,
run in a child process while the server starts) for non-streaming and streaming, sync and async
clients, and 64 concurrent streams.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import pathlib
import subprocess
import sys
import time

import httpx
import openai
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SETTINGS = {"max_model_len": 512, "max_num_seqs": 64}
PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Once upon a time, there was a",
    "The best way to learn programming is",
    "In 1969, the first man on the moon",
    "My favourite food is",
    "Water boils at a temperature of",
    "The three primary colours are",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour."},
    ],
]
MAX_TOKENS = 12
STOP = ["coach", "\n"]
GREEDY = {"temperature": 0.0, "max_tokens": MAX_TOKENS}
REQUESTS = [
    *({"prompt": p, "params": GREEDY} for p in PROMPTS),
    *({"messages": c, "params": GREEDY} for c in CHATS),
    {"prompt": PROMPTS[0], "params": {**GREEDY, "stop": STOP}},
]


@pytest.fixture(scope="module")
def server_proc(server_factory):
    return server_factory(
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "64",
        "--config",
        str(REPO / "configs" / "serve" / "default.yaml"),
    )


@pytest.fixture(scope="module")
def expected(server_proc, engine_env) -> dict:
    """The offline engine's outputs for JOBS (computed while the server process starts)."""
    p = subprocess.run(
        [sys.executable, str(REPO / "tests" / "serving" / "offline_expected.py")],
        input=json.dumps({"settings": SETTINGS, "requests": REQUESTS}),
        capture_output=True,
        text=True,
        env=engine_env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout)
    res, ids = got["outputs"], got["prompt_ids"]
    n = len(PROMPTS)
    return {
        "prompt_ids": {q: i for q, i in zip(PROMPTS, ids[:n])},
        "chat_ids": ids[n : n + len(CHATS)],
        "texts": {q: r["text"] for q, r in zip(PROMPTS, res[:n])},
        "chats": [r["text"] for r in res[n : n + len(CHATS)]],
        "stop": (res[-1]["text"], res[-1]["finish_reason"]),
    }


@pytest.fixture(scope="module")
def server(server_proc, expected):
    return server_proc.wait_ready()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)


def _debug(server) -> dict:
    return httpx.get(f"{server.url}/debug/engine", timeout=30).json()


def _wait_idle(server, timeout: float = 60.0) -> dict:
    """Poll /debug/engine until no sequence runs or waits and no KV page is in use."""
    deadline = time.monotonic() + timeout
    while True:
        d = _debug(server)
        if d["running"] == 0 and d["waiting"] == 0 and d["used_pages"] == 0:
            return d
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still busy after {timeout} s: {d}")
        time.sleep(0.2)


# -- equality with the offline engine -------------------------------------------------------------


def test_completions_match_offline_sync(server, client, expected):
    texts = expected["texts"]
    # Several prompts in one request: one choice each, in order.
    r = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPTS[:3], max_tokens=MAX_TOKENS, temperature=0
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [texts[p] for p in PROMPTS[:3]]
    assert [c.finish_reason for c in r.choices] == ["length"] * 3
    assert r.usage.completion_tokens == 3 * MAX_TOKENS


def test_streams_match_offline_async(server, expected):
    texts, chats = expected["texts"], expected["chats"]

    async def completion(c):
        stream = await c.completions.create(
            model="SmolLM2-135M-Instruct",
            prompt=PROMPTS[4],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
            if chunk.usage is not None:
                usage = chunk.usage
        return pieces, usage

    async def chat(c):
        stream = await c.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=CHATS[0],
            max_completion_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
        )
        return [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]

    async def run():
        c = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=300)
        (pieces, usage), chat_pieces = await asyncio.gather(completion(c), chat(c))
        await c.close()
        return pieces, usage, chat_pieces

    pieces, usage, chat_pieces = asyncio.run(run())
    assert "".join(pieces) == texts[PROMPTS[4]]
    assert usage.completion_tokens == MAX_TOKENS and usage.prompt_tokens > 0
    # One token per chunk where the text allows (a token can be part of a UTF-8 character).
    assert MAX_TOKENS - 2 <= len([p for p in pieces if p]) <= MAX_TOKENS
    assert "".join(chat_pieces) == chats[0]


def test_chat_matches_offline_sync(server, client, expected):
    chats = expected["chats"]
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=CHATS[1], max_tokens=MAX_TOKENS, temperature=0
    )
    assert r.choices[0].message.content == chats[1]
    assert r.choices[0].message.role == "assistant"


def test_64_concurrent_streams(server, expected):
    texts = expected["texts"]

    async def one(c, prompt):
        stream = await c.completions.create(
            model="SmolLM2-135M-Instruct",
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
        )
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def run():
        c = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(64)]
        got = await asyncio.gather(*(one(c, p) for p in prompts))
        await c.close()
        return prompts, got

    prompts, got = asyncio.run(run())
    wrong = [(p, g) for p, g in zip(prompts, got) if g != texts[p]]
    assert not wrong, f"{len(wrong)} of 64 streams differ, e.g. {wrong[0]}"
    _wait_idle(server)


def test_disconnect_frees_pages(server):
    async def run():
        c = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=300)
        streams = [
            await c.completions.create(
                model="SmolLM2-135M-Instruct",
                prompt=p,
                max_tokens=400,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for p in PROMPTS[:6]
        ]
        for s in streams:  # read two chunks each, then hang up mid-stream
            it = s.__aiter__()
            await it.__anext__()
            await it.__anext__()
        busy = _debug(server)
        for s in streams:
            await s.close()
        await c.close()
        return busy

    busy = asyncio.run(run())
    assert busy["used_pages"] > 0 and busy["running"] > 0
    # A non-streaming client that times out and leaves aborts its request too.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            f"{server.base_url}/completions",
            timeout=2.0,
            json={"prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True},
        )
    idle = _wait_idle(server)
    assert idle["unfinished_requests"] == 0
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'rtpjax_requests_finished_total{finish_reason="abort"}' in metrics


# -- request options ------------------------------------------------------------------------------


def test_stop_strings_stream_and_not(server, client, expected):
    want_text, want_reason = expected["stop"]
    assert want_reason == "stop"  # the case exercises a stop string
    kw = dict(
        model="SmolLM2-135M-Instruct",
        prompt=PROMPTS[0],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stop=STOP,
    )
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        whole = pool.submit(client.completions.create, **kw)
        chunks = pool.submit(lambda: list(client.completions.create(**kw, stream=True)))
        r, streamed = whole.result(), "".join(ch.choices[0].text for ch in chunks.result())
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want_text, want_reason)
    assert r.choices[0].stop_reason == "coach"  # vLLM's extra field: which stop matched
    assert streamed == want_text  # no prefix of a stop string was ever sent


def test_logprobs_and_echo(server, client, expected):
    r = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and value == pytest.approx(max(top.values()))
        assert top[token] == pytest.approx(value)
    # echo + max_tokens 0 scores the prompt (what evaluation harnesses send).
    r = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt=PROMPTS[1],
        max_tokens=0,
        echo=True,
        logprobs=1,
        temperature=0,
    )
    c = r.choices[0]
    n_prompt = len(expected["prompt_ids"][PROMPTS[1]])
    assert c.text == PROMPTS[1] and r.usage.completion_tokens == 0
    assert len(c.logprobs.tokens) == n_prompt and c.logprobs.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in c.logprobs.token_logprobs[1:])
    # chat: logprobs + top_logprobs
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=CHATS[0],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].token == item.token  # greedy takes the most likely token
        assert item.bytes == list(item.token.encode())


def test_n_seed_and_extra_fields(server, client):
    kw = dict(
        model="SmolLM2-135M-Instruct",
        prompt=PROMPTS[2],
        max_tokens=6,
        temperature=1.0,
        n=2,
        seed=1234,
        extra_body={"best_of": 2, "lora_path": "/nowhere", "user": "u"},
    )
    exact = dict(
        model="SmolLM2-135M-Instruct",
        prompt=PROMPTS[2],
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True, "min_tokens": 5},
    )
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        a, b = (
            pool.submit(client.completions.create, **kw),
            pool.submit(client.completions.create, **kw),
        )
        r = pool.submit(client.completions.create, **exact)
        a, b, r = a.result(), b.result(), r.result()
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert r.usage.completion_tokens == 5


# -- errors ---------------------------------------------------------------------------------------


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def test_error_statuses(server, client):
    url = server.base_url
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="hi " * 600)
    assert e.value.body["param"] == "prompt" and "max_model_len=512" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    r = httpx.post(
        f"{url}/completions",
        content=b'{"prompt": "x", ',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and _error(r)["code"] == "invalid_json"
    r = httpx.post(f"{url}/completions", json={"prompt": None})
    assert r.status_code == 400 and _error(r)["param"] == "prompt"
    r = httpx.post(f"{url}/completions", json={"prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400 and _error(r)["param"] == "max_tokens"
    r = httpx.post(f"{url}/chat/completions", json={"messages": [], "max_tokens": 2})
    assert r.status_code == 400 and _error(r)["param"] == "messages"
    r = httpx.post(
        f"{url}/chat/completions", json={"messages": CHATS[0], "max_tokens": 2, "top_logprobs": 2}
    )
    assert r.status_code == 400 and _error(r)["param"] == "top_logprobs"
    r = httpx.post(f"{url}/completions", json={"prompt": "x", "n": 65})
    assert r.status_code == 400 and "max_num_seqs" in _error(r)["message"]
    r = httpx.post(f"{url}/completions", json={"prompt": [10**12]})
    assert r.status_code == 400 and _error(r)["param"] == "prompt"
    r = httpx.post(f"{url}/completions", json={"prompt": "x", "logit_bias": {"a": 1}})
    assert r.status_code == 400 and _error(r)["param"] == "logit_bias"
    big = b'{"prompt": "' + b"a" * (8 * 2**20) + b'"}'
    r = httpx.post(f"{url}/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"
    r = httpx.get(f"{server.url}/no/such/path")
    assert r.status_code == 404 and _error(r)
    r = httpx.get(f"{url}/completions")
    assert r.status_code == 405 and _error(r)
    assert httpx.get(f"{server.url}/health").status_code == 200  # still up


# -- the other endpoints --------------------------------------------------------------------------


def test_models_tokenize_detokenize(server, client, expected):
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert r["tokens"] == expected["prompt_ids"][PROMPTS[0]] and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 512
    r2 = httpx.post(f"{server.url}/tokenize", json={"messages": CHATS[0]}).json()
    assert r2["tokens"] == expected["chat_ids"][0]
    d = httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}).json()
    assert d["prompt"] == PROMPTS[0]
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [-1]})
    assert bad.status_code == 400 and _error(bad)["param"] == "tokens"


def test_metrics(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "rtpjax_num_requests_running",
        "rtpjax_num_requests_waiting",
        "rtpjax_kv_cache_usage",
        "rtpjax_prefix_cache_hit_rate",
        "rtpjax_time_to_first_token_seconds_bucket",
        "rtpjax_time_per_output_token_seconds_bucket",
        "rtpjax_e2e_request_latency_seconds_bucket",
    ):
        assert name in text, name
    counts = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("rtpjax_") and " " in line
    }
    assert counts['rtpjax_http_requests_total{path="/v1/completions",status="200"}'] >= 1
    assert counts['rtpjax_http_requests_total{path="/v1/completions",status="400"}'] >= 1
    assert counts["rtpjax_time_to_first_token_seconds_count"] >= 1


def test_bench_serving_ci_sized(server, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "bench_serving.py"),
        "--base-url",
        server.url,
        "--num-prompts",
        "4",
        "--concurrency",
        "2,4",
        "--random-input-len",
        "12",
        "--random-output-len",
        "5",
        "--goodput",
        "ttft:60000",
        "tpot:60000",
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(out.read_text())
    assert [r["concurrency"] for r in report["runs"]] == [2, 4]
    for run in report["runs"]:
        assert run["completed"] == 4 and run["failed"] == 0
        assert run["output_tokens"] == 20  # ignore_eos: exact lengths
        assert run["goodput"] == pytest.approx(run["request_throughput"])
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            q = run[key]
            assert 0 < q["p50"] <= q["p95"] <= q["p99"], (key, q)
        assert run["ttft_ms"]["p50"] < run["e2e_ms"]["p50"]
    assert "TTFT p50/p99 ms" in p.stdout
    # Poisson arrivals, chat endpoint, a tight goodput target nobody meets.
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "bench_serving.py"),
        "--base-url",
        server.url,
        "--num-prompts",
        "3",
        "--request-rate",
        "20",
        "--endpoint",
        "chat",
        "--random-input-len",
        "8",
        "--random-output-len",
        "4",
        "--goodput",
        "ttft:0.001",
        "--warmup",
        "0",
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    run = json.loads(out.read_text())["runs"][0]
    assert run["completed"] == 3 and run["request_rate"] == 20 and run["goodput"] == 0
