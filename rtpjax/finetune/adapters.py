"""Adapters as the trainer sees them: the static layout of a run, per-slot values, initial
weights, per-adapter optimizers and schedules, and the memory estimate the dispatcher uses.

Optimizers: each adapter has its own optax optimizer (adamw, sgd or lion) with its own
hyperparameters, schedule and state. Inside the one compiled step, the states of every optimizer
family the run uses are stacked over the G slots (optax.inject_hyperparams keeps the
hyperparameters in the state, so they are per-slot data), and the step picks each slot's family.
Learning rates come from each adapter's optax schedule evaluated on the host at that adapter's own
step count. LoRA+ multiplies the update of B by its ratio, which for these optimizers equals a
learning rate ratio·lr for B.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rtpjax.config import ModelConfig
from rtpjax.finetune.config import AdapterConfig, FinetuneConfig, TaskConfig
from rtpjax.layers.lora import (
    TARGETS,
    LoraLayout,
    target_shape,
)
from rtpjax.models import llama

FAMILIES = ("adamw", "sgd", "lion")


def layout_for(cfg: FinetuneConfig, model: ModelConfig) -> LoraLayout:
    """The static layout of a run: fixed slot count, the largest rank, the union of targets."""
    used = [cfg.adapter_of(t) for t in cfg.tasks]
    targets = tuple(t for t in TARGETS if any(t in a.target_modules for a in used))
    return LoraLayout(
        num_slots=cfg.dispatcher.max_concurrent,
        rank=max(a.rank for a in used),
        targets=targets,
        num_layers=model.num_layers,
        dora=any(a.kind == "dora" for a in used),
        dropout=any(a.dropout > 0 for a in used),
    )


def families_for(cfg: FinetuneConfig) -> tuple[str, ...]:
    names = {cfg.adapter_of(t).optimizer.name for t in cfg.tasks}
    return tuple(f for f in FAMILIES if f in names)


def family_tx(name: str) -> optax.GradientTransformation:
    """The optax optimizer of a family with injectable (per-slot) hyperparameters."""
    if name == "adamw":
        return optax.inject_hyperparams(optax.adamw)(
            learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0
        )
    if name == "sgd":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.0)
    if name == "lion":
        return optax.inject_hyperparams(optax.lion)(
            learning_rate=0.0, b1=0.9, b2=0.99, weight_decay=0.0
        )
    raise ValueError(f"optimizer {name!r} is not supported; allowed: {', '.join(FAMILIES)}")


def family_hyperparams(a: AdapterConfig) -> dict[str, float]:
    o = a.optimizer
    if o.name == "adamw":
        return {"b1": o.betas[0], "b2": o.betas[1], "eps": o.eps, "weight_decay": o.weight_decay}
    if o.name == "sgd":
        return {"momentum": o.momentum}
    return {"b1": o.betas[0], "b2": o.betas[1], "weight_decay": o.weight_decay}


def schedule(a: AdapterConfig, total_steps: int) -> optax.Schedule:
    """The adapter's learning rate as a function of its own optimizer step (0-based)."""
    s, lr = a.schedule, a.learning_rate
    warm = min(s.warmup_steps, max(total_steps - 1, 0))
    if s.name == "constant":
        if warm == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm]
        )
    decay = max(total_steps - warm, 1)
    if s.name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warm, warm + decay, end_value=lr * s.min_lr_ratio
        )
    tail = optax.linear_schedule(lr, lr * s.min_lr_ratio, decay)
    if warm == 0:
        return tail
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), tail], [warm])


@dataclasses.dataclass(frozen=True)
class SlotValues:
    """What a slot holds while a task runs there (host numbers for the per-slot arrays)."""

    scale: float
    rank: int
    dora: float  # 1.0 for DoRA
    dropout: float
    b_lr_ratio: float
    max_grad_norm: float  # inf: no clipping
    family: int  # index into the run's families
    targets: tuple[str, ...]

    @classmethod
    def of(cls, a: AdapterConfig, families: tuple[str, ...]) -> SlotValues:
        return cls(
            scale=a.scale,
            rank=a.rank,
            dora=float(a.kind == "dora"),
            dropout=a.dropout,
            b_lr_ratio=a.b_lr_ratio,
            max_grad_norm=float("inf") if a.max_grad_norm is None else a.max_grad_norm,
            family=families.index(a.optimizer.name),
            targets=a.target_modules,
        )


def empty_slot(layout: LoraLayout) -> SlotValues:
    return SlotValues(
        scale=0.0,
        rank=0,
        dora=0.0,
        dropout=0.0,
        b_lr_ratio=1.0,
        max_grad_norm=float("inf"),
        family=0,
        targets=(),
    )


def adapter_seed(task_name: str, a: AdapterConfig, run_seed: int) -> int:
    """A stable seed per task (crc32, not hash(): the same across processes)."""
    return (zlib.crc32(task_name.encode()) ^ (a.seed * 7919) ^ (run_seed * 104729)) & 0x7FFFFFFF


