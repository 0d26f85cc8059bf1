"""scripts/bench_lora.py's correctness sections, run on the device before anything is timed:
the operator's GPU paths (lora_delta_with, with and without base) and lora_linear's fused path,
values and gradients against the float32 reference, with per-slot ranks, an empty slot and tail
rows that belong to no adapter."""

# Shape letters follow docs/glossary.md (I, O: LoRA in/out features). The closures made in loops
# are jitted and run within the same iteration, so late binding (B023) cannot bite.
# ruff: noqa: E741, B023
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.kernels import lora
from rtpjax.kernels import lora_gpu as lg
from rtpjax.kernels import lora_linear as ll
from rtpjax.kernels import lora_matmul_mgpu as mm
from scripts import lora_bench_common as common
from scripts.lora_bench_common import SMOKE_GEMM, _rel, say

# ----------------------------------------------------------------------------- correctness


def ops3(x, a, b):
    return x, a, b


def correctness(config: lg.LoraGpuConfig, quick: bool = False) -> list[dict]:
    rows = []
    shapes = [(1000, 1024, 16, 768, 8, 37, (jnp.bfloat16, jnp.float32)),
              (4096, 4096, 16, 4096, 64, 0, (jnp.bfloat16,))]  # fmt: skip
    if common.SMOKE:
        shapes = [(40, 32, 8, 24, 3, 5, (jnp.bfloat16, jnp.float32))]
    if quick:
        shapes = shapes[:1]
    configs = {"default": config, "fused": lg.FUSED_CONFIG}
    for T, I, R, O, G, tail, dtypes in shapes:
        rng = np.random.default_rng(T)
        sizes = rng.multinomial(T - tail, np.ones(G) / G).astype(np.int32)
        sizes[G // 2] = 0
        rank = rng.integers(1, R + 1, size=G).astype(np.int32)
        k = jax.random.split(jax.random.key(T), 4)
        for dtype in dtypes:
            x = jax.random.normal(k[0], (T, I), dtype)
            a = (jax.random.normal(k[1], (G, I, R)) / np.sqrt(I)).astype(dtype)
            b = jax.random.normal(k[2], (G, R, O)).astype(dtype)
            dy = jax.random.normal(k[3], (T, O), dtype)
            gs, sc, rk = jnp.asarray(sizes), jnp.asarray(rng.uniform(0.5, 2, G), jnp.float32), (
                jnp.asarray(rank))  # fmt: skip
            base0 = jax.random.normal(k[0], (T, O), dtype)

            def run(fn, *ops):
                y, vjp = jax.vjp(lambda x, a, b: fn(x, a, b), *ops)
                return (y, *vjp(dy.astype(y.dtype)))

            f32 = [v.astype(jnp.float32) for v in (*ops3(x, a, b), base0)]
            for with_base in (False, True):
                bb = base0.astype(jnp.float32) if with_base else None
                want = jax.jit(lambda x, a, b, bb=bb: run(
                    lambda x, a, b: lora.ref_lora_delta(x, a, b, gs, sc, rank=rk, base=bb),
                    x, a, b))(*f32[:3])  # fmt: skip
                for cname, cfg in configs.items():
                    be = lg.GpuBackend(cfg, interpret=common.SMOKE)
                    bb = base0 if with_base else None
                    op = lambda x, a, b, be=be, bb=bb: lora.lora_delta_with(
                        be, x, a, b, gs, sc, rank=rk, base=bb)  # fmt: skip
                    got = jax.jit(lambda x, a, b, op=op: run(op, x, a, b))(x, a, b)
                    errs = {n: _rel(g_, w_) for n, g_, w_ in zip(("y", "dx", "da", "db"), got,
                                                                   want, strict=True)}  # fmt: skip
                    tail_ok = True
                    if tail:
                        rest = np.asarray(got[0], np.float32)[T - tail :]
                        ref_rest = np.asarray(base0, np.float32)[T - tail :] if with_base else 0
                        tail_ok = bool((rest == ref_rest).all())
                    finite = all(np.isfinite(np.asarray(v, np.float32)).all() for v in got)
                    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4
                    ok = finite and tail_ok and max(errs.values()) < tol
                    name = f"{cname}{'+base' if with_base else ''}"
                    row = {"shape": [T, I, R, O, G], "dtype": jnp.dtype(dtype).name, "tail": tail,
                           "config": name, "rel_err": errs, "ok": bool(ok)}  # fmt: skip
                    rows.append(row)
                    es = " ".join(f"{n} {e:.1e}" for n, e in errs.items())
                    say(f"check T{T} I{I} R{R} O{O} G{G} {row['dtype']} {name}: {es} -> "
                        f"{'ok' if ok else 'FAIL'}")  # fmt: skip
    return rows


def fused_check() -> list[dict]:
    """lora_linear's fused path (values and grads of x, W, a, b, scale) against the float32
    reference `ref_lora_delta(..., base=x @ W)`: per-slot ranks, an empty slot, tail rows."""
    # The last shape has groups of 512 rows (one empty: its rows become the tail), so the shrink
    # runs inside the GEMM's launch (small_ops "in_gemm").
    shapes = [(1024, 1024, 16, 768, 8, 37), (4096, 4096, 16, 4096, 64, 0),
              (4096, 4096, 16, 4096, 8, -1)]  # fmt: skip
    cfg = mm.DEFAULT_CONFIG
    if common.SMOKE:
        shapes, cfg = [(128, 128, 16, 128, 3, 5), (256, 128, 16, 128, 4, -1)], SMOKE_GEMM
    rows = []
    for T, I, R, O, G, tail in shapes:
        rng = np.random.default_rng(T + 1)
        in_gemm = tail < 0
        if in_gemm:
            sizes = np.full(G, T // G, np.int32)
            tail = T // G
        else:
            sizes = rng.multinomial(T - tail, np.ones(G) / G).astype(np.int32)
        sizes[G // 2] = 0
        if in_gemm:  # the empty slot's rows become the tail: the others stay 64-row aligned
            sizes = np.concatenate([np.delete(sizes, G // 2), [0]]).astype(np.int32)
        rk = jnp.asarray(rng.integers(1, R + 1, size=G).astype(np.int32))
        k = jax.random.split(jax.random.key(T), 5)
        x = jax.random.normal(k[0], (T, I), jnp.bfloat16)
        W = (jax.random.normal(k[4], (I, O)) / np.sqrt(I)).astype(jnp.bfloat16)
        a = (jax.random.normal(k[1], (G, I, R)) / np.sqrt(I)).astype(jnp.bfloat16)
        b = jax.random.normal(k[2], (G, R, O)).astype(jnp.bfloat16)
        dy = jax.random.normal(k[3], (T, O), jnp.bfloat16)
        gs, sc = jnp.asarray(sizes), jnp.asarray(rng.uniform(0.5, 2, G), jnp.float32)

        def run(f, *ops):
            y, vjp = jax.vjp(f, *ops)
            return (y, *vjp(dy.astype(y.dtype)))

        f32 = [v.astype(jnp.float32) for v in (x, W, a, b)]
        want = jax.jit(lambda *o: run(lambda x, W, a, b, sc: lora.ref_lora_delta(
            x, a, b, gs, sc, rank=rk, base=x @ W), *o))(*f32, sc)  # fmt: skip
        cfg = dataclasses.replace(cfg, wg_split="m") if in_gemm else cfg
        plan = ll.lora_plan(gs, T, R, rank=rk, gemm_config=cfg)  # eager: sees the groups
        small = "in_gemm" if in_gemm else "auto"
        if in_gemm and not plan.one_slot:
            raise AssertionError("groups of multiples of 64 rows must allow the in-GEMM shrink")
        fn = lambda x, W, a, b, sc, p: ll.lora_linear(
            x, W, a, b, None, sc, plan=p, impl="fused", gemm_config=cfg, small_ops=small,
            interpret=common.SMOKE)  # fmt: skip
        got = jax.jit(lambda *o: run(lambda *v: fn(*v, o[-1]), *o[:-1]))(x, W, a, b, sc, plan)
        errs = {n: _rel(g_, w_) for n, g_, w_ in
                zip(("y", "dx", "dW", "da", "db", "dscale"), got, want, strict=True)}  # fmt: skip
        tail_ok = True
        if tail:  # rows with no adapter: exactly the kernel's own x @ W (not XLA's: other
            # accumulation order, other bf16 roundings)
            if in_gemm:  # the same kernel with every group empty
                p0 = ll.lora_plan(gs * 0, T, R, rank=rk, gemm_config=cfg)
                plain = fn(x, W, a, b, sc, p0)
            else:
                plain = mm.matmul_expand(x, W, None, None, None, None, cfg=cfg,
                                         interpret=common.SMOKE)  # fmt: skip
            base = np.asarray(plain, np.float32)[T - tail :]
            tail_ok = bool((np.asarray(got[0], np.float32)[T - tail :] == base).all())
        ok = tail_ok and max(errs.values()) < 1e-2
        rows.append({"shape": [T, I, R, O, G], "tail": tail, "small_ops": small, "rel_err": errs,
                     "ok": bool(ok)})  # fmt: skip
        es = " ".join(f"{n} {e:.1e}" for n, e in errs.items())
        say(f"fused check T{T} I{I} R{R} O{O} G{G} tail {tail} {small}: {es} -> "
            f"{'ok' if ok else 'FAIL'}")  # fmt: skip
    return rows
