"""A real server process (scripts/serve.py) on a free loopback port, for the serving tests.

Each test module starts at most one server (module-scoped fixtures) and reuses it; `--port 0` lets
the OS pick the port, which the server prints in its startup line.

Server and offline-engine child processes share a persistent XLA compilation cache under pytest's
cache directory (.pytest_cache/d/rtpjax-xla-cache): a step shape compiled once (about 6 s on this
CPU) is loaded in well under a second by every later process and run. RTPJAX_TEST_XLA_CACHE=off
turns it off; another value is used as the directory.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SERVE = REPO / "scripts" / "serve.py"
STARTUP_TIMEOUT_S = 300.0


def child_env(xla_cache: str | None) -> dict[str, str]:
    """Environment of a child process running the engine on one CPU device."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's server has
    if xla_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = xla_cache
    return env


class ServerProcess:
    """scripts/serve.py in a child process; `wait_ready()` returns once it prints its address."""

    def __init__(self, *args: str, xla_cache: str | None = None):
        self.args = ["--port", "0", *args]
        # Closed in stop(): the log outlives __init__.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="rtpjax-serve-", suffix=".log")  # noqa: SIM115
        env = child_env(xla_cache)
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVE), *self.args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.url: str | None = None
        self.stdout_lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            if line.startswith("rtpjax serving ") and " on http://" in line:
                self.url = line.rsplit(" on ", 1)[1].strip()
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> ServerProcess:
        if not self._ready.wait(timeout) or self.url is None:
            raise RuntimeError(f"server did not start:\n{self.log_tail()}")
        # The socket listens before the line is printed; make sure HTTP answers too.
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server never became healthy:\n{self.log_tail()}")
            time.sleep(0.2)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log_tail(self, n: int = 40) -> str:
        self.log.flush()
        text = pathlib.Path(self.log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-n:] + self.stdout_lines[-5:])

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def xla_cache(request) -> str | None:
    setting = os.environ.get("RTPJAX_TEST_XLA_CACHE", "")
    if setting == "off":
        return None
    if setting:
        return setting
    cache = getattr(request.config, "cache", None)
    if cache is None:  # pytest's cache plugin is off: a per-session directory
        return str(request.getfixturevalue("tmp_path_factory").mktemp("rtpjax-xla-cache"))
    return str(cache.mkdir("rtpjax-xla-cache"))


@pytest.fixture(scope="session")
def engine_env(xla_cache) -> dict[str, str]:
    """Environment for a child process that runs the engine (shares the compilation cache)."""
    return child_env(xla_cache)


@pytest.fixture(scope="session")
def server_factory(xla_cache):
    """start(*args) → a ServerProcess (not yet waited for); every one is stopped at the end."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(*args, xla_cache=xla_cache)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
