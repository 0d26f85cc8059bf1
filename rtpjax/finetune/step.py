"""The device side of multi-adapter training: pure functions that trainer.py jits.

One step takes a batch of B rows × S tokens. Rows are sorted by adapter slot (empty rows last), so
the LoRA operator gets contiguous groups; every row belongs to one slot. The loss of token t is
weighted by `weights[t]` = 1 / (target tokens of its adapter's whole optimizer step) on target
tokens and 0 elsewhere, so summing over micro-batches gives each adapter the mean over its own
unmasked target tokens. Adapters share no parameters, so the gradient of the sum over adapters is,
for each slot, the gradient of its own mean loss.

`train_step` adds the batch's gradients to the state's accumulator and, for the slots flagged
`ready` (their optimizer step is complete), clips by that slot's own gradient norm, runs that
slot's optimizer with its learning rate, applies the update and clears the accumulator. The
optimizer work is done for all slots and kept where ready: it is tiny beside the base model, and it
keeps one compiled program for every mix of tasks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.config import ModelConfig
from rtpjax.finetune.adapters import family_tx
from rtpjax.finetune.attention import RowAttention, RowMeta
from rtpjax.layers.lora import AdapterWeights, LoraLayout, LoraWeights, MultiLora, SlotParams
from rtpjax.layers.norm import rms_norm
from rtpjax.layers.rope import cos_sin, inv_freq
from rtpjax.models import llama


class Batch(NamedTuple):
    tokens: jax.Array  # i32[B, S]
    targets: jax.Array  # i32[B, S]  next token
    weights: jax.Array  # f32[B, S]  loss weight (see module docstring); 0 on prompt and padding
    positions: jax.Array  # i32[B, S]  rotary position (restarts per packed segment)
    segments: jax.Array  # i32[B, S]  packed segment id, 0 = padding
    row_slot: jax.Array  # i32[B]  adapter slot of each row, -1 = empty; sorted, empties last


class SlotHyper(NamedTuple):
    """Per-slot optimizer inputs of one step (arrays: changing them never recompiles)."""

    lr: jax.Array  # f32[G]  this step's learning rate of each slot's schedule
    b_lr_ratio: jax.Array  # f32[G]  LoRA+ ratio (1 otherwise)
    max_grad_norm: jax.Array  # f32[G]  inf: no clipping
    family: jax.Array  # i32[G]  index into the run's optimizer families
    ready: jax.Array  # f32[G]  1: this step completes the slot's optimizer step
    rank_mask: jax.Array  # f32[G, R]  1 for the slot's live rank columns


@flax.struct.dataclass
class TrainState:
    """Everything trained, slot-stacked; weights are `layout.flatten`ed (P parameters a slot)."""

    weights: jax.Array  # f32[G, P]
    opt: dict[str, Any]  # optimizer family → optax state over [G, P]
    grads: jax.Array  # f32[G, P]  accumulated gradient of the current optimizer step
    loss: jax.Array  # f32[G]  accumulated loss of the current optimizer step
    step: jax.Array  # i32[]  device steps so far (seeds dropout)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of the compiled step (hashable; part of the jit key)."""

    cfg: ModelConfig
    layout: LoraLayout
    families: tuple[str, ...] = ("adamw",)
    attention: str = "xla"
    lora_impl: str = "auto"
    remat: bool = False
    packed: bool = False
    loss_chunk: int = 1024


# ------------------------------------------------------------------------------------ forward


def stack_layers(params: llama.Params) -> llama.Params:
    """The base with its layers stacked on a leading axis [L, ...]: the trainer's layout, which
    `hidden_states` runs as one lax.scan over layers (one layer to compile, not L)."""
    return params.replace(layers=jax.tree.map(lambda *xs: jnp.stack(xs), *params.layers))


