"""Helpers shared by scripts/bench_attention.py's sections: logging, timing, the HBM copy
ceiling, random paged problems, the kernels under test (and --decode-configs' shapes), the
reference and relative errors, the printed tables.

INTERPRET (set by bench_attention.py --smoke) runs the GPU kernel in interpret mode on tiny shapes,
a CPU check of the benchmark itself.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rtpjax.kernels import ragged_paged_attention as rpa
from rtpjax.kernels import ragged_paged_attention_gpu as gpu

T0 = time.time()
LOG: list[str] = []
INTERPRET = False  # --smoke (see the module docstring)


def run_info() -> dict:
    """Device, platform, jax version, UTC date and commit of a benchmark run (RTPJAX_COMMIT
    first: the device machine's copy has no .git)."""
    commit = os.environ.get("RTPJAX_COMMIT")
    if not commit:
        try:
            commit = subprocess.check_output(
                ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
            ).strip()
        except Exception:
            commit = "unknown"
    dev = jax.devices()[0]
    return dict(
        device=dev.device_kind, platform=dev.platform, jax=jax.__version__, commit=commit,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )  # fmt: skip


def say(msg: str) -> None:
    line = f"[{time.time() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    LOG.append(line)


def median_time(fn, *args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB elementwise pass (the decode ceiling)."""
    x = jax.random.normal(jax.random.key(0), (1 << (20 if INTERPRET else 30),), jnp.bfloat16)
    iters = 20

    @jax.jit
    def f(x):
        return lax.fori_loop(0, iters, lambda i, y: y + jnp.bfloat16(1), x)

    t = median_time(f, x) / iters
    return 2 * x.nbytes / t


def loop_overhead(iters: int = 200) -> float:
    x = jnp.ones((256, 32, 128), jnp.bfloat16)

    @jax.jit
    def f(x):
        return lax.fori_loop(0, iters, lambda i, y: y * jnp.bfloat16(1.0001), x)

    return median_time(f, x) / iters


def read_floor(nbytes: int, iters: int) -> float:
    """Seconds per call of the cheapest read of `nbytes` through the same chained fori_loop that
    `timed` uses: a sum over a window of that many bytes, each iteration a different window of a
    buffer of >= 400 MB (so nothing comes from the 50 MB L2). The honest floor for a small decode
    call, whose bytes take less time to stream than a kernel takes to start and drain."""
    n = max(1024, min(nbytes // 2, 1 << 30) // 1024 * 1024)  # bf16 elements per window, <= 2 GB
    scale = max(1.0, nbytes / (2 * n))  # past 2 GB the read runs at its asymptote: scale it
    sets = int(min(128, max(2, -(-400_000_000 // (2 * n))))) if not INTERPRET else 2
    buf = jnp.ones((sets * n,), jnp.bfloat16)

    @jax.jit
    def f(buf):
        def body(i, acc):
            w = lax.dynamic_slice(buf, ((i % sets) * n,), (n,))
            return acc + jnp.sum(w.reshape(-1, 1024).astype(jnp.float32), axis=0)

        return lax.fori_loop(0, iters, body, jnp.zeros((1024,), jnp.float32))

    t = median_time(f, buf) / iters
    del buf
    return scale * t


def copy_device_us(nbytes: int, reps: int = 30) -> float:
    """Device µs (profiler) of an XLA elementwise pass that reads nbytes / 2 and writes nbytes / 2,
    each call over a different window of >= 400 MB: the copy ceiling at this size, where a
    kernel's start and drain weigh as much as its bytes."""
    from scripts.device_profile import kernel_times

    n = max(1024, min(nbytes // 4, 1 << 29))  # bf16 elements read (and written), <= 2 GB
    scale = max(1.0, nbytes / (4 * n))  # past 2 GB the copy runs at its asymptote: scale it
    sets = int(min(64, max(2, -(-400_000_000 // (2 * n))))) if not INTERPRET else 2
    buf = jnp.ones((sets * n,), jnp.bfloat16)
    f = jax.jit(lambda b, i: lax.dynamic_slice(b, (i * n,), (n,)) + jnp.bfloat16(1))
    us, _ = kernel_times(lambda i: f(buf, i % sets), 2 if INTERPRET else reps)
    return scale * sum(us.values()) or float("nan")  # nan: no GPU in the trace (--smoke)


def layer_device_us(pr, fn, layers: int = 8, reps: int = 10) -> tuple[float, dict[str, float]]:
    """Device µs per call (profiler) as the engine's step pays it: `layers` calls in one jit
    sharing the step's metadata (XLA computes what they share once), each over its own page
    table set, the sets rotating between repetitions so the KV never comes from L2. Returns the
    time per call and the per-kernel split (µs per call)."""
    from scripts.device_profile import kernel_times

    sets = pr["tables"].shape[0]
    tables = [pr["tables"][j] for j in range(sets)]  # sliced before the trace
    step = jax.jit(lambda q, kv, kl, ts, cu, ns: tuple(fn(q, kv, kl, t, cu, ns) for t in ts))

    def call(i):
        ts = tuple(tables[(i * layers + j) % sets] for j in range(layers))
        return step(pr["q"], pr["kv"], pr["kv_lens"], ts, pr["cu"], pr["ns"])

    jax.block_until_ready(call(0))
    us, _ = kernel_times(call, 2 if INTERPRET else reps)
    per = {k: v / layers for k, v in us.items()}
    return sum(per.values()) or float("nan"), per


# ----------------------------------------------------------------------------- problem setup


def make_problem(rng, q_lens, kv_lens, *, K=8, G=4, H=128, page_size=16, dtype=jnp.bfloat16,
                 B=None, T=None, sets=1, nan_fill=True):  # fmt: skip
    """Random paged problem; `sets` page tables over disjoint shuffled page sets."""
    n = len(q_lens)
    B = B or n
    pages = [-(-k // page_size) for k in kv_lens]
    pps = max(pages)
    P = sets * sum(pages) + 1
    key = jax.random.key(int(rng.integers(1 << 30)))
    page_elems = page_size * 2 * K * H
    if P * page_elems <= (1 << 31):
        kv = jax.random.normal(key, (P, page_size, 2 * K, H), dtype)
    else:  # huge pools: tile 2^31 random values (generating all at once needs 2x the memory)
        blk = jax.random.normal(key, ((1 << 31) // page_elems, page_size, 2 * K, H), dtype)
        kv = jnp.tile(blk, (-(-P // blk.shape[0]), 1, 1, 1))[:P]
    if nan_fill:  # page 0 (the null page) holds NaN: a stray read shows
        kv = kv.at[0].set(jnp.nan)
    perm = rng.permutation(np.arange(1, P)).astype(np.int32)
    tables = np.zeros((sets, B, pps), np.int32)
    c = 0
    for s in range(sets):
        for b, np_ in enumerate(pages):
            tables[s, b, :np_] = perm[c : c + np_]
            c += np_
    T = T or sum(q_lens)
    q = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), (T, K * G, H), dtype)
    cu = np.zeros(B + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(q_lens)
    cu[n + 1 :] = cu[n]
    kvl = np.zeros(B, np.int32)
    kvl[:n] = kv_lens
    return dict(
        q=q, kv=kv, kv_lens=jnp.asarray(kvl), tables=jnp.asarray(tables), cu=jnp.asarray(cu),
        ns=jnp.asarray([n], jnp.int32),
    )  # fmt: skip


def attn_fn(impl: str, config=None, **kw):
    if impl == "gpu":
        return lambda q, kv, kl, pt, cu, ns: gpu.gpu_ragged_paged_attention(
            q, kv, kl, pt, cu, ns, config=config, interpret=INTERPRET, **kw
        )
    return lambda q, kv, kl, pt, cu, ns: rpa.ragged_paged_attention(
        q, kv, kl, pt, cu, ns, impl=impl, **kw
    )


def timed(pr, fn, iters: int, unroll: bool = False) -> float:
    """Seconds per call: `iters` chained calls in a fori_loop, or (unroll) in straight-line code,
    which is what the engine's jitted step runs (no per-iteration loop control)."""
    sets = pr["tables"].shape[0]

    @jax.jit
    def loop(q, kv, kl, tables, cu, ns):
        def body(i, q):
            out = fn(q, kv, kl, tables[i % sets], cu, ns)
            return q + out * jnp.zeros((), out.dtype)  # a real dependency, numerically a no-op

        if unroll:
            for i in range(iters):
                q = body(i, q)
            return q
        return lax.fori_loop(0, iters, body, q)

    args = (pr["q"], pr["kv"], pr["kv_lens"], pr["tables"], pr["cu"], pr["ns"])
    return median_time(loop, *args) / iters


def reference(pr, **kw) -> jax.Array:
    args = (pr["q"], pr["kv"], pr["kv_lens"], pr["tables"][0], pr["cu"], pr["ns"])
    return jax.jit(lambda *a: rpa.ref_ragged_paged_attention(*a, **kw))(*args)


def rel_err(out, ref, n_valid: int) -> tuple[float, bool]:
    o = np.asarray(out[:n_valid], np.float64)
    r = np.asarray(ref[:n_valid], np.float64)
    tail_ok = bool(np.isfinite(np.asarray(out[n_valid:], np.float32)).all())
    if not np.isfinite(o).all():
        return float("nan"), tail_ok
    return float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30)), tail_ok


def check(pr, fn, ref=None, **kw) -> float:
    args = (pr["q"], pr["kv"], pr["kv_lens"], pr["tables"][0], pr["cu"], pr["ns"])
    out = jax.jit(fn)(*args)
    if ref is None:
        ref = reference(pr, **kw)
    err, tail_ok = rel_err(out, ref, int(pr["cu"][int(pr["ns"][0])]))
    if not tail_ok:
        return float("nan")
    return err


# ----------------------------------------------------------------------------- shapes, tables


def print_decode_table(results, copy_bw: float, key: str = "decode") -> None:
    print("\n=== decode: device time per call in an 8-layer step (profiler) against the copy "
          f"bandwidth {copy_bw / 1e12:.2f} TB/s and against a copy of the same bytes; then the "
          "fori_loop time (includes the loop's own cost) ===")  # fmt: skip
    for r in results[key]:
        if "time_us" in r:
            print(f"B={r['batch']:<4} ctx={r['context']:<6} device {r['device_us']:8.1f} us "
                  f"{r['device_tb_s']:5.2f} TB/s {r['device_frac_copy']:6.1%} of copy; "
                  f"same-bytes copy {r['copy_device_us']:7.1f} us "
                  f"({r['frac_copy_same_bytes']:6.1%}) | loop {r['time_us']:8.1f} us "
                  f"{r['frac_copy']:6.1%}  err {r['rel_err']:.1e}"
                  + (f"  {r['config']}" if key != "decode" else ""))  # fmt: skip


def decode_configs(spec: str):
    """--decode-configs: a function (B, ctx) -> [GpuConfig | None] for decode_section. Items:
    `default` (choose_config) or SPLITS/BLOCK_S/STAGES[/WARPS], SPLITS an integer or `sm`,
    `2sm`... (that many programs per multiprocessor: multiprocessors x n // (B x 8 kv heads))."""
    items = []
    for item in spec.split(","):
        if item == "default":
            items.append(None)
            continue
        parts = item.split("/")
        if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(
                f"--decode-configs: {item!r} is not `default` or SPLITS/BLOCK_S/STAGES[/WARPS]"
            )
        splits = parts[0]
        if not (splits.isdigit() or splits == "sm" or splits.removesuffix("sm").isdigit()):
            raise ValueError(f"--decode-configs: splits {splits!r} must be an integer or Nsm")
        items.append((splits, *(int(p) for p in parts[1:])))

    def configs(B, ctx):
        out = []
        for it in items:
            if it is None:
                out.append(None)
                continue
            splits, bs, stages, *warps = it
            if splits.endswith("sm"):
                per_sm = int(splits.removesuffix("sm") or 1)
                splits = max(1, min(gpu.MAX_SPLITS, gpu._sm_count() * per_sm // (B * 8)))
            out.append(gpu.GpuConfig(16, bs, int(splits), warps[0] if warps else 4, stages, 0))
        return out

    return configs


def print_prefix_table(results) -> None:
    print("=== prefill over a cached prefix (ours: two cuDNN calls + LSE merge) ===")
    for r in results.get("prefix_prefill", []):
        if "time_us" in r:
            print(f"{r['seqs']} x (chunk {r['chunk']:<5} prefix {r['prefix']:<5})"
                  f" {r['tflops']:6.1f} TFLOP/s"
                  f"  plain cuDNN {r.get('cudnn_tflops', float('nan')):6.1f}"
                  f"  ratio {r.get('vs_cudnn', float('nan')):.2f}"
                  f"  vs paged {r.get('vs_paged', float('nan')):.2f}"
                  f"  err {r['rel_err']:.1e}")  # fmt: skip
