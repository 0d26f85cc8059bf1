"""Evaluate saved adapters: every adapter (and the bare base) on every task's held-out rows, in one
bank, through the trainer's compiled evaluation step.

Exact match is teacher-forced: an example counts when the argmax at every target position is the
target token, which is exactly when greedy decoding reproduces the answer (each greedy step then
sees the true prefix), end-of-turn token included.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from rtpjax.finetune import step as st
from rtpjax.finetune.base import Base
from rtpjax.finetune.peft import PeftAdapter, place_adapter, read_adapter
from rtpjax.finetune.trainer import evaluate_rows
from rtpjax.layers.lora import TARGETS, LoraLayout, SlotParams
from rtpjax.models import llama

BASE = "base"  # the row of the bare base model in cross_evaluate's result


def adapter_bank(base: Base, adapters: dict[str, PeftAdapter]):
    """(StepOptions, flat bank f32[G, P], SlotParams) holding `adapters` in slots 0..G-1."""
    items = list(adapters.values())
    cfg = base.config
    layout = LoraLayout(
        num_slots=len(items),
        rank=max(a.rank for a in items),
        targets=tuple(t for t in TARGETS if any(t in a.targets for a in items)),
        num_layers=cfg.num_layers,
        dora=any(a.use_dora for a in items),
    )
    bank = layout.zeros(cfg)
    for slot, a in enumerate(items):
        bank = place_adapter(bank, slot, a, layout)
    slots = SlotParams(
        scale=np.array([a.scale for a in items], np.float32),
        rank=np.array([a.rank for a in items], np.int32),
        dora=np.array([float(a.use_dora) for a in items], np.float32) if layout.dora else None,
        target_mask=np.array(
            [[float(t in a.targets) for t in layout.targets] for a in items], np.float32
        ),
    )
    return st.StepOptions(cfg=cfg, layout=layout), layout.flatten(bank), slots


def cross_evaluate(
    base: Base, adapter_dirs: dict[str, str], rows: dict[str, list[dict]]
) -> dict[str, dict[str, dict]]:
    """result[adapter or "base"][task] = {"loss", "exact_match", "n"} for every pair."""
    adapters = {name: read_adapter(path, base.config) for name, path in adapter_dirs.items()}
    opts, flat, slots = adapter_bank(base, adapters)
    params = base.params
    if not isinstance(params.layers, llama.Layer):
        params = st.stack_layers(params)
    out: dict[str, dict[str, dict]] = {}
    for slot, name in [(-1, BASE), *enumerate(adapters)]:
        out[name] = {
            task: evaluate_rows(opts, params, jnp.asarray(flat), slots, slot, task_rows)
            for task, task_rows in rows.items()
        }
    return out