def init_slot_flat(
    layout: LoraLayout, model: ModelConfig, base: Any, a: AdapterConfig, seed: int | jax.Array
) -> jax.Array:
    """One slot's initial weights as its flat f32[P] row of the bank (layout.flatten order).

    PEFT's default init: A ~ U(±1/sqrt(in)) (kaiming-uniform with a=sqrt(5)), B = 0, DoRA
    magnitude = ‖W‖ per output row. Columns past the adapter's rank and projections it does not
    target are zero. Generated a projection at a time for all layers (a few ops to compile)."""
    key = jax.random.PRNGKey(seed)
    L, R = layout.num_layers, layout.rank
    rank_live = jnp.asarray((np.arange(R) < a.rank).astype(np.float32))  # f32[R]
    fields: dict[str, dict[str, jax.Array]] = {}
    for t in layout.targets:
        I, O = target_shape(model, t)
        k = jax.random.fold_in(key, TARGETS.index(t))
        bound = 1.0 / np.sqrt(I)
        A = jax.random.uniform(k, (L, I, R), jnp.float32, -bound, bound)  # f32[L, I, R]
        A = A * rank_live * float(t in a.target_modules)
        fields[t] = {"a": A, "b": jnp.zeros((L, R, O), jnp.float32)}
        if layout.dora:
            w = base_weights(base, model, t).astype(jnp.float32)  # [L, O, I]
            fields[t]["m"] = jnp.sqrt(jnp.sum(w * w, axis=-1))  # f32[L, O]
    # Walk one layer's template so the order is exactly layout.flatten's.
    paths, _ = jax.tree_util.tree_flatten_with_path(layout.template(model)[0])
    cols = [fields[p[0].key][p[1].name].reshape(L, -1) for p, _ in paths]
    return jnp.concatenate(cols, axis=1).reshape(-1)  # [L, P/L] → [P], layer-major


def base_weights(base: Any, model: ModelConfig, target: str) -> jax.Array:
    """A projection's frozen weight in every layer, HF's [out, in] layout: [L, O, I]."""
    layers = base.layers
    if not isinstance(layers, llama.Layer):
        layers = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    G = model.q_per_kv
    L = model.num_layers
    if target in ("q_proj", "k_proj", "v_proj"):
        part = {"q_proj": slice(0, G), "k_proj": slice(G, G + 1), "v_proj": slice(G + 1, G + 2)}
        w = layers.w_qkv[:, :, part[target]]  # [L, K, g, H, D]
        return w.reshape(L, -1, w.shape[-1])
    if target == "o_proj":
        return layers.w_o.reshape(L, layers.w_o.shape[1], -1)
    if target == "gate_proj":
        return layers.w_gate_up[:, 0]
    if target == "up_proj":
        return layers.w_gate_up[:, 1]
    return layers.w_down


# ------------------------------------------------------------------------------ memory estimate


def adapter_state_bytes(layout: LoraLayout, model: ModelConfig, a: AdapterConfig) -> int:
    """Bytes of one adapter's trained state: weights, accumulated gradient, optimizer moments
    (all float32), at its own rank."""
    n = 0
    for t in a.target_modules:
        I, O = target_shape(model, t)
        n += (I + O) * a.rank + (O if a.kind == "dora" else 0)
    n *= layout.num_layers
    moments = {"adamw": 2, "sgd": 1, "lion": 1}[a.optimizer.name]
    return 4 * n * (2 + moments)


def activation_bytes(
    model: ModelConfig, rows: int, seq: int, itemsize: int, remat: bool, loss_chunk: int
) -> int:
    """Rough peak activation memory of a training step over rows × seq tokens: stored layer
    activations (all layers, or one layer's plus each layer's input with remat), attention
    probabilities, and one chunk of logits."""
    D, F, L = model.hidden_size, model.intermediate_size, model.num_layers
    NH = model.num_heads * model.head_dim
    KH = model.num_kv_heads * model.head_dim
    T = rows * seq
    per_layer = T * (4 * D + 2 * NH + 2 * KH + 3 * F) * itemsize
    per_layer += rows * model.num_heads * seq * seq * (4 + itemsize)  # scores f32 + probs
    layers = (per_layer + L * T * D * itemsize) if remat else per_layer * L
    logits = 3 * min(T, loss_chunk) * model.vocab_size * 4
    return layers + logits


def task_bytes(
    cfg: FinetuneConfig, task: TaskConfig, layout: LoraLayout, model: ModelConfig, itemsize: int
) -> int:
    """What admitting `task` adds to the step's memory (the dispatcher's estimate)."""
    a = cfg.adapter_of(task)
    return adapter_state_bytes(layout, model, a) + activation_bytes(
        model, task.micro, task.max_length, itemsize, cfg.trainer.remat, cfg.trainer.loss_chunk
    )
