"""Multi-adapter training throughput: N LoRA adapters trained at once in one step against the same
N adapters trained one after another, on a Llama-3-8B-shaped random bf16 base generated on the
device (sequence 512, rank 16 on q/k/v/o, N = 1, 4, 8, 16 by default).

    python scripts/bench_finetune.py                       # the issue's figures (GPU)
    python scripts/bench_finetune.py --model tiny --adapters 1 2 --steps 2   # a CPU smoke run

Both modes run the trainer's own compiled step (finetune/step.py: scan over layers, remat, chunked
loss, the batched LoRA operator, per-slot optimizers); one row of `seq` tokens per adapter and
step. Concurrent: one step over N rows with N adapters (G = N slots). Sequential: G = 1, each
adapter trained alone for the same number of steps, one after the other. tokens/s counts every
trained token; peak memory is device.memory_stats()['peak_bytes_in_use'], which only grows, so
each N runs in its own process (sequential first, then concurrent: the larger peak is measured
last). Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rtpjax.config import ModelConfig  # noqa: E402
from rtpjax.finetune import step as st  # noqa: E402
from rtpjax.layers.lora import LoraLayout, SlotParams  # noqa: E402
from rtpjax.models import llama  # noqa: E402
from rtpjax.models.presets import preset  # noqa: E402

MODELS = ("llama3-8b", "llama3-1b", "tiny")  # shapes from rtpjax.models.presets


def random_base(cfg: ModelConfig, dtype, seed: int = 0) -> llama.Params:
    """Random weights created on the device, layers already stacked ([L, ...]) so no copy."""
    spec = llama.spec(cfg, dtype)
    key = jax.random.PRNGKey(seed)
    L = cfg.num_layers

    def make(info, k, lead=(), ones=False):
        shape = lead + info.shape
        if ones:
            return jnp.ones(shape, dtype)
        normal = lambda k: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
        return jax.jit(normal)(k)

    layer = spec.layers[0]
    fields = {}
    for i, f in enumerate(dataclasses.fields(llama.Layer)):
        info = getattr(layer, f.name)
        fields[f.name] = (
            None
            if info is None
            else make(info, jax.random.fold_in(key, i), (L,), ones=f.name.endswith("norm"))
        )
    other = [jax.random.fold_in(key, 100 + i) for i in range(3)]
    return llama.Params(
        embed=make(spec.embed, other[0]),
        layers=llama.Layer(**fields),
        final_norm=jnp.ones((cfg.hidden_size,), dtype),
        lm_head=None if spec.lm_head is None else make(spec.lm_head, other[1]),
    )


def _batch(n_rows: int, seq: int, vocab: int, seed: int) -> st.Batch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (n_rows, seq)).astype(np.int32)
    return st.Batch(
        tokens=tokens,
        targets=np.roll(tokens, -1, axis=1),
        weights=np.full((n_rows, seq), 1.0 / seq, np.float32),
        positions=np.tile(np.arange(seq, dtype=np.int32), (n_rows, 1)),
        segments=np.ones((n_rows, seq), np.int32),
        row_slot=np.arange(n_rows, dtype=np.int32),
    )


def _run(
    base,
    cfg: ModelConfig,
    G: int,
    seq: int,
    rank: int,
    targets: tuple[str, ...],
    steps: int,
    warmup: int,
    attention: str,
    lora_impl: str,
    remat: bool,
    adapters_total: int,
) -> float:
    """Seconds for `adapters_total` adapters × `steps` steps, G of them per step."""
    layout = LoraLayout(num_slots=G, rank=rank, targets=targets, num_layers=cfg.num_layers)
    opts = st.StepOptions(
        cfg=cfg,
        layout=layout,
        attention=attention,
        lora_impl=lora_impl,
        remat=remat,
        loss_chunk=1024,
    )
    train = jax.jit(st.train_step, static_argnames=("opts",), donate_argnames=("state",))
    slots = SlotParams(
        scale=jnp.full((G,), 2.0),
        rank=jnp.full((G,), rank, jnp.int32),
        target_mask=jnp.ones((G, len(targets))),
    )
    hyper = st.SlotHyper(
        lr=jnp.full((G,), 1e-4),
        b_lr_ratio=jnp.ones((G,)),
        max_grad_norm=jnp.ones((G,)),
        family=jnp.zeros((G,), jnp.int32),
        ready=jnp.ones((G,)),
        rank_mask=jnp.ones((G, rank)),
    )
    key = jax.random.PRNGKey(0)
    batch = jax.device_put(_batch(G, seq, cfg.vocab_size, 0))
    P = layout.num_params_per_slot(cfg)
    weights = 0.01 * jax.random.normal(jax.random.PRNGKey(1), (G, P), jnp.float32)
    fresh = lambda: st.init_state(opts).replace(weights=jnp.copy(weights))  # state is donated
    state = fresh()
    for _ in range(warmup):
        state, m = train(base, state, batch, slots, hyper, key, opts=opts)
    jax.block_until_ready((state, m))
    rounds = adapters_total // G
    t0 = time.perf_counter()
    for _ in range(rounds):  # sequential: the next adapter starts from a fresh state
        state = fresh() if rounds > 1 else state
        for _ in range(steps):
            state, m = train(base, state, batch, slots, hyper, key, opts=opts)
    jax.block_until_ready((state, m))
    return time.perf_counter() - t0


def training_benchmark(
    *,
    adapters: tuple[int, ...] = (1, 4, 8, 16),
    model: str = "llama3-8b",
    seq: int = 512,
    rank: int = 16,
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    steps: int = 10,
    warmup: int = 2,
    dtype: str = "bfloat16",
    attention: str | None = None,
    lora_impl: str = "auto",
    remat: bool = True,
    layers: int | None = None,
) -> list[dict]:
    """Rows {mode, adapters, tokens_per_s, step_ms, peak_bytes, …} for each N, sequential then
    concurrent (with `speedup` = concurrent / sequential tokens/s), in this process."""
    cfg = preset(model)
    if layers is not None:  # a shallower model of the same shapes (quick checks)
        cfg = dataclasses.replace(cfg, num_layers=layers)
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    on_gpu = jax.default_backend() == "gpu"
    attention = attention or ("cudnn" if on_gpu and dt == jnp.bfloat16 else "xla")
    base = random_base(cfg, dt)
    dev = jax.devices()[0]
    rows = []
    for n in adapters:
        out = {}
        for mode, G in (("sequential", 1), ("concurrent", n)):
            secs = _run(
                base,
                cfg,
                G,
                seq,
                rank,
                targets,
                steps,
                warmup,
                attention,
                lora_impl,
                remat,
                adapters_total=n,
            )
            tokens = n * steps * seq
            stats = dev.memory_stats() or {}
            out[mode] = {
                "mode": mode,
                "adapters": n,
                "model": model,
                "seq": seq,
                "rank": rank,
                "targets": list(targets),
                "steps_per_adapter": steps,
                "tokens_per_s": tokens / secs,
                "step_ms": 1e3 * secs / (steps * n // G),
                "peak_bytes": stats.get("peak_bytes_in_use"),
                "device": dev.device_kind,
                "attention": attention,
                "lora_impl": lora_impl,
                "remat": remat,
                "dtype": dtype,
                "layers": cfg.num_layers,
            }
        out["concurrent"]["speedup"] = (
            out["concurrent"]["tokens_per_s"] / out["sequential"]["tokens_per_s"]
        )
        rows += [out["sequential"], out["concurrent"]]
    return rows


def _table(rows: list[dict]) -> str:
    lines = [
        f"{'N':>3} {'mode':<11} {'tokens/s':>10} {'step ms':>9} {'peak GiB':>9} {'speedup':>8}"
    ]
    for r in rows:
        peak = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:9.2f}"
        sp = f"{r['speedup']:8.2f}x" if "speedup" in r else ""
        lines.append(
            f"{r['adapters']:>3} {r['mode']:<11} {r['tokens_per_s']:>10.0f} "
            f"{r['step_ms']:>9.1f} {peak:>9} {sp:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--model", choices=MODELS, default="llama3-8b")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per adapter")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--attention", choices=("xla", "cudnn"), default=None)
    p.add_argument("--lora-impl", default="auto")
    p.add_argument("--no-remat", action="store_true")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (quick checks)")
    p.add_argument(
        "--same-process", action="store_true", help="run every N here (peak memory then only grows)"
    )
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_finetune.json"))
    args = p.parse_args(argv)
    kw = dict(
        model=args.model,
        seq=args.seq,
        rank=args.rank,
        targets=tuple(args.targets),
        steps=args.steps,
        warmup=args.warmup,
        dtype=args.dtype,
        attention=args.attention,
        lora_impl=args.lora_impl,
        remat=not args.no_remat,
    )
    if args.same_process or len(args.adapters) == 1:
        rows = training_benchmark(adapters=tuple(args.adapters), **kw)
    else:
        rows = []
        for n in args.adapters:
            cmd = [sys.executable, __file__, "--adapters", str(n), "--out", args.out + f".{n}"]
            for k, v in kw.items():
                if k not in ("targets", "remat", "attention") and v is not None:
                    cmd += [f"--{k.replace('_', '-')}", str(v)]
            cmd += ["--targets", *args.targets] + (["--no-remat"] if args.no_remat else [])
            cmd += ["--attention", args.attention] if args.attention else []
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(args.out + f".{n}") as f:
                rows += json.load(f)["rows"]
            os.remove(args.out + f".{n}")
    print(_table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
