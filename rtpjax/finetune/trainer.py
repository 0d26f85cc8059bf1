"""The multi-adapter trainer: the host loop around the jitted step (finetune/step.py).

Life of a run:
1. Load the frozen base, build the static layout (G slots = dispatcher.max_concurrent, the largest
   rank, the union of target modules) and the compiled functions: `train_step` (bucketed [B, S]),
   `eval_step`, `install` (a task's fresh weights and optimizer state into a slot).
2. The dispatcher admits queued tasks while slots and the memory estimate allow; each admitted
   task gets a slot, PEFT-initialised weights and a fresh optimizer state.
3. Every device step takes one micro-batch from every running task (its grain stream), lays the
   rows out sorted by slot, pads to a bucket and runs `train_step`; a task whose optimizer step is
   complete is flagged ready and updated with its own learning rate, clipping and optimizer.
4. Per task: evaluation and PEFT export at their intervals; at its last step a final evaluation and
   export, then the dispatcher retires it and the next queued task starts in the freed slot while
   the others keep going.
5. Every `checkpoint_interval` device steps (and at the end) an Orbax checkpoint holds the device
   state and the host state; a run started again on the same output_dir resumes from it and ends
   with bitwise the same adapters as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.finetune import adapters as ad
from rtpjax.finetune import step as st
from rtpjax.finetune.base import Base, load_base
from rtpjax.finetune.batching import build_batch
from rtpjax.finetune.checkpoint import RunCheckpointer, fingerprint
from rtpjax.finetune.config import FinetuneConfig
from rtpjax.finetune.data import TaskStream, eval_rows, load_dataset
from rtpjax.finetune.dispatcher import Dispatcher
from rtpjax.finetune.peft import export_adapter
from rtpjax.finetune.report import MetricsLog, Progress, plot_losses
from rtpjax.finetune.task_run import TaskRun
from rtpjax.layers.lora import SlotParams
from rtpjax.models import llama

logger = logging.getLogger("rtpjax.finetune")
EVAL_ROWS = 32  # rows per evaluation batch


class Trainer:
    def __init__(self, cfg: FinetuneConfig, base: Base | None = None, *, resume: bool = True):
        self.cfg = cfg
        self.base = base or load_base(cfg)
        if not isinstance(self.base.params.layers, llama.Layer):
            self.base.params = st.stack_layers(self.base.params)  # one scan over layers
        mcfg = self.base.config
        if mcfg.kv_head_replication != 1:
            raise ValueError("fine-tuning needs the checkpoint's own KV heads (tensor_parallel 1)")
        self.layout = ad.layout_for(cfg, mcfg)
        self.families = ad.families_for(cfg)
        self.opts = st.StepOptions(
            cfg=mcfg,
            layout=self.layout,
            families=self.families,
            attention=cfg.trainer.attention,
            lora_impl=cfg.trainer.lora_impl,
            remat=cfg.trainer.remat,
            packed=any(t.packing for t in cfg.tasks),
            loss_chunk=cfg.trainer.loss_chunk,
        )
        self.out = os.path.abspath(cfg.output_dir)  # relative to the working directory
        os.makedirs(self.out, exist_ok=True)
        self.tasks = self._make_tasks()
        itemsize = jnp.dtype(self.base.params.embed.dtype).itemsize
        est = {t.name: ad.task_bytes(cfg, t, self.layout, mcfg, itemsize) for t in cfg.tasks}
        self.dispatcher = Dispatcher(
            self.layout.num_slots,
            self._budget(),
            est.__getitem__,
            queue=[t.name for t in cfg.tasks],
        )
        self.slot_values = [ad.empty_slot(self.layout)] * self.layout.num_slots
        self.key = jax.random.PRNGKey(cfg.seed)
        self.state = _init_state(self.opts)
        self.device_step = 0
        self.progress = Progress(cfg.trainer.progress)
        self.ckpt = RunCheckpointer(
            os.path.join(self.out, "checkpoints"), cfg.trainer.keep_checkpoints
        )
        self.fingerprint = run_fingerprint(cfg)
        resume_at = self._resume() if resume else None
        self.log = MetricsLog(os.path.join(self.out, "metrics.jsonl"), resume_at)
        self.results: dict[str, dict] = {}

    # ------------------------------------------------------------------------------ setup

    def _budget(self) -> int | None:
        if self.cfg.dispatcher.memory_budget is not None:
            return self.cfg.dispatcher.memory_budget
        stats = jax.devices()[0].memory_stats() or {}
        limit = stats.get("bytes_limit")
        if limit is None:
            return None
        base = sum(x.nbytes for x in jax.tree.leaves(self.base.params))
        return max(int(0.9 * limit) - base, 0)

    def _make_tasks(self) -> dict[str, TaskRun]:
        cache: dict[str, tuple] = {}
        out = {}
        for t in self.cfg.tasks:
            if t.dataset not in cache:
                cache[t.dataset] = load_dataset(
                    self.cfg.datasets[t.dataset], self.cfg.resolve, self.cfg.seed
                )
            train, held = cache[t.dataset]
            stream = TaskStream(train, self.base.tokenizer, t, self.cfg.seed)
            rows = stream.count_rows() if t.packing else len(train) * t.epochs
            total = math.ceil(rows / t.batch_size)
            if t.max_steps is not None:
                total = min(total, t.max_steps)
            a = self.cfg.adapter_of(t)
            out[t.name] = TaskRun(
                cfg=t,
                adapter=a,
                stream=stream,
                total_steps=total,
                eval_rows=eval_rows(held, self.base.tokenizer, t.max_length, t.eval_examples),
                seed=ad.adapter_seed(t.name, a, self.cfg.seed),
                lr=ad.schedule(a, total),
            )
        return out

    # ---------------------------------------------------------------------------- slots

    def _slot_arrays(self, lrs: dict[int, float] | None = None, ready: set[int] = frozenset()):
        G, R = self.layout.num_slots, self.layout.rank
        v = self.slot_values
        tm = np.array([[float(t in s.targets) for t in self.layout.targets] for s in v], np.float32)
        slots = SlotParams(
            scale=np.array([s.scale for s in v], np.float32),
            rank=np.array([s.rank for s in v], np.int32),
            dora=np.array([s.dora for s in v], np.float32) if self.layout.dora else None,
            dropout=np.array([s.dropout for s in v], np.float32) if self.layout.dropout else None,
            target_mask=tm,
        )
        lr = np.zeros((G,), np.float32)
        for slot, value in (lrs or {}).items():
            lr[slot] = value
        hyper = st.SlotHyper(
            lr=lr,
            b_lr_ratio=np.array([s.b_lr_ratio for s in v], np.float32),
            max_grad_norm=np.array([s.max_grad_norm for s in v], np.float32),
            family=np.array([s.family for s in v], np.int32),
            ready=np.array([float(g in ready) for g in range(G)], np.float32),
            rank_mask=(np.arange(R)[None, :] < np.array([s.rank for s in v])[:, None]).astype(
                np.float32
            ),
        )
        return slots, hyper

    def _start(self, name: str, slot: int) -> None:
        tr = self.tasks[name]
        a = tr.adapter
        hyper = {k: jnp.float32(v) for k, v in ad.family_hyperparams(a).items()}
        self.state = _install(
            self.state,
            self.base.params,
            jnp.int32(slot),
            jnp.uint32(tr.seed),
            hyper,
            opts=self.opts,
            adapter=a,
        )
        self.slot_values[slot] = ad.SlotValues.of(a, self.families)
        self.progress.start(name, slot, tr.total_steps, tr.step)
        logger.info(
            "task %s started in slot %d (%s rank %d, %d steps)",
            name,
            slot,
            a.kind,
            a.rank,
            tr.total_steps,
        )

    def _finish(self, name: str) -> None:
        tr = self.tasks[name]
        slot = self.dispatcher.running[name]
        tr.done = True
        self.results[name] = self._evaluate(name, slot, final=True)
        self._export(name, slot, os.path.join(self.out, name, "final"))
        self.dispatcher.retire(name)
        self.slot_values[slot] = ad.empty_slot(self.layout)
        self.progress.close(name)
        logger.info("task %s finished after %d steps: %s", name, tr.step, self.results[name])

    def _export(self, name: str, slot: int, path: str) -> None:
        bank = self.layout.unflatten(self.state.weights[slot][None], self.base.config)
        export_adapter(path, bank, 0, self.tasks[name].adapter, self.base.name)

    # ------------------------------------------------------------------------ evaluation

    def _evaluate(self, name: str, slot: int, final: bool = False) -> dict:
        tr = self.tasks[name]
        if not tr.eval_rows:
            return {}
        res = evaluate_rows(
            self.opts,
            self.base.params,
            self.state.weights,
            self._slot_arrays()[0],
            slot,
            tr.eval_rows,
        )
        self.log.write(
            {
                "task": name,
                "step": tr.step,
                "eval_loss": res["loss"],
                "exact_match": res["exact_match"],
                "final": final,
            }
        )
        logger.info(
            "eval %s step %d: loss %.4f exact match %.3f",
            name,
            tr.step,
            res["loss"],
            res["exact_match"],
        )
        return res

    # ------------------------------------------------------------------------ checkpoints

    def _save(self) -> None:
        host = {
            "device_step": self.device_step,
            "dispatcher": self.dispatcher.state_dict(),
            "tasks": {n: t.host_state() for n, t in self.tasks.items()},
            "metrics_offset": self.log.offset,
            "fingerprint": self.fingerprint,
            "results": self.results,
        }
        self.ckpt.save(self.device_step, self.state, host)

    def _resume(self) -> int | None:
        step = self.ckpt.latest_step()
        if step is None:
            return None
        state, host = self.ckpt.restore(step, self.state)
        if host["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"{self.ckpt.directory}: checkpoints were written by a different "
                "config; use another output_dir or start fresh (--fresh)"
            )
        self.state = jax.tree.map(jnp.asarray, state)
        self.device_step = host["device_step"]
        self.dispatcher.load_state_dict(host["dispatcher"])
        for name, s in host["tasks"].items():
            self.tasks[name].load_host_state(s)
        self.results = host.get("results", {})
        for name, slot in sorted(self.dispatcher.running.items(), key=lambda x: x[1]):
            self.slot_values[slot] = ad.SlotValues.of(self.tasks[name].adapter, self.families)
            self.progress.start(name, slot, self.tasks[name].total_steps, self.tasks[name].step)
        logger.info("resumed from checkpoint %d (%s)", step, self.ckpt.directory)
        return host["metrics_offset"]

    # ------------------------------------------------------------------------------ loop

    def run(self) -> dict[str, dict]:
        """Train every task to the end; returns each task's final evaluation."""
        t0 = time.time()
        pending: list = []
        while True:
            for name in [n for n in self.dispatcher.running if self.tasks[n].done]:
                self._flush(pending)
                self._finish(name)
            for name, slot in self.dispatcher.admit():
                self._start(name, slot)
            if self.dispatcher.done:
                break
            parts, ready, lrs, info = [], set(), {}, []
            for name, slot in sorted(self.dispatcher.running.items(), key=lambda x: x[1]):
                tr = self.tasks[name]
                got = tr.next_micro()
                if got is None:
                    tr.done = True
                    continue
                rows, is_ready = got
                parts.append((slot, rows, tr.norm))
                lrs[slot] = float(tr.lr(tr.step))
                if is_ready:
                    ready.add(slot)
                    info.append((name, slot, tr.step, lrs[slot]))
            if not parts:
                continue
            slots, hyper = self._slot_arrays(lrs, ready)
            self.state, metrics = _train_step(
                self.base.params,
                self.state,
                build_batch(parts),
                slots,
                hyper,
                self.key,
                opts=self.opts,
            )
            self.device_step += 1
            self._flush(pending)
            pending.append((metrics, info))
            for name, slot, _, _ in info:
                self._after_optimizer_step(name, slot, pending)
            if self.device_step % self.cfg.trainer.checkpoint_interval == 0:
                self._flush(pending)
                self._save()
        self._flush(pending)
        self._save()
        self.progress.close_all()
        if self.cfg.trainer.plot:
            path = plot_losses(self.log.records(), os.path.join(self.out, "loss.png"))
            logger.info("loss curves: %s", path)
        logger.info("done: %d device steps in %.1f s", self.device_step, time.time() - t0)
        return self.results

    def _after_optimizer_step(self, name: str, slot: int, pending: list) -> None:
        tr = self.tasks[name]
        tr.step += 1
        tr.consumed = 0
        t = tr.cfg
        if tr.step >= tr.total_steps:
            tr.done = True
            return
        if t.eval_interval and tr.step % t.eval_interval == 0:
            self._flush(pending)
            self._evaluate(name, slot)
        if t.save_interval and tr.step % t.save_interval == 0:
            self._export(name, slot, os.path.join(self.out, name, f"step-{tr.step}"))

    def _flush(self, pending: list) -> None:
        """Write the metrics of finished steps (fetched late, so the host runs ahead)."""
        while pending:
            metrics, info = pending.pop(0)
            if not info:
                continue
            loss, norm = jax.device_get((metrics["loss"], metrics["grad_norm"]))
            for name, slot, step, lr in info:
                rec = {
                    "task": name,
                    "step": step + 1,
                    "loss": float(loss[slot]),
                    "grad_norm": float(norm[slot]),
                    "lr": lr,
                    "device_step": self.device_step,
                }
                self.log.write(rec)
                self.progress.update(name, rec["loss"])
                if (step + 1) % self.cfg.trainer.log_interval == 0 or step == 0:
                    logger.info(
                        "%s step %d/%d loss %.4f lr %.2e grad norm %.3f",
                        name,
                        step + 1,
                        self.tasks[name].total_steps,
                        rec["loss"],
                        lr,
                        rec["grad_norm"],
                    )


