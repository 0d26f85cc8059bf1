"""Host cost of launching K decode-like iterations in one jitted call, against one per call.

A stand-in for multi-step decoding (vLLM's num_scheduler_steps): 32 "layers" of a [256, 2048] x
[2048, 2048] bf16 matmul, tanh, residual and RMS norm, then an argmax "sample" fed back as the next
input. Compares K = 1, K = 8 as a `fori_loop` and K = 8 unrolled; host = time until the call
returns, wall = until the result is ready, b2b = 20 calls back to back. Run once per XLA_FLAGS
setting (e.g. --xla_gpu_enable_command_buffer=+WHILE):

    python scripts/bench_loop_launch.py [--layers 32 --batch 256 --width 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def make(k: int, mode: str):
    def layers(x, ws):
        for w in ws:
            x = (x + jnp.tanh(x @ w) * 0.5).astype(jnp.bfloat16)
            ms = jnp.mean(x.astype(jnp.float32) ** 2, -1, keepdims=True)
            x = x * jax.lax.rsqrt(ms + 1e-6).astype(jnp.bfloat16)
        return x

    def step(ws, x, tok):
        def body(_, carry):
            x, tok = carry
            x = layers(x + tok[:, None].astype(jnp.bfloat16), ws)
            return x, jnp.argmax(x, -1).astype(jnp.int32)

        if mode == "loop":
            return jax.lax.fori_loop(0, k, body, (x, tok))
        carry = (x, tok)
        for i in range(k):
            carry = body(i, carry)
        return carry

    return jax.jit(step, donate_argnums=(1, 2))


def measure(step, ws, batch: int, width: int, repeats: int = 20) -> dict:
    def f(x, tok):
        return step(ws, x, tok)

    x, tok = jnp.zeros((batch, width), jnp.bfloat16), jnp.zeros((batch,), jnp.int32)
    t0 = time.perf_counter()
    x, tok = jax.block_until_ready(f(x, tok))
    compile_s = time.perf_counter() - t0
    for _ in range(3):
        x, tok = f(x, tok)
    host, wall = [], []
    for _ in range(repeats):
        jax.block_until_ready(x)
        t0 = time.perf_counter()
        x, tok = f(x, tok)
        t1 = time.perf_counter()
        jax.block_until_ready(x)
        host.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(repeats):
        x, tok = f(x, tok)
    t1 = time.perf_counter()
    jax.block_until_ready(x)
    t2 = time.perf_counter()
    return {
        "compile_s": round(compile_s, 2),
        "host_ms": round(float(np.median(host)) * 1e3, 3),
        "wall_ms": round(float(np.median(wall)) * 1e3, 3),
        "b2b_host_ms_per_call": round((t1 - t0) / repeats * 1e3, 3),
        "b2b_wall_ms_per_call": round((t2 - t0) / repeats * 1e3, 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=2048)
    args = ap.parse_args(argv)
    key = jax.random.key(0)
    ws = [
        jax.random.normal(jax.random.fold_in(key, i), (args.width, args.width), jnp.bfloat16) * 0.02
        for i in range(args.layers)
    ]
    res: dict = {"device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS")}
    for k, mode in [(1, "unrolled"), (8, "loop"), (8, "unrolled")]:
        res[f"K{k}_{mode}"] = measure(make(k, mode), ws, args.batch, args.width)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