def hidden_states(
    base: llama.Params,
    flat: jax.Array,
    slots: SlotParams,
    batch: Batch,
    key: jax.Array | None,
    opts: StepOptions,
) -> jax.Array:
    """The batch through the base with every row's adapter → final-normed hidden [B·S, D].

    Stacked base layers (stack_layers) run as a scan over layers, each layer's adapters sliced
    from the flat bank; a list of layers runs llama.forward itself (the reference the scan is
    tested against). With `opts.remat` each layer is recomputed in the backward pass."""
    cfg, layout = opts.cfg, opts.layout
    S = batch.tokens.shape[1]
    G, L = layout.num_slots, cfg.num_layers
    tokens, positions = batch.tokens.reshape(-1), batch.positions.reshape(-1)
    tok_slot = jnp.repeat(batch.row_slot, S)  # i32[T]
    rows = jnp.bincount(jnp.where(batch.row_slot < 0, G, batch.row_slot), length=G + 1)[:G]
    group_sizes = (rows * S).astype(jnp.int32)  # i32[G]: rows are sorted by slot
    attention = _attention(opts, S)
    meta = RowMeta(batch.segments.reshape(-1))

    def adapters(weights: AdapterWeights, offset) -> MultiLora:
        return MultiLora(
            layout,
            weights,
            slots,
            tok_slot,
            group_sizes=group_sizes,
            key=key,
            impl=opts.lora_impl,
            layer_offset=offset,
        )

    if isinstance(base.layers, llama.Layer):  # stacked
        x = jnp.take(base.embed, tokens, axis=0)  # [T, D]
        cos, sin = cos_sin(positions, inv_freq(cfg), x.dtype)
        per_layer = flat.reshape(G, L, -1).swapaxes(0, 1)  # f32[L, G, P/L]

        def body(x, xs):
            layer, w, i = xs
            ad = adapters(layout.unflatten(w, cfg, layers=1), i)
            return llama.block(layer, cfg, x, cos, sin, None, meta, attention, ad, 0)[0], None

        if opts.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (base.layers, per_layer, jnp.arange(L)))
        return rms_norm(x, base.final_norm, cfg.rms_norm_eps)
    ad = adapters(layout.unflatten(flat, cfg), 0)
    if not opts.remat:
        x, _, _ = llama.forward(
            base, cfg, tokens, positions, [None] * L, meta, attention, adapters=ad
        )
        return x
    x = jnp.take(base.embed, tokens, axis=0)  # [T, D]
    cos, sin = cos_sin(positions, inv_freq(cfg), x.dtype)
    for i, layer in enumerate(base.layers):

        def run(x, layer, i=i):
            return llama.block(layer, cfg, x, cos, sin, None, meta, attention, ad, i)[0]

        with jax.named_scope(f"layer{i}"):
            x = jax.checkpoint(run, prevent_cse=False)(x, layer)
    return rms_norm(x, base.final_norm, cfg.rms_norm_eps)


def token_losses(
    base: llama.Params, hidden: jax.Array, targets: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy f32[T] and argmax == target bool[T], the vocabulary projection done `chunk`
    tokens at a time and recomputed in the backward pass (never holds [T, V] logits)."""
    T, D = hidden.shape
    c = min(chunk, T)
    n = -(-T // c)
    pad = n * c - T
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(n, c, D)
    t = jnp.pad(targets, (0, pad)).reshape(n, c)

    @jax.checkpoint
    def one(args):
        h_c, t_c = args
        logits = llama.logits(base, h_c)  # f32[c, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        return lse - picked, jnp.argmax(logits, axis=-1) == t_c

    ce, ok = jax.lax.map(one, (h, t))
    return ce.reshape(-1)[:T], ok.reshape(-1)[:T]


def _attention(opts: StepOptions, S: int) -> RowAttention:
    cfg = opts.cfg
    return RowAttention(
        scale=cfg.head_dim**-0.5,
        row_len=S,
        packed=opts.packed,
        impl=opts.attention,
        sliding_window=cfg.sliding_window,
    )


def per_token(
    base: llama.Params,
    flat: jax.Array,
    slots: SlotParams,
    batch: Batch,
    key: jax.Array | None,
    opts: StepOptions,
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy f32[T] and argmax-correct bool[T] of every token of the batch."""
    hidden = hidden_states(base, flat, slots, batch, key, opts)
    return token_losses(base, hidden, batch.targets.reshape(-1), opts.loss_chunk)


def loss_fn(
    flat: jax.Array,
    base: llama.Params,
    slots: SlotParams,
    batch: Batch,
    key: jax.Array | None,
    opts: StepOptions,
) -> tuple[jax.Array, jax.Array]:
    """flat: f32[G, P] adapter weights → (Σ_t weights·ce: the sum over slots of each slot's share
    of its mean loss, loss per slot f32[G])."""
    ce, _ = per_token(base, flat, slots, batch, key, opts)
    G = opts.layout.num_slots
    w = batch.weights.reshape(-1)
    tok_slot = jnp.repeat(batch.row_slot, batch.tokens.shape[1])
    per_slot = jax.ops.segment_sum(
        ce * w, jnp.where(tok_slot < 0, G, tok_slot), num_segments=G + 1
    )[:G]
    return jnp.sum(per_slot), per_slot


def loss_and_grads(
    flat: jax.Array,
    base: llama.Params,
    slots: SlotParams,
    batch: Batch,
    key: jax.Array | None,
    opts: StepOptions,
):
    """(loss per slot f32[G], gradient w.r.t. the flat adapter weights f32[G, P])."""
    (_, per_slot), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        flat, base, slots, batch, key, opts
    )
    return per_slot, grads


# ----------------------------------------------------------------------------------- optimizer


def _select(mask: jax.Array, new: Any, old: Any) -> Any:
    """Per slot (mask f32[G]), `new` where mask > 0 else `old`, over slot-stacked trees."""
    pick = lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)) > 0, n, o)
    return jax.tree.map(pick, new, old)