def run_fingerprint(cfg: FinetuneConfig) -> str:
    """What must not change between a checkpoint and its resume (not logging or checkpointing)."""
    d = dataclasses.asdict(cfg)
    d.pop("base_dir")
    for k in ("progress", "plot", "log_interval", "checkpoint_interval", "keep_checkpoints"):
        d["trainer"].pop(k)
    return fingerprint(d)


# The compiled functions, module-level so every Trainer of the same layout and shapes shares them.
_train_step = jax.jit(st.train_step, static_argnames=("opts",), donate_argnames=("state",))
_eval_step = jax.jit(st.eval_step, static_argnames=("opts",))
_init_state = jax.jit(st.init_state, static_argnames=("opts",))


@functools.partial(jax.jit, static_argnames=("opts", "adapter"), donate_argnames=("state",))
def _install(
    state: st.TrainState,
    base: llama.Params,
    slot: jax.Array,
    seed: jax.Array,
    hyper: dict,
    *,
    opts: st.StepOptions,
    adapter,
) -> st.TrainState:
    """Start a task in `slot`: fresh PEFT-style weights, fresh optimizer states (its own family's
    with its hyperparameters), cleared accumulators."""
    flat = ad.init_slot_flat(opts.layout, opts.cfg, base, adapter, seed)  # f32[P]
    put = lambda bank, new: bank.at[slot].set(new)
    opt = {}
    for f in state.opt:
        fresh = ad.family_tx(f).init(flat)
        if f == adapter.optimizer.name:
            fresh = fresh._replace(hyperparams={**fresh.hyperparams, **hyper})
        opt[f] = jax.tree.map(put, state.opt[f], fresh)
    return state.replace(
        weights=state.weights.at[slot].set(flat),
        opt=opt,
        grads=state.grads.at[slot].set(0.0),
        loss=state.loss.at[slot].set(0.0),
    )


def evaluate_rows(
    opts: st.StepOptions,
    base: llama.Params,
    weights: jax.Array,
    slots: SlotParams,
    slot: int,
    rows: list[dict],
) -> dict:
    """Mean target-token loss and exact-match rate of `rows` under adapter `slot` (-1: base);
    weights: the flat bank f32[G, P]."""
    total, count, exact = 0.0, 0.0, 0
    for i in range(0, len(rows), EVAL_ROWS):
        chunk = rows[i : i + EVAL_ROWS]
        norm = float(sum(r["mask"].sum() for r in chunk))
        batch = build_batch([(slot, chunk, norm)])
        ce, n, ok = jax.device_get(_eval_step(base, weights, batch, slots, opts=opts))
        k = len(chunk)
        total += float(ce[:k].sum())
        count += float(n[:k].sum())
        exact += int(ok[:k].sum())
    return {"loss": total / max(count, 1.0), "exact_match": exact / len(rows), "n": len(rows)}
