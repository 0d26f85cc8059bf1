"""scripts/bench_lora.py's tuning sweeps: the block shapes of each of the operator's kernels timed
alone (`sweep`, --sweep) and the fastest LoRA GPU config they pick (`best_config`), and
gmm_tgmm's shapes against the two kernels it replaces, by device time (`udb_sweep`, --udb-sweep)."""

# Shape letters follow docs/glossary.md. The closures made in loops are jitted and run within the
# same iteration, so late binding (B023) cannot bite.
# ruff: noqa: B023
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rtpjax.kernels import lora
from rtpjax.kernels import lora_gpu as lg
from rtpjax.kernels import lora_gpu_udb as udb
from scripts import lora_bench_common as common
from scripts.lora_bench_common import _rel, device_breakdown, operands, say, timed


def _udb_configs() -> list[lg.KernelConfig]:
    K = lg.KernelConfig
    if common.SMOKE:
        return [K(block_t=16, block_n=32), K(block_t=32, block_n=64, splits=2)]
    d = lg.DEFAULT_CONFIG.udb
    shapes = [K(32, 16, 128), K(32, 16, 256), K(64, 16, 128), d, K(64, 16, 256, num_stages=4),
              K(128, 16, 256, num_warps=8), K(64, 16, 512, num_warps=8),
              K(128, 16, 128, num_warps=8)]  # fmt: skip
    # the default shape with forced row splits (0 = automatic: 16 / 2 / 1 at G = 1 / 8 / 64)
    return shapes + [dataclasses.replace(d, splits=s) for s in (1, 2, 4, 8, 16)]