def trainable_mask(opts: StepOptions, slots: SlotParams, hyper: SlotHyper) -> jax.Array:
    """f32[G, P]: 1 on the parameters each slot trains (its rank, its targets, DoRA magnitudes),
    0 elsewhere."""
    layout = opts.layout
    r = hyper.rank_mask  # f32[G, R]
    template = layout.template(opts.cfg)
    out = []
    for layer in template:
        row = {}
        for t, w in layer.items():  # dict order is sorted, not layout.targets'
            on = slots.target_mask[:, layout.targets.index(t)]  # f32[G]
            a = jnp.broadcast_to((on[:, None] * r)[:, None, :], w.a.shape)
            b = jnp.broadcast_to((on[:, None] * r)[:, :, None], w.b.shape)
            m = None
            if w.m is not None:
                m = jnp.broadcast_to((on * slots.dora)[:, None], w.m.shape)
            row[t] = LoraWeights(a=a, b=b, m=m)
        out.append(row)
    return layout.flatten(out)


def b_columns(opts: StepOptions) -> np.ndarray:
    """bool[P]: which flat columns hold a B matrix (a constant of the layout)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(opts.layout.template(opts.cfg))
    return np.concatenate(
        [np.full((math.prod(x.shape[1:]),), path[-1].name == "b") for path, x in leaves]
    )


def apply_updates(state: TrainState, slots: SlotParams, hyper: SlotHyper, opts: StepOptions):
    """Clip each slot's gradient by its own norm, run each slot's optimizer with its learning rate,
    and update the slots flagged ready. Returns (weights f32[G, P], opt, grad norm f32[G])."""
    mask = trainable_mask(opts, slots, hyper)  # f32[G, P]
    grads = state.grads * mask
    norm = jnp.sqrt(jnp.sum(jnp.square(grads), axis=1))  # f32[G]
    limit = hyper.max_grad_norm
    clip = jnp.where(norm < limit, 1.0, limit / jnp.maximum(norm, 1e-30))  # optax's rule
    grads = grads * clip[:, None]
    updates = jnp.zeros_like(state.weights)
    new_opt = {}
    for f_index, name in enumerate(opts.families):
        tx = family_tx(name)

        def one(g, s, p, lr, tx=tx):
            s = s._replace(hyperparams={**s.hyperparams, "learning_rate": lr})
            return tx.update(g, s, p)

        u, s = jax.vmap(one)(grads, state.opt[name], state.weights, hyper.lr)
        take = hyper.ready * (hyper.family == f_index)  # f32[G]
        updates = jnp.where(take[:, None] > 0, u, updates)
        new_opt[name] = _select(take, s, state.opt[name])
    # LoRA+: B's update scaled by the ratio (= B's learning rate ratio·lr for these optimizers).
    ratio = jnp.where(b_columns(opts)[None, :], hyper.b_lr_ratio[:, None], 1.0)  # f32[G, P]
    weights = jnp.where(
        hyper.ready[:, None] > 0, state.weights + updates * ratio * mask, state.weights
    )
    return weights, new_opt, norm


def train_step(
    base: llama.Params,
    state: TrainState,
    batch: Batch,
    slots: SlotParams,
    hyper: SlotHyper,
    key: jax.Array,
    opts: StepOptions,
):
    """One device step: accumulate this batch's gradients, update the ready slots.

    Returns (new state, metrics {"loss": f32[G] of the completed optimizer steps (where ready),
    "grad_norm": f32[G]})."""
    dropout_key = jax.random.fold_in(key, state.step) if opts.layout.dropout else None
    per_slot, grads = loss_and_grads(state.weights, base, slots, batch, dropout_key, opts)
    acc = state.grads + grads
    loss = state.loss + per_slot
    state = state.replace(grads=acc, loss=loss)
    weights, opt, norm = apply_updates(state, slots, hyper, opts)
    keep = 1.0 - hyper.ready
    new = TrainState(
        weights=weights, opt=opt, grads=acc * keep[:, None], loss=loss * keep, step=state.step + 1
    )
    return new, {"loss": loss, "grad_norm": norm}


def eval_step(
    base: llama.Params, flat: jax.Array, batch: Batch, slots: SlotParams, opts: StepOptions
):
    """Per row: (Σ ce over target tokens f32[B], target tokens f32[B], every target token argmax-
    correct bool[B]). All-correct under teacher forcing is exactly greedy generation reproducing
    the answer (each greedy step then sees the true prefix)."""
    ce, ok = per_token(base, flat, slots, batch, None, opts)
    B, S = batch.tokens.shape
    m = (batch.weights > 0).reshape(B, S)
    ce, ok = ce.reshape(B, S), ok.reshape(B, S)
    return (
        jnp.sum(jnp.where(m, ce, 0.0), axis=1),
        jnp.sum(m, axis=1).astype(jnp.float32),
        jnp.all(ok | ~m, axis=1),
    )


def init_state(opts: StepOptions) -> TrainState:
    """Every slot empty: zero weights, fresh optimizer states."""
    G, P = opts.layout.num_slots, opts.layout.num_params_per_slot(opts.cfg)
    zeros = jnp.zeros((G, P), jnp.float32)
    opt = {f: jax.vmap(family_tx(f).init)(zeros) for f in opts.families}
    return TrainState(
        weights=zeros,
        opt=opt,
        grads=zeros,
        loss=jnp.zeros((G,), jnp.float32),
        step=jnp.zeros((), jnp.int32),
    )
