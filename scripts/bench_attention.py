"""Benchmark ragged paged attention on a GPU: decode bandwidth, prefill TFLOP/s, correctness.

    python scripts/bench_attention.py [--out bench_attention.json] [--sweep] [--quick]
                                      [--packed-only | --prefix-only] [--smoke]

Prints tables and writes JSON:
- the measured HBM copy bandwidth (read + write) through JAX: the decode ceiling;
- decode at batch {1, 8, 64, 256} x context {512, 2k, 8k, 32k} (`--decode-only`: only this): time
  per call and KV bytes read per second against that ceiling, by the loop timing below and by
  device time from the profiler (eight calls per jitted step sharing the step's metadata, as the
  engine's layers do), beside the device time of an XLA copy of the same bytes;
- prefill of 2k/4k/8k tokens (one sequence, no cache) and a 2k chunk over a cached prefix: TFLOP/s
  (causal FLOPs actually needed) against cuDNN flash attention on the same shape, for the
  Triton-lowered kernel (on Hopper the engine's prefill takes the Mosaic GPU kernel instead:
  scripts/bench_attention_mgpu.py measures it the same way beside this kernel and cuDNN);
- prefill chunks over cached prefixes through cuDNN (kernels/prefix_prefill.py, two cuDNN calls
  merged by LSE) against the paged kernel and against plain contiguous cuDNN calls doing the same
  FLOPs (`--prefix-only` runs only this section);
- the relative error of every timed shape against ref_ragged_paged_attention, plus a correctness
  suite of mixed decode+prefill batches, GQA ratios, head dims, page sizes, f32, soft cap, window;
- with --sweep, kernel block shapes tried on a few shapes.
Shapes are Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128, bf16), one layer.

Timing: each measurement runs the call `iters` times inside one jitted fori_loop (each iteration's q
depends on the last output, so nothing is hoisted) and rotates among page tables over disjoint page
sets so small shapes are not served from the 50 MB L2; median of 5 runs. The loop's own
per-iteration cost is measured too and printed. Calls under 300 MB of KV are also timed as 12
calls in straight-line code (JSON `time_unrolled_us`): there XLA's launch gaps show.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attention_bench_common as common
from attention_bench_common import (
    LOG,
    attn_fn,
    check,
    copy_bandwidth,
    decode_configs,
    loop_overhead,
    make_problem,
    median_time,
    print_decode_table,
    print_prefix_table,
    reference,
    rel_err,
    say,
    timed,
)

from rtpjax.kernels import ragged_paged_attention as rpa
from rtpjax.kernels import ragged_paged_attention_gpu as gpu
from rtpjax.kernels.packed_prefill import packed_causal_attention
from rtpjax.kernels.prefix_prefill import prefix_prefill_attention

# ----------------------------------------------------------------------------- sections


def correctness_suite(rng, results) -> None:
    say("correctness suite (gpu kernel vs reference)")
    cases = [
        dict(name="mixed bf16 G4 H128 ps16", q=[1, 1, 37, 300, 1, 513, 2, 1],
             kv=[700, 1, 37, 1000, 4096, 600, 17, 129]),
        dict(name="mixed bf16 G1 H64 ps32", q=[1, 7, 100, 1], kv=[50, 7, 900, 3000], K=4, G=1,
             H=64, page_size=32),
        dict(name="mixed bf16 G8 H128 ps128", q=[3, 1, 250], kv=[3, 2000, 777], K=2, G=8,
             page_size=128),
        dict(name="mixed f32 G4 H64 ps64", q=[1, 64, 5], kv=[300, 200, 1500], K=2, H=64,
             page_size=64, dtype=jnp.float32),
        dict(name="window 256 + soft_cap 30", q=[1, 200, 1, 33], kv=[1000, 700, 50, 1200],
             sliding_window=256, soft_cap=30.0),
        dict(name="padding rows (B=12, T+40)", q=[1, 9, 1], kv=[100, 333, 2048], B=12, pad_T=40),
    ]  # fmt: skip
    configs = [None, gpu.GpuConfig(16, 64, 4, prefetch=2), gpu.GpuConfig(128, 64, 1, 8, 3, 0)]
    for c in cases:
        kw = dict(sm_scale=1.0 / float(np.sqrt(c.get("H", 128))))
        for key in ("sliding_window", "soft_cap"):
            if key in c:
                kw[key] = c[key]
        pr = make_problem(
            rng, c["q"], c["kv"], K=c.get("K", 8), G=c.get("G", 4), H=c.get("H", 128),
            page_size=c.get("page_size", 16), dtype=c.get("dtype", jnp.bfloat16), B=c.get("B"),
            T=sum(c["q"]) + c.get("pad_T", 5),
        )  # fmt: skip
        ref = reference(pr, **kw)
        for cfg in configs:
            try:
                err = check(pr, attn_fn("gpu", cfg, **kw), ref, **kw)
            except Exception as e:
                err = float("nan")
                say(f"  ERROR {c['name']} {cfg}: {e!r}"[:400])
            tol = 1e-4 if c.get("dtype") == jnp.float32 else 1e-2
            ok = err == err and err < tol
            results["correctness"].append(dict(case=c["name"], config=str(cfg), rel_err=err, ok=ok))
            say(f"  {'ok  ' if ok else 'FAIL'} {c['name']:<28} {cfg!s:<70} rel_err={err:.2e}")


def decode_section(rng, results, copy_bw, batches, contexts, page_size, sweep_configs=None):
    say("decode")
    K, G, H = 8, 4, 128
    floors: dict[int, float] = {}
    copies: dict[int, float] = {}
    for B in batches:
        for ctx in contexts:
            kv_bytes = B * ctx * 2 * K * H * 2
            if kv_bytes > 40e9:  # 256 x 32k (34 GB) still fits an 80 GB H100
                continue
            # Enough disjoint page sets that one loop touches >= 400 MB: 8x the L2.
            sets = int(min(128, max(1, np.ceil(400e6 / kv_bytes))))
            pr = make_problem(rng, [1] * B, [ctx] * B, page_size=page_size, sets=sets)
            kw = dict(sm_scale=1 / np.sqrt(H))
            iters = int(min(200, max(10, 0.05 / max(kv_bytes / copy_bw, 5e-6))))
            cfgs = sweep_configs(B, ctx) if sweep_configs else [None]
            ref = reference(pr, **kw)
            for cfg in cfgs:
                row = dict(batch=B, context=ctx, page_size=page_size, kv_bytes=kv_bytes)
                try:
                    fn = attn_fn("gpu", cfg, **kw, max_q_len=1)  # as the engine's decode step
                    row["config"] = str(cfg or gpu.choose_config(B, B, K * G, K, H, ctx, 1))
                    row["rel_err"] = check(pr, fn, ref, **kw)
                    t = timed(pr, fn, iters)
                    if kv_bytes < 300e6:  # small calls: launch gaps show; record both
                        row["time_unrolled_us"] = timed(pr, fn, 12, unroll=True) * 1e6
                    if kv_bytes not in floors:  # the same bytes read the cheapest way
                        floors[kv_bytes] = common.read_floor(kv_bytes, iters)
                    fl = floors[kv_bytes]
                    if kv_bytes not in copies:  # the same bytes copied, device time
                        copies[kv_bytes] = common.copy_device_us(kv_bytes)
                    dev_us, kernels = common.layer_device_us(pr, fn)
                    cp = copies[kv_bytes]
                    row.update(time_us=t * 1e6, tb_s=kv_bytes / t / 1e12,
                               frac_copy=kv_bytes / t / copy_bw, read_floor_us=fl * 1e6,
                               frac_read_floor=fl / t, device_us=dev_us, kernels_us=kernels,
                               device_tb_s=kv_bytes / dev_us / 1e6,
                               device_frac_copy=kv_bytes / (dev_us * 1e-6) / copy_bw,
                               copy_device_us=cp, frac_copy_same_bytes=cp / dev_us)  # fmt: skip
                    unr = row.get("time_unrolled_us", 0)
                    say(f"  B={B:<4} ctx={ctx:<6} {t * 1e6:9.1f} us (unrolled {unr:7.1f})"
                        f"  {kv_bytes / t / 1e12:5.2f} TB/s"
                        f"  {kv_bytes / t / copy_bw:5.1%} of copy"
                        f"  same-bytes read {fl * 1e6:7.1f} us ({fl / t:5.1%})"
                        f" | device {dev_us:7.1f} us {kv_bytes / dev_us / 1e6:5.2f} TB/s,"
                        f" same-bytes copy {cp:7.1f} us ({cp / dev_us:5.1%})"
                        f"  err={row['rel_err']:.1e}  {row['config']}")  # fmt: skip
                except Exception as e:
                    row["error"] = repr(e)[:300]
                    say(f"  B={B} ctx={ctx} ERROR {e!r}"[:400])
                results["decode_sweep" if sweep_configs else "decode"].append(row)
            del pr


def prefill_section(rng, results, cases, sweep_configs=None):
    say("prefill")
    K, G, H = 8, 4, 128
    N = K * G
    for prefix, chunk in cases:
        S = prefix + chunk
        pr = make_problem(rng, [chunk], [S], page_size=16, nan_fill=True)
        kw = dict(sm_scale=1 / np.sqrt(H))
        # Causal FLOPs actually needed: query i sees prefix + i + 1 keys; QK^T and PV, 2 per MAC.
        flops = 4 * N * H * (chunk * prefix + chunk * (chunk + 1) / 2)
        row = dict(prefix=prefix, chunk=chunk, flops=flops)
        # cuDNN on the same shape: causal when there is no prefix; else non-causal over all
        # keys (its own FLOPs counted: it has no bottom-right causal mask through this API).
        kq = jax.random.normal(jax.random.key(1), (1, chunk, N, H), jnp.bfloat16)
        kk = jax.random.normal(jax.random.key(2), (1, S, K, H), jnp.bfloat16)
        kv_ = jax.random.normal(jax.random.key(3), (1, S, K, H), jnp.bfloat16)
        causal = bool(prefix == 0)
        cud_flops = flops if causal else 4 * N * H * chunk * S
        try:

            @jax.jit
            def cud(q, k, v, causal=causal):
                def body(i, q):
                    o = jax.nn.dot_product_attention(
                        q, k, v, is_causal=causal, implementation="cudnn"
                    )
                    return q + o * jnp.zeros((), o.dtype)

                return lax.fori_loop(0, 10, body, q)

            tc = median_time(cud, kq, kk, kv_) / 10
            row.update(cudnn_us=tc * 1e6, cudnn_tflops=cud_flops / tc / 1e12, cudnn_causal=causal)
        except Exception as e:
            row["cudnn_error"] = repr(e)[:300]
            tc = float("nan")
        ref = reference(pr, **kw)
        for cfg in sweep_configs() if sweep_configs else [None]:
            r = dict(row)
            try:
                fn = attn_fn("gpu", cfg, max_q_len=chunk, **kw)
                r["config"] = str(cfg or gpu.choose_config(chunk, 1, N, K, H, S, chunk))
                r["rel_err"] = check(pr, fn, ref, **kw)
                t = timed(pr, fn, 10)
                r.update(time_us=t * 1e6, tflops=flops / t / 1e12)
                if tc == tc:
                    r["vs_cudnn"] = (flops / t) / (cud_flops / tc)
                cud_s = r.get("cudnn_tflops", float("nan"))
                say(f"  prefix={prefix:<5} chunk={chunk:<5} {t * 1e6:8.0f} us"
                    f" {flops / t / 1e12:6.1f} TFLOP/s  cuDNN {cud_s:6.1f}"
                    f" ({'causal' if causal else 'full'})"
                    f"  ratio {r.get('vs_cudnn', float('nan')):.2f}"
                    f"  err={r['rel_err']:.1e}  {r['config']}")  # fmt: skip
            except Exception as e:
                r["error"] = repr(e)[:300]
                say(f"  prefix={prefix} chunk={chunk} ERROR {e!r}"[:400])
            results["prefill_sweep" if sweep_configs else "prefill"].append(r)
        del pr


def packed_prefill_section(results) -> None:
    """Fresh-prefill steps (no cached prefix): the engine's cuDNN path over packed sequences
    (kernels/packed_prefill.py) against cuDNN on one [1, T] sequence and against the reference."""
    say("fresh prefill through packed cuDNN (the engine's path for steps without cached KV)")
    K, G, H = 8, 4, 128
    N = K * G
    for lens in ([2048], [4096], [8192], [1024] * 4, [512] * 8):
        T = sum(lens)
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
        ns = jnp.asarray([len(lens)], jnp.int32)
        q = jax.random.normal(jax.random.key(1), (T, N, H), jnp.bfloat16)
        k = jax.random.normal(jax.random.key(2), (T, K, H), jnp.bfloat16)
        v = jax.random.normal(jax.random.key(3), (T, K, H), jnp.bfloat16)
        flops = sum(4 * N * H * n * (n + 1) / 2 for n in lens)
        row = dict(lens=lens, flops=flops)
        try:

            @jax.jit
            def packed(q, k, v, cu=cu, ns=ns):
                def body(i, q):
                    o = packed_causal_attention(q, k, v, cu, ns, sm_scale=H**-0.5, impl="cudnn")
                    return q + o * jnp.zeros((), o.dtype)

                return lax.fori_loop(0, 10, body, q)

            t = median_time(packed, q, k, v) / 10
            row.update(time_us=t * 1e6, tflops=flops / t / 1e12)
            if len(lens) == 1:

                @jax.jit
                def plain(q, k, v):
                    def body(i, q):
                        o = jax.nn.dot_product_attention(
                            q[None], k[None], v[None], is_causal=True, implementation="cudnn"
                        )[0]
                        return q + o * jnp.zeros((), o.dtype)

                    return lax.fori_loop(0, 10, body, q)

                tc = median_time(plain, q, k, v) / 10
                row.update(cudnn_us=tc * 1e6, cudnn_tflops=flops / tc / 1e12, vs_cudnn=tc / t)
            if T <= 4096:
                out = packed_causal_attention(q, k, v, cu, ns, sm_scale=H**-0.5, impl="cudnn")
                ref = packed_causal_attention(q, k, v, cu, ns, sm_scale=H**-0.5, impl="reference")
                o32, r32 = out.astype(jnp.float32), ref.astype(jnp.float32)
                row["rel_err"] = float(jnp.linalg.norm(o32 - r32) / jnp.linalg.norm(r32))
            say(f"  {len(lens)} x {lens[0]:<5} {row['time_us']:8.0f} us"
                f" {row['tflops']:6.1f} TFLOP/s"
                f"  plain cuDNN {row.get('cudnn_tflops', float('nan')):6.1f}"
                f"  ratio {row.get('vs_cudnn', float('nan')):.2f}"
                f"  err={row.get('rel_err', float('nan')):.1e}")  # fmt: skip
        except Exception as e:
            row["error"] = repr(e)[:400]
            say(f"  {lens[:2]} ERROR {e!r}"[:500])
        results.setdefault("packed_prefill", []).append(row)


PREFIX_CASES = [[(512, 512)], [(1024, 1024)], [(2048, 2048)], [(2048, 6144)], [(1024, 7168)],
                [(512, 1536)] * 4]  # fmt: skip
PREFIX_SMOKE = [[(32, 48)], [(16, 40)] * 2]


def chunk_kv(pr):
    """This step's keys and values [T, K, H], read back from where the problem wrote them: the
    last q_len positions of each sequence (the engine writes them with write_kv before attention;
    prefix_prefill_attention reads the chunk from k/v and only the prefix from the pages)."""
    kv, table = pr["kv"], pr["tables"][0]
    T, ps = pr["q"].shape[0], kv.shape[1]
    seq, pos, valid = rpa.token_positions(pr["cu"], pr["kv_lens"], pr["ns"], T)
    slot = table[seq, jnp.clip(pos // ps, 0, table.shape[1] - 1)] * ps + pos % ps
    rows = kv.reshape(-1, *kv.shape[2:])[jnp.where(valid, slot, 0)]  # [T, 2K, H]
    rows = jnp.where(valid[:, None, None], rows, jnp.zeros((), rows.dtype))
    return rows[:, 0::2], rows[:, 1::2]


def prefix_prefill_section(results, cases) -> None:
    """Chunks over cached prefixes: (a) prefix_prefill_attention "cudnn" (b) the paged Pallas kernel
    on the same step (c) plain cuDNN on contiguous [B, S, K, H] inputs doing the same work (one
    non-causal chunk x prefix call + one causal chunk x chunk call, unmerged). TFLOP/s by causal
    FLOPs needed, 4*N*H*sum(keys seen). --smoke: (a) runs the "xla" path and (c) jax's XLA attention
    on CPU, (b) the kernel in interpret mode; only the plumbing is checked then."""
    say("prefill over a cached prefix: two cuDNN calls merged by LSE (kernels/prefix_prefill.py)")
    K, G, H = (2, 2, 64) if common.INTERPRET else (8, 4, 128)
    N = K * G
    ours_impl, base_impl = ("xla", None) if common.INTERPRET else ("cudnn", "cudnn")
    iters = 2 if common.INTERPRET else 10
    rng = np.random.default_rng(5)
    for seqs in cases:
        chunks, prefixes = [c for c, _ in seqs], [p for _, p in seqs]
        n, chunk, prefix = len(seqs), chunks[0], prefixes[0]
        pr = make_problem(rng, chunks, [c + p for c, p in seqs], K=K, G=G, H=H)
        k, v = chunk_kv(pr)
        # The caller's bucket: the prefix total rounded up to 512 tokens (64 in smoke).
        bucket = 64 if common.INTERPRET else 512
        S = -(-sum(prefixes) // bucket) * bucket
        kw = dict(sm_scale=H**-0.5)
        flops = 4 * N * H * sum(c * p + c * (c + 1) / 2 for c, p in seqs)
        row = dict(seqs=n, chunk=chunk, prefix=prefix, max_prefix_tokens=S, flops=flops)
        label = f"{n} x ({chunk}, {prefix})"

        def ours(q, k, v, kv, kl, pt, cu, ns, impl=ours_impl, S=S, kw=kw):
            return prefix_prefill_attention(q, k, v, kv, pt, cu, kl, ns, max_prefix_tokens=S,
                                            impl=impl, **kw)  # fmt: skip

        @jax.jit
        def ours_loop(q, k, v, kv, kl, pt, cu, ns):  # chained calls, as timed() does
            def body(i, q):
                return q + ours(q, k, v, kv, kl, pt, cu, ns) * jnp.zeros((), q.dtype)

            return lax.fori_loop(0, iters, body, q)

        args = (pr["q"], k, v, pr["kv"], pr["kv_lens"], pr["tables"][0], pr["cu"], pr["ns"])
        try:
            out = jax.jit(ours)(*args)
            ref = reference(pr, **kw)  # largest here: 2048 x 8192 keys, as prefill_section's
            row["rel_err"], tail_ok = rel_err(out, ref, sum(chunks))
            if not tail_ok:
                row["rel_err"] = float("nan")
            out_x = jax.jit(functools.partial(ours, impl="xla"))(*args)  # T*S*N floats: <= 1.6 GB
            row["rel_err_vs_xla"] = rel_err(out, out_x, sum(chunks))[0]
            del out_x, ref
            t = median_time(ours_loop, *args) / iters
            row.update(time_us=t * 1e6, tflops=flops / t / 1e12)
        except Exception as e:
            row["error"] = repr(e)[:400]
            say(f"  {label} ERROR {e!r}"[:500])
            t = float("nan")
        try:
            fn = attn_fn("gpu", None, max_q_len=chunk, **kw)
            tp = timed(pr, fn, iters)
            row.update(paged_us=tp * 1e6, paged_tflops=flops / tp / 1e12, vs_paged=tp / t)
        except Exception as e:
            row["paged_error"] = repr(e)[:300]
        try:
            key = jax.random.key(7)
            shapes = [(n, chunk, N, H), (n, prefix, K, H), (n, prefix, K, H), (n, chunk, K, H)]
            kq, kk, kv_, kc = (
                jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16)
                for i, shape in enumerate(shapes)
            )

            @jax.jit
            def base(q, kp, vp, kc):
                def body(i, q):
                    o1 = jax.nn.dot_product_attention(q, kp, vp, implementation=base_impl)
                    o2 = jax.nn.dot_product_attention(q, kc, kc, is_causal=True,
                                                      implementation=base_impl)  # fmt: skip
                    return q + (o1 + o2) * jnp.zeros((), q.dtype)

                return lax.fori_loop(0, iters, body, q)

            tc = median_time(base, kq, kk, kv_, kc) / iters
            row.update(cudnn_us=tc * 1e6, cudnn_tflops=flops / tc / 1e12, vs_cudnn=tc / t)
        except Exception as e:
            row["cudnn_error"] = repr(e)[:300]
        say(f"  {label:<20} {row.get('time_us', float('nan')):8.0f} us"
            f" {row.get('tflops', float('nan')):6.1f} TFLOP/s"
            f"  plain cuDNN {row.get('cudnn_tflops', float('nan')):6.1f}"
            f" (ratio {row.get('vs_cudnn', float('nan')):.2f})"
            f"  paged {row.get('paged_tflops', float('nan')):6.1f}"
            f" (ratio {row.get('vs_paged', float('nan')):.2f})"
            f"  err={row.get('rel_err', float('nan')):.1e}"
            f" vs xla {row.get('rel_err_vs_xla', float('nan')):.1e}")  # fmt: skip
        results.setdefault("prefix_prefill", []).append(row)
        del pr, k, v


def xla_fallback(rng, results, copy_bw) -> None:
    say("xla path on the GPU (fallback), decode B=64 ctx=2048")
    pr = make_problem(rng, [1] * 64, [2048] * 64, sets=2)
    kw = dict(sm_scale=1 / np.sqrt(128))
    fn = attn_fn("xla", **kw)
    err = check(pr, fn, **kw)
    t = timed(pr, fn, 20)
    kvb = 64 * 2048 * 16 * 128 * 2
    results["xla_fallback"] = dict(time_us=t * 1e6, tb_s=kvb / t / 1e12, rel_err=err)
    say(f"  {t * 1e6:.1f} us  {kvb / t / 1e12:.2f} TB/s  err={err:.1e}")


def write_kv_check(results) -> None:
    say("write_kv in place on the GPU")
    kv = jnp.zeros((4097, 16, 16, 128), jnp.bfloat16)
    f = jax.jit(rpa.write_kv, donate_argnums=0)
    k = jax.random.normal(jax.random.key(0), (256, 8, 128), jnp.bfloat16)
    slots = jnp.asarray(np.random.default_rng(0).permutation(4096 * 16)[:256] + 16, jnp.int32)
    p0 = kv.unsafe_buffer_pointer()
    kv = f(kv, k, k, slots)
    same = kv.unsafe_buffer_pointer() == p0
    kv.block_until_ready()
    t = time.perf_counter()
    for _ in range(100):
        kv = f(kv, k, k, slots)
    kv.block_until_ready()
    t = (time.perf_counter() - t) / 100
    results["write_kv"] = dict(in_place=bool(same), time_us=t * 1e6)
    say(f"  in place: {same}; {t * 1e6:.1f} us per call (256 tokens, includes dispatch)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", default=os.path.join(os.environ.get("OUT", "."), "bench_attention.json")
    )
    ap.add_argument("--sweep", action="store_true", help="also try kernel block shapes")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--skip-suite", action="store_true")
    ap.add_argument("--packed-only", action="store_true", help="only the fresh-prefill section")
    ap.add_argument(
        "--prefix-only", action="store_true", help="only the prefill-over-cached-prefix section"
    )
    ap.add_argument("--decode-only", action="store_true", help="only the decode section")
    ap.add_argument(
        "--decode-shapes",
        default=None,
        help="with --decode-only: BATCHxCONTEXT,... (e.g. 1x512,8x2048) instead of the full grid",
    )
    ap.add_argument(
        "--decode-configs",
        default=None,
        help="with --decode-only: compare kernel shapes, e.g. default,sm/64/5,16/32/3 "
        "(SPLITS/BLOCK_S/STAGES[/WARPS]; SPLITS `sm` = one program per multiprocessor)",
    )
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script: interpret mode")
    ap.add_argument("--once", default=None, help="B,ctx,q_len: 3 plain calls, for ncu")
    ap.add_argument("--ncu-summary", default=None, help="summarise an `ncu --csv` log and exit")
    args = ap.parse_args()
    if args.ncu_summary:
        import csv

        with open(args.ncu_summary) as f:
            rows = [r for r in csv.reader(f) if len(r) > 10]
        head, rows = rows[0], rows[1:]
        name, val = head.index("Kernel Name"), head.index("Metric Value")
        for r in rows:
            print(f"{r[val]:>12} {r[name][:90]}")
        return
    if args.once:
        B, ctx, ql = (int(x) for x in args.once.split(","))
        pr = make_problem(np.random.default_rng(0), [ql] * B, [ctx] * B)
        fn = jax.jit(attn_fn("gpu", None, sm_scale=0.1, max_q_len=ql))
        a = (pr["q"], pr["kv"], pr["kv_lens"], pr["tables"][0], pr["cu"], pr["ns"])
        jax.block_until_ready(fn(*a))
        for _ in range(3):
            jax.block_until_ready(fn(*a))
        return
    if args.smoke:
        common.INTERPRET = True
    results = dict(
        common.run_info(),
        correctness=[], decode=[], decode_sweep=[], prefill=[], prefill_sweep=[],
    )  # fmt: skip
    say(f"{results['device']} jax {jax.__version__} commit {results['commit']}")
    rng = np.random.default_rng(0)
    copy_bw = copy_bandwidth()
    results["copy_bw_tb_s"] = copy_bw / 1e12
    results["loop_overhead_us"] = loop_overhead() * 1e6
    say(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s; fori_loop overhead "
        f"{results['loop_overhead_us']:.1f} us/iter")  # fmt: skip

    def dump() -> None:
        results["log"] = LOG
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)

    if args.packed_only:
        packed_prefill_section(results)
        dump()
        return
    if args.prefix_only:
        prefix_prefill_section(results, PREFIX_SMOKE if args.smoke else PREFIX_CASES)
        dump()
        print_prefix_table(results)
        return
    if args.decode_only:
        batches, contexts = (
            ([1, 3], [64]) if args.smoke else ([1, 8, 64, 256], [512, 2048, 8192, 32768])
        )
        try:
            cfgs = decode_configs(args.decode_configs) if args.decode_configs else None
        except ValueError as e:
            ap.error(str(e))
        if args.decode_shapes:
            for shape in args.decode_shapes.split(","):
                try:
                    B, ctx = (int(x) for x in shape.lower().split("x"))
                except ValueError:
                    ap.error(f"--decode-shapes: {shape!r} is not BATCHxCONTEXT (e.g. 8x2048)")
                decode_section(rng, results, copy_bw, [B], [ctx], args.page_size, cfgs)
        else:
            decode_section(rng, results, copy_bw, batches, contexts, args.page_size, cfgs)
        dump()
        print_decode_table(results, copy_bw, "decode_sweep" if cfgs else "decode")
        return
    try:
        if not args.skip_suite and not args.smoke:
            correctness_suite(rng, results)
        dump()
        if args.sweep:

            def dec_cfgs(B, ctx):  # waves of splits x tile x stages x prefetch
                progs, txh, out = B * 8, B * 32 * 128, [None]
                for w in (1, 2, 4, 8):
                    for bs, st, pf in ((64, 3, 0), (32, 3, 0), (128, 3, 0), (64, 2, 0),
                                       (64, 4, 0), (64, 3, 2), (32, 2, 0)):  # fmt: skip
                        if w in (1, 8) and (bs, st, pf) != (64, 3, 0):
                            continue
                        S = gpu.num_splits(progs, ctx, bs, txh, waves=w)
                        out.append(gpu.GpuConfig(16, bs, S, 4, st, pf))
                return out

            for B, ctx in [(1, 512), (1, 8192), (8, 2048), (64, 512), (64, 2048), (8, 32768)]:
                decode_section(rng, results, copy_bw, [B], [ctx], args.page_size, dec_cfgs)
                dump()
            pre = [gpu.GpuConfig(*c) for c in [(128, 64, 1, 8, 3, 0), (128, 64, 1, 8, 3, 1),
                   (128, 64, 1, 8, 3, 2), (64, 64, 1, 4, 3, 2), (128, 32, 1, 4, 3, 2),
                   (128, 64, 1, 8, 2, 2)]]  # fmt: skip
            prefill_section(rng, results, [(0, 4096)], lambda: pre)
            dump()
        batches = [1, 8, 64, 256]
        contexts = [512, 2048, 8192, 32768]
        prefills = [(0, 2048), (0, 4096), (0, 8192), (6144, 2048)]
        if args.quick:
            batches, contexts = [1, 64], [2048, 32768]
        if args.smoke:
            batches, contexts, prefills = [1, 3], [64], [(0, 64), (32, 48)]
        decode_section(rng, results, copy_bw, batches, contexts, args.page_size)
        dump()
        prefill_section(rng, results, prefills)
        dump()
        if not args.smoke:
            packed_prefill_section(results)
            dump()
        prefix_prefill_section(results, PREFIX_SMOKE if args.smoke else PREFIX_CASES)
        dump()
        if not args.smoke:
            xla_fallback(rng, results, copy_bw)
        write_kv_check(results)
    except Exception:
        say(traceback.format_exc())
    dump()
    print_decode_table(results, copy_bw)
    print("=== prefill ===")
    for r in results["prefill"]:
        if "time_us" in r:
            print(f"prefix={r['prefix']:<5} chunk={r['chunk']:<5} {r['tflops']:6.1f} TFLOP/s"
                  f"  cuDNN {r.get('cudnn_tflops', float('nan')):6.1f}"
                  f"  ratio {r.get('vs_cudnn', 0):.2f}"
                  f"  err {r['rel_err']:.1e}")  # fmt: skip
    print_prefix_table(results)
    bad = [c for c in results["correctness"] if not c["ok"]]
    print(f"correctness suite: {len(results['correctness']) - len(bad)} ok, {len(bad)} failed")


if __name__ == "__main__":
    main()