def udb_sweep() -> list[dict]:
    """gmm_tgmm (u and dB from one pass over dy) alone, for a few (block_t, block_n, warps,
    stages, splits), against the two kernels it replaces (gmm with trans for u, tgmm for dB,
    DEFAULT_CONFIG's shapes): device time per call from the profiler, kernels and the XLA sums
    and masks that come with them; and each one's u and dB against the two kernels'."""
    T, D, R = (4096, 4096, 16) if not common.SMOKE else (128, 128, 16)
    lcfg = lg.DEFAULT_CONFIG
    rows = []
    for G in (1, 8, 64) if not common.SMOKE else (1, 3):
        _, _, _, b, gs, sc, dy = operands(G, T, D, R)
        m = jax.jit(lambda gs, sc: lora.group_meta(gs, sc, None, T, R))(gs, sc)
        s = jax.random.normal(jax.random.key(11), (T, R), jnp.float32)
        sp = jnp.where(lora.live_mask(m, R), s * lora.row_scale(m)[:, None], 0.0).astype(dy.dtype)

        def two(dy, b, sp, m):
            u = lg.gmm(dy, b, m, True, jnp.float32, cfg=lcfg.shrink_t, interpret=common.SMOKE)
            u = jnp.where(lora.live_mask(m, R), u, 0.0)
            return u, lg.tgmm(sp, dy, m, G, b.dtype, cfg=lcfg.tgmm, interpret=common.SMOKE)

        cases = {"two kernels (gmm_t + tgmm)": jax.jit(two)}
        for c in _udb_configs():
            label = (f"udb t{c.block_t} n{c.block_n} w{c.num_warps} st{c.num_stages} "
                     f"S{c.splits or 'auto'}")  # fmt: skip
            cases[label] = jax.jit(lambda dy, b, sp, m, c=c: udb.gmm_tgmm(
                dy, b, sp, m, b.dtype, cfg=c, interpret=common.SMOKE))  # fmt: skip
        args = (dy, b, sp, m)
        ref = None
        for name, fn in cases.items():
            try:
                got = fn(*args)
                ref = got if ref is None else ref
                err = {"u": _rel(got[0], ref[0]), "db": _rel(got[1], ref[1])}
                k = device_breakdown(fn, args)
            except Exception as e:  # a shape that does not compile is reported, not fatal
                say(f"udb G={G} {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
                rows.append({"G": G, "case": name, "error": f"{type(e).__name__}: {e}"[:2000]})
                continue
            total = sum(k.values())
            lora_us = sum(v for n, v in k.items() if "lora_" in n)
            row = {"G": G, "case": name, "device_us": total, "lora_kernels_us": lora_us,
                   "rel_err_vs_two": err, "kernels": k}  # fmt: skip
            rows.append(row)
            top = sorted(k.items(), key=lambda kv: -kv[1])
            say(f"udb G={G:3d} {name:30s} device {total:6.1f} us (lora kernels {lora_us:6.1f}) "
                f"err u {err['u']:.1e} dB {err['db']:.1e} | "
                + ", ".join(f"{n[:32]} {v:.1f}" for n, v in top[:4]))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------- sweep


def sweep(bw: float) -> dict:
    """Each kernel alone at G = 1 and 64 over a few block shapes."""
    T, D, R = (4096, 4096, 16) if not common.SMOKE else (64, 32, 16)
    K = lg.KernelConfig
    fwd_cfgs = [K(16, 64, 128), K(32, 64, 128), K(32, 128, 256, num_warps=8), K(64, 64, 128),
                K(16, 128, 64, num_stages=4)]  # fmt: skip
    shrink_cfgs = [K(16, 64), K(32, 128), K(64, 64), K(64, 128, num_warps=8)]
    expand_cfgs = [K(32, 16, 128), K(64, 16, 256, num_warps=8), K(128, 16, 128),
                   K(128, 16, 256, num_warps=8)]  # fmt: skip
    tgmm_cfgs = [K(64, 64, 64), K(128, 64, 64), K(64, 128, 64, num_warps=8), K(32, 32, 32)]
    out: dict = {}
    timings: dict = {}  # kind -> config -> [us at each G]
    for G in (64, 1) if not common.SMOKE else (2,):
        few = G == 1  # at G = 1 only the fused forward and the tgmm (row splits) are timed
        x, _, a, b, gs, sc, dy = operands(G, T, D, R)
        m = lora.group_meta(gs, sc, None, T, R)
        vmap_ = lambda c: lg.visit_map(m, T, c.block_t)
        s = jax.random.normal(jax.random.key(3), (T, R), jnp.float32)
        sb = s.astype(x.dtype)
        # n calls in one jit, each on its own copy of the metadata (equal values XLA cannot see
        # through, so no call is merged), so the host's dispatch cost is paid once per n.
        n = 10 if not common.SMOKE else 1
        lim = jnp.stack([jnp.full((G,), T, jnp.int32)] * n)  # i32[n, G]

        def many(kernel):
            def f(lim, *args):
                return [kernel(m._replace(rank=jnp.minimum(m.rank, lim[i]),
                                          ends=jnp.minimum(m.ends, lim[i])), *args)
                        for i in range(n)]  # fmt: skip

            return jax.jit(f)

        K_ = {}
        cfgs = {}  # name -> config
        for c in fwd_cfgs:
            vm = vmap_(c)
            cfgs[f"fused {c}"] = c
            K_[f"fused {c}"] = (lambda m, x, a, b, c=c, vm=vm: lg._fwd(
                x, a, b, m, vm, c, True, common.SMOKE), (x, a, b))  # fmt: skip
        for c in [] if few else shrink_cfgs:
            vm = vmap_(c)
            cfgs[f"shrink {c}"] = c
            K_[f"shrink {c}"] = (lambda m, x, a, b, c=c, vm=vm: lg._fwd(
                x, a, b, m, vm, c, False, common.SMOKE)[0], (x, a, b))  # fmt: skip
            cfgs[f"shrink_t {c}"] = c
            K_[f"shrink_t {c}"] = (lambda m, dy, b, c=c, vm=vm: lg.gmm(
                dy, b, m, True, jnp.float32, cfg=c, vm=vm, interpret=common.SMOKE),
                (dy, b))  # fmt: skip
        for c in [] if few else expand_cfgs:
            vm = vmap_(c)
            kw = dict(k_is_rank=True, interpret=common.SMOKE, vm=vm)
            cfgs[f"expand {c}"] = c
            K_[f"expand {c}"] = (lambda m, s, b, c=c, kw=kw: lg.gmm(
                s, b, m, False, s.dtype, cfg=c, **kw), (sb, b))  # fmt: skip
            cfgs[f"expand_t {c}"] = c
            K_[f"expand_t {c}"] = (lambda m, s, a, c=c, kw=kw: lg.gmm(
                s, a, m, True, s.dtype, cfg=c, **kw), (sb, a))  # fmt: skip
        for c in tgmm_cfgs:
            cfgs[f"tgmm_a {c}"] = c
            K_[f"tgmm_a {c}"] = (lambda m, x, s, c=c: lg.tgmm(
                x, s, m, G, x.dtype, cfg=c, interpret=common.SMOKE), (x, sb))  # fmt: skip
            cfgs[f"tgmm_b {c}"] = c
            K_[f"tgmm_b {c}"] = (lambda m, s, dy, c=c: lg.tgmm(
                s, dy, m, G, s.dtype, cfg=c, interpret=common.SMOKE), (sb, dy))  # fmt: skip
        res = {}
        for name, (kern, args) in K_.items():
            try:
                t = timed({"k": many(kern)}, {"k": (lim, *args)}, reps=5, rounds=5)["k"]
                res[name] = t / n * 1e6
            except Exception as e:
                res[name] = f"{type(e).__name__}: {str(e)[:200]}"
            v = res[name]
            say(f"sweep G={G} {name}: {v if isinstance(v, str) else f'{v:.1f} us'}")
        out[f"G{G}"] = res
        for name in K_:
            timings.setdefault(name.split(" ")[0], {}).setdefault(cfgs[name], []).append(res[name])
        # bytes each kernel must move, for reading the sweep against the copy ceiling
        e = 2
        out[f"G{G}_floor_us"] = {
            "fused": (2 * T * D * e) / bw * 1e6, "shrink": T * D * e / bw * 1e6,
            "expand": T * D * e / bw * 1e6, "tgmm": T * D * e / bw * 1e6,
        }  # fmt: skip
    out["best"] = best_config(timings)
    say(f"sweep: best {out['best']}")
    return out


def best_config(timings: dict) -> lg.LoraGpuConfig:
    """The fastest shape of each kernel (summed over the G it was timed at and over the two
    uses of one config), and fused vs shrink + expand for the forward (compared at G=64, the
    one G where both were timed)."""

    def pick(*kinds):
        tot: dict = {}
        for k in kinds:
            for c, ts in timings.get(k, {}).items():
                if all(isinstance(t, float) for t in ts):
                    tot[c] = tot.get(c, 0.0) + sum(ts)
        return min(tot, key=tot.get) if tot else None

    d = lg.DEFAULT_CONFIG
    fused, shrink = pick("fused"), pick("shrink")
    expand, shrink_t, tg = pick("expand", "expand_t"), pick("shrink_t"), pick("tgmm_a", "tgmm_b")
    first = lambda kind, c: timings[kind][c][0] if c is not None else 1e30
    use_fused = shrink is None or expand is None or (
        first("fused", fused) <= first("shrink", shrink) + first("expand", expand))  # fmt: skip
    return lg.LoraGpuConfig(
        fwd=(fused if use_fused else shrink) or d.fwd,
        expand=expand or d.expand,
        shrink_t=shrink_t or d.shrink_t,
        tgmm=tg or d.tgmm,
        fused_fwd=bool(use_fused),
    )
