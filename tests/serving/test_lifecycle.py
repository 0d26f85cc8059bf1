"""A small server (2 running slots, 1 waiting, an API key, 64-token context): authentication, the
full-queue 429, a bounded schemathesis fuzz run, and SIGTERM draining (last: it stops the server).
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny"


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory(
        "--max-model-len",
        "64",
        "--max-num-seqs",
        "2",
        "--max-waiting-requests",
        "1",
        "--api-key",
        KEY,
        "--served-model-name",
        NAME,
        "other-name",
        "--no-warmup",
        "--drain-timeout",
        "60",
    ).wait_ready()


def _client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=300)


def _wait_idle(server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        d = httpx.get(f"{server.url}/debug/engine", headers=AUTH, timeout=30).json()
        if d["running"] == d["waiting"] == d["used_pages"] == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still busy: {d}")
        time.sleep(0.2)


def test_api_key(server):
    with pytest.raises(openai.AuthenticationError) as e:
        _client(server, "wrong").completions.create(model=NAME, prompt="hi", max_tokens=1)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "hi"})
    assert r.status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # open, for load balancers
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    models = _client(server).models.list()
    assert [m.id for m in models.data] == [NAME, "other-name"]
    r = _client(server).completions.create(
        model="other-name", prompt="hi", max_tokens=2, temperature=0
    )
    assert r.model == "other-name" and r.usage.completion_tokens >= 1


def test_queue_full_gets_429_with_retry_after(server):
    async def run():
        c = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=300)
        kw = dict(
            model=NAME,
            prompt="Count: one, two,",
            max_tokens=50,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        running = [await c.completions.create(**kw) for _ in range(2)]
        for s in running:  # both hold a running slot once they stream
            await s.__aiter__().__anext__()
        waiting = await c.completions.create(**kw)  # accepted: one sequence may wait
        with pytest.raises(openai.RateLimitError) as e:
            await c.completions.create(**kw)
        for s in [*running, waiting]:
            await s.close()
        await c.close()
        return e.value

    err = asyncio.run(run())
    assert err.status_code == 429
    assert int(err.response.headers["retry-after"]) >= 1
    assert err.body["code"] == "queue_full" and err.body["type"] == "rate_limit_error"
    _wait_idle(server)


def test_schemathesis_finds_no_server_error(server, tmp_path, phases="fuzzing", examples=6):
    """Bounded fuzzing of every operation in /openapi.json: no 5xx, no crash, still healthy."""
    st = pathlib.Path(sys.executable).with_name("schemathesis")
    cmd = [
        str(st),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--phases",
        phases,
        "--max-examples",
        str(examples),
        "--seed",
        "7",
        "--workers",
        "1",
        "--request-timeout",
        "120",
        "--suppress-health-check",
        "all",
        "--no-shrink",
        "-H",
        f"Authorization: Bearer {KEY}",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
    assert httpx.get(f"{server.url}/health").status_code == 200
    report = next(tmp_path.rglob("*.xml")).read_text()
    assert "/v1/completions" in report and "/v1/chat/completions" in report
    _wait_idle(server)


@pytest.mark.slow
def test_schemathesis_coverage_and_long_fuzz(server, tmp_path):
    """The coverage phase (boundary values of every field, ~700 cases) plus a longer fuzz."""
    test_schemathesis_finds_no_server_error(server, tmp_path, "coverage,fuzzing", 50)


def _stream(url: str, body: dict, events: list, started: threading.Event) -> None:
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        events.append(r.status_code)
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()
    started.set()


def test_sigterm_drains_in_flight_requests(server):
    body = {
        "model": NAME,
        "prompt": "Count: one, two,",
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    events: list[list] = [[], []]
    started = [threading.Event(), threading.Event()]
    threads = [
        threading.Thread(target=_stream, args=(server.url, body, events[i], started[i]))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for s in started:
        assert s.wait(120)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(90)
    for t in threads:
        t.join(30)
    assert code == 0, server.log_tail()
    assert time.monotonic() - t0 < 60
    for ev in events:  # both streams ran to the end: 12 tokens, usage, [DONE]
        assert ev[0] == 200 and ev[-1] == "[DONE]", ev[-3:]
        chunks = [json.loads(e) for e in ev[1:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == 12
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    with pytest.raises(httpx.ConnectError):  # no longer listening
        httpx.get(f"{server.url}/health", timeout=5)
