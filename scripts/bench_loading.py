"""Time until a Llama-3-8B-shaped bf16 checkpoint's weights are on the device, cold and warm.

    python scripts/bench_loading.py                      # the full benchmark (~16 GB, 4 shards)
    python scripts/bench_loading.py --layers 2 --vocab 32000 --methods rtpjax   # a quick smoke run

Writes a random checkpoint (config.json, 4 safetensors shards, index), measures the machine's
limits (O_DIRECT disk reads, pinned/pageable host-to-device copies), then loads it with (a) rtpjax's
fast loader, (b) safetensors.flax + jax.device_put, (c) transformers onto CUDA (if installed), each
in a fresh process, cold (page cache dropped: fadvise DONTNEED, and drop_caches where root; the
JSON says which worked and what stayed resident, by mincore) and warm. Prints a table with the
limits beside each figure, writes JSON (--json), deletes the checkpoint unless --keep.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import mmap
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Llama-3-8B (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256), bf16.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
METHODS = ("rtpjax", "flax", "transformers")


# --- the checkpoint -------------------------------------------------------------------------------


def tensor_shapes(c: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    D, F, V, H = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    N, K = c["num_attention_heads"], c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (V, D))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (D,)),
            (p + "mlp.down_proj.weight", (D, F)),
            (p + "mlp.gate_proj.weight", (F, D)),
            (p + "mlp.up_proj.weight", (F, D)),
            (p + "post_attention_layernorm.weight", (D,)),
            (p + "self_attn.k_proj.weight", (K * H, D)),
            (p + "self_attn.o_proj.weight", (D, N * H)),
            (p + "self_attn.q_proj.weight", (N * H, D)),
            (p + "self_attn.v_proj.weight", (K * H, D)),
        ]
    out += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]
    return out


def write_checkpoint(d: str, config: dict[str, Any], shards: int) -> int:
    """Random bf16 weights (a 64 MiB pool of N(0, 0.02) values written at shifting offsets), in
    `shards` files of about equal size, streamed: the host never holds a tensor. Returns bytes."""
    import numpy as np

    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(32 << 20, dtype=np.float32) * 0.02).view(np.uint32)
    pool = ((pool + 0x7FFF + ((pool >> 16) & 1)) >> 16).astype(np.uint16).tobytes()  # RNE → bf16
    shapes = tensor_shapes(config)
    sizes = [math.prod(s) * 2 for _, s in shapes]
    total = sum(sizes)
    groups: list[list[int]] = [[] for _ in range(shards)]
    acc = 0
    for i, n in enumerate(sizes):
        groups[min(shards - 1, acc * shards // total)].append(i)
        acc += n
    groups = [g for g in groups if g]
    weight_map = {}
    shift = 0
    for gi, group in enumerate(groups):
        name = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in group:
            tname, shape = shapes[i]
            header[tname] = {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [offset, offset + sizes[i]],
            }
            offset += sizes[i]
            weight_map[tname] = name
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(os.path.join(d, name), "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for i in group:
                left = sizes[i]
                while left:
                    shift = (shift + 4099 * 2) % (len(pool) // 2)
                    chunk = memoryview(pool)[shift : shift + min(left, len(pool) - shift)]
                    f.write(chunk)
                    left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def weight_files(d: str) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


# --- page cache and physical limits ---------------------------------------------------------------


def drop_caches(files: list[str]) -> dict[str, Any]:
    from rtpjax.weights.safetensors_io import drop_from_page_cache, resident_fraction

    out: dict[str, Any] = {}
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        out["drop_caches"] = "ok"
    except OSError as e:
        out["drop_caches"] = f"failed: {e.strerror}"
    try:
        drop_from_page_cache(files)
        out["fadvise_dontneed"] = "ok"
    except OSError as e:
        out["fadvise_dontneed"] = f"failed: {e.strerror}"
    out["resident_after"] = resident_fraction(files)
    return out


def warm_cache(files: list[str]) -> dict[str, Any]:
    """Read every file through the page cache (as a previous load of it would have)."""
    import concurrent.futures as cf

    from rtpjax.weights.safetensors_io import resident_fraction

    def read(path: str) -> int:
        n = 0
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(64 << 20)
            while k := f.readinto(buf):
                n += k
        return n

    before = resident_fraction(files)
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(4) as ex:
        n = sum(ex.map(read, files))
    return {
        "resident_before": before,
        "read_GBps": n / (time.perf_counter() - t) / 1e9,
        "resident_after": resident_fraction(files),
    }


def disk_bandwidth(files: list[str], limit_bytes: int) -> dict[str, Any]:
    """Sequential O_DIRECT reads: dd (bs=64M iflag=direct) over the first shard, and Python preads
    with 4 threads over up to `limit_bytes`."""
    import concurrent.futures as cf

    out: dict[str, Any] = {}
    drop_caches(files)
    if shutil.which("dd"):
        p = subprocess.run(
            ["dd", f"if={files[0]}", "of=/dev/null", "bs=64M", "iflag=direct"],
            capture_output=True,
            text=True,
        )
        m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", p.stderr)
        if m:
            out["dd_direct_GBps"] = int(m.group(1)) / float(m.group(2)) / 1e9
        else:
            out["dd_direct_error"] = p.stderr.strip().splitlines()[-1:] or "no output"
    drop_caches(files)
    block = 64 << 20
    jobs, done = [], 0
    for path in files:
        size = os.path.getsize(path)
        for off in range(0, size, block):
            if done >= limit_bytes:
                break
            jobs.append((path, off, min(block, size - off)))
            done += min(block, size - off)
    bufs = [mmap.mmap(-1, block) for _ in range(4)]

    def read(i_job):
        i, (path, off, n) = i_job
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            with memoryview(bufs[i % 4]) as mv:
                return os.preadv(fd, [mv[: (n + 4095) // 4096 * 4096]], off)
        finally:
            os.close(fd)

    try:
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(4) as ex:
            got = sum(ex.map(read, enumerate(jobs)))
        out["python_direct_4threads_GBps"] = got / (time.perf_counter() - t) / 1e9
    except OSError as e:
        out["python_direct_error"] = str(e)
    return out


def h2d_bandwidth(chunk: int = 256 << 20, n: int = 1 << 30) -> dict[str, Any]:
    """Host→device copies of 1 GiB in 256 MiB transfers (the loader's size range; XLA stages
    transfers under 1 GiB through its own pinned buffer unless the source is DMA-registered):
    jax from pageable numpy, from DMA-registered numpy (rtpjax's ring), from a jax pinned_host
    array; torch from pinned and pageable tensors when torch has CUDA."""
    import ctypes

    import jax
    import numpy as np

    out: dict[str, Any] = {}
    dev = jax.devices()[0]
    s = jax.sharding.SingleDeviceSharding(dev)

    def best(source: Any) -> float:
        times = []
        for _ in range(4):
            t = time.perf_counter()
            jax.block_until_ready(
                [jax.device_put(source[i : i + chunk], s) for i in range(0, n, chunk)]
            )
            times.append(time.perf_counter() - t)
        return n / min(times) / 1e9

    host = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)
    out["jax_pageable_GBps"] = best(host)
    buf = mmap.mmap(-1, n)
    registered = np.frombuffer(buf, np.uint8)
    registered[:] = host
    anchor = ctypes.c_char.from_buffer(buf)
    addr = ctypes.addressof(anchor)
    try:
        dev.client.dma_map(addr, n)
        out["jax_dma_mapped_GBps"] = best(registered)
        dev.client.dma_unmap(addr)
    except Exception as e:
        out["jax_dma_mapped_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    del registered, anchor
    gc.collect()
    with contextlib.suppress(BufferError):  # a transfer's view may outlive this; GC unmaps it then
        buf.close()
    try:
        kind = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
        pinned = [jax.device_put(host[i : i + chunk], kind) for i in range(0, n, chunk)]
        times = []
        for _ in range(4):
            t = time.perf_counter()
            jax.block_until_ready([jax.device_put(p, s) for p in pinned])
            times.append(time.perf_counter() - t)
        out["jax_pinned_host_GBps"] = n / min(times) / 1e9
        del pinned
    except Exception as e:
        out["jax_pinned_host_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        import torch

        if torch.cuda.is_available():
            for name, t in (
                ("pinned", torch.empty(n, dtype=torch.uint8).pin_memory()),
                ("pageable", torch.empty(n, dtype=torch.uint8)),
            ):
                times = []
                for _ in range(4):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    t.to("cuda", non_blocking=True)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                out[f"torch_{name}_GBps"] = n / min(times) / 1e9
    except ImportError:
        pass
    return out


# --- the loaders, each in its own process ---------------------------------------------------------


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def worker(method: str, d: str, options: dict[str, Any]) -> dict[str, Any]:
    """Load once; report seconds until every weight is on the device, and the peak RSS increase."""
    if method == "h2d":
        import jax

        return {
            "h2d": h2d_bandwidth(),
            "device": jax.devices()[0].device_kind,
            "platform": jax.default_backend(),
        }
    t_start = time.perf_counter()
    res: dict[str, Any] = {"method": method}
    # Backend start-up is not loading: each framework imports its libraries, starts its runtime
    # and makes one tiny device allocation (which sets up its allocator) before the clock starts.
    if method in ("rtpjax", "flax"):
        import jax
        import numpy as np
        import safetensors.flax  # noqa: F401

        import rtpjax.weights.fast_loader  # noqa: F401

        jax.devices()
        t = time.perf_counter()
        jax.device_put(np.zeros(1, np.uint8), jax.devices()[0]).block_until_ready()
        res["first_allocation_s"] = time.perf_counter() - t
        res["device"] = str(jax.devices()[0].device_kind)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        torch.cuda.init()
        t = time.perf_counter()
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
        res["first_allocation_s"] = time.perf_counter() - t
        res["device"] = torch.cuda.get_device_name()
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5\n")  # reset the peak-RSS counter
    before = _rss()
    res["startup_s"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    if method == "rtpjax":
        import jax.numpy as jnp

        from rtpjax.config import ModelConfig
        from rtpjax.weights.fast_loader import LoadOptions, load_params_fast
        from rtpjax.weights.safetensors_io import SafetensorsCheckpoint

        cfg = ModelConfig.from_hf(d)
        params, stats = load_params_fast(
            SafetensorsCheckpoint(d), cfg, jnp.bfloat16, options=LoadOptions(**options)
        )
        res["seconds"] = time.perf_counter() - t0
        res["stats"] = {k: v for k, v in vars(stats).items()}
        res["summary"] = stats.summary()
        res["rss_after_load_bytes"] = _rss()["VmRSS"] - before["VmRSS"]
        del params
    elif method == "flax":
        import jax
        from safetensors.flax import load_file

        dev = jax.devices()[0]
        arrays = []
        for path in weight_files(d):
            arrays += [jax.device_put(a, dev) for a in load_file(path).values()]
        jax.block_until_ready(arrays)
        res["seconds"] = time.perf_counter() - t0
        del arrays
    else:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="cuda")
        torch.cuda.synchronize()
        res["seconds"] = time.perf_counter() - t0
        del model
    after = _rss()
    res["peak_rss_increase_bytes"] = after["VmHWM"] - before["VmRSS"]
    return res


def run_worker(method: str, d: str, options: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        method,
        "--dir",
        d,
        "--loader-options",
        json.dumps(options),
    ]
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": ROOT}
    if method == "h2d":  # jax and torch share the GPU there
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            res = json.loads(line)
            res["process_s"] = time.perf_counter() - t
            return res
    return {"method": method, "error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}


# --- report ---------------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("RTPJAX_COMMIT", "unknown")


def table(report: dict[str, Any]) -> str:
    gb = report["checkpoint"]["bytes"] / 1e9
    lim = report["limits"]
    disk, h2d, cache = lim["disk_GBps"], lim["h2d_pinned_GBps"], lim["page_cache_GBps"]
    warm_floor = gb / min(h2d, cache)
    lines = [
        f"checkpoint: {gb:.2f} GB bf16 in {report['checkpoint']['files']} files; device "
        f"{report['device']}; jax {report['versions'].get('jax')}; commit {report['commit']}; "
        f"{report['date']}",
        f"limits: disk {disk:.2f} GB/s sequential (O_DIRECT) -> cold floor {gb / disk:.1f} s; "
        f"page-cache read (4 threads) {cache:.1f} GB/s and host->device pinned {h2d:.1f} GB/s "
        f"(pageable {lim['h2d_pageable_GBps']:.1f}) -> warm floor {warm_floor:.2f} s",
        "",
        f"{'method':<14}{'cold s':>8}{'GB/s':>7}{'of disk':>9}{'warm s':>8}{'GB/s':>7}"
        f"{'of floor':>10}{'peak RSS+':>11}",
    ]
    for m, r in report["results"].items():
        if "error" in r:
            lines.append(f"{m:<14} error: {r['error']}")
            continue
        c, w = r["cold_s"], r["warm_s"]
        lines.append(
            f"{m:<14}{c:>8.2f}{gb / c:>7.2f}{gb / c / disk:>8.0%} {w:>8.2f}{gb / w:>7.2f}"
            f"{warm_floor / w:>9.0%} {r['peak_rss_increase_bytes'] / 2**30:>8.2f}GiB"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--dir", default=None, help="where to write the checkpoint (default: a tmp dir)"
    )
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--warm", type=int, default=2, help="warm runs per method (best is reported)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", default="out/bench_loading.json")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--reuse", action="store_true", help="use the checkpoint already in --dir")
    ap.add_argument("--timeout", type=float, default=150, help="seconds per load process")
    ap.add_argument("--loader-options", default="{}", help="JSON of rtpjax LoadOptions fields")
    ap.add_argument("--worker", choices=(*METHODS, "h2d"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    options = json.loads(args.loader_options)
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir, options)), flush=True)
        return
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
    owned = args.dir is None
    d = args.dir or tempfile.mkdtemp(prefix="rtpjax_bench_", dir=os.environ.get("TMPDIR", "/tmp"))
    config = dict(LLAMA3_8B, num_hidden_layers=args.layers, vocab_size=args.vocab)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host": platform.node(),
        "python": platform.python_version(),
    }
    try:
        t = time.perf_counter()
        if args.reuse and os.path.isfile(os.path.join(d, "model.safetensors.index.json")):
            with open(os.path.join(d, "config.json")) as f:
                config = json.load(f)
            total = sum(os.path.getsize(p) for p in weight_files(d))
        else:
            total = write_checkpoint(d, config, args.shards)
        files = weight_files(d)
        report["page_cache"] = warm_cache(files)  # just written: read back from the cache
        if (report["page_cache"]["resident_before"] or 0) < 0.99:  # it was not all cached
            report["page_cache"] = warm_cache(files)
        report["checkpoint"] = {
            "bytes": total,
            "files": len(files),
            "config": config,
            "write_GBps": total / (time.perf_counter() - t) / 1e9,
        }
        print(
            f"wrote {total / 1e9:.2f} GB in {len(files)} files to {d} "
            f"({report['checkpoint']['write_GBps']:.2f} GB/s)",
            flush=True,
        )
        report["disk"] = disk_bandwidth(files, limit_bytes=min(total, 4 << 30))
        # Measured in a child process: this one must not hold the accelerator the loaders use.
        probe = run_worker("h2d", d, {}, args.timeout)
        if "error" in probe:
            raise SystemExit(f"host-to-device measurement failed: {probe['error']}")
        report["h2d"], report["device"] = probe["h2d"], probe["device"]
        report["versions"] = {}
        for mod in ("jax", "jaxlib", "torch", "transformers", "safetensors", "orbax.checkpoint"):
            with contextlib.suppress(Exception):
                report["versions"][mod] = __import__(mod, fromlist=["_"]).__version__
        disk_gbps = max(v for k, v in report["disk"].items() if k.endswith("GBps"))
        pinned = [v for k, v in report["h2d"].items() if k.endswith("GBps") and "pageable" not in k]
        report["limits"] = {
            "disk_GBps": disk_gbps,
            "page_cache_GBps": report["page_cache"]["read_GBps"],
            "h2d_pinned_GBps": max(pinned),
            "h2d_pageable_GBps": report["h2d"]["jax_pageable_GBps"],
        }
        print(json.dumps({"disk": report["disk"], "h2d": report["h2d"]}), flush=True)
        report["results"] = {}
        for m in methods:
            report.setdefault("cache_drops", []).append(drop_caches(files))
            runs = [run_worker(m, d, options, args.timeout)]
            for _ in range(args.warm):
                if "error" in runs[-1]:
                    break
                report.setdefault("cache_warms", []).append(warm_cache(files))
                runs.append(run_worker(m, d, options, args.timeout))
            if any("error" in r for r in runs):
                report["results"][m] = {"error": next(r["error"] for r in runs if "error" in r)}
            else:
                warm = min(runs[1:], key=lambda r: r["seconds"]) if len(runs) > 1 else runs[0]
                report["results"][m] = {
                    "cold_s": runs[0]["seconds"],
                    "warm_s": warm["seconds"],
                    "peak_rss_increase_bytes": max(r["peak_rss_increase_bytes"] for r in runs),
                    "runs": runs,
                }
            got = report["results"][m].get("error") or [round(r["seconds"], 2) for r in runs]
            print(f"{m}: {got}", flush=True)
            for r in runs:
                if "summary" in r:
                    print(
                        "   ",
                        r["summary"],
                        {k: round(v, 2) for k, v in r["stats"].items() if k.endswith("_s")},
                        flush=True,
                    )
        print()
        print(table(report))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2, default=str)
            print(f"\nwrote {args.json}")
    finally:
        if owned and not args.keep:
            shutil.rmtree(d, ignore_errors=True)
        elif not args.keep:
            for path in weight_files(d):
                os.remove(path)


if __name__ == "__main__":
    main()
