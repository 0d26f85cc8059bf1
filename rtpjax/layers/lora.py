"""Many LoRA / DoRA adapters applied at once: the `llama.Adapters` implementation.

Every adapted projection holds stacked weights for G slots, R = the largest rank:
    a [G, I, R] (shrink), b [G, R, O] (expand), m [G, O] (DoRA magnitude; None if no slot is DoRA)
in our [in, out] orientation (PEFT's lora_A.weight is a[g].T, lora_B.weight is b[g].T). Each token
carries the slot of its adapter (-1: none); the product goes through the batched operator of
kernels/lora.py, so one base matmul serves every adapter's rows.

LoRA:  y' = y + s_g · dropout(x) A_g B_g                                    (s_g = alpha / r or
DoRA:  y' = y + (f - 1) · dropout(x) Wᵀ + f · s_g · dropout(x) A_g B_g        alpha / sqrt(r))
       f = m_g / stop_gradient(‖W + s_g (A_g B_g)ᵀ‖ per output row)
which is PEFT's DoRA (the weight norm is detached); without dropout it is f · (y + s_g x A_g B_g),
and the extra x Wᵀ product is skipped. The norm never materialises W + s·BA per slot: for output
row o, ‖W_o + s (AB)_o‖² = ‖W_o‖² + 2s·B_o·(W_o A) + s²·B_oᵀ (AᵀA) B_o, with B_o the column o of B.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from rtpjax.config import ModelConfig
from rtpjax.kernels.lora import lora_delta, lora_delta_by_slot

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_HIGHEST = jax.lax.Precision.HIGHEST


def target_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(I, O): input and output features of a projection, HF's flat layout."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    NH, KH = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "q_proj": (D, NH),
        "k_proj": (D, KH),
        "v_proj": (D, KH),
        "o_proj": (NH, D),
        "gate_proj": (D, F),
        "up_proj": (D, F),
        "down_proj": (F, D),
    }
    if target not in shapes:
        raise ValueError(
            f"target module {target!r} is not supported; allowed: {', '.join(TARGETS)}"
        )
    return shapes[target]


@flax.struct.dataclass
class LoraWeights:
    """One projection's adapters, stacked over slots."""

    a: jax.Array  # f32[G, I, R]
    b: jax.Array  # f32[G, R, O]
    m: jax.Array | None  # f32[G, O]  DoRA magnitude; None when no slot may be DoRA


# weights[layer][target] -> LoraWeights
AdapterWeights = list[dict[str, LoraWeights]]


@dataclasses.dataclass(frozen=True)
class LoraLayout:
    """The static shape of a bank of adapters: what a compiled step is specialised on."""

    num_slots: int  # G
    rank: int  # R, the largest rank of any slot
    targets: tuple[str, ...]  # projections adapted in every layer (union over the slots)
    num_layers: int  # L
    dora: bool = False  # whether any slot may be DoRA (adds magnitudes and the norm computation)
    dropout: bool = False  # whether any slot has dropout > 0

    def __post_init__(self):
        if self.num_slots < 1:
            raise ValueError(f"num_slots={self.num_slots} must be >= 1")
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(
                f"targets={list(self.targets)} must be a non-empty subset of {TARGETS}"
            )

    def zeros(self, cfg: ModelConfig, dtype=jnp.float32) -> AdapterWeights:
        """All-zero weights (every slot empty)."""
        G, R = self.num_slots, self.rank
        out = []
        for _ in range(self.num_layers):
            layer = {}
            for t in self.targets:
                I, O = target_shape(cfg, t)
                m = jnp.zeros((G, O), dtype) if self.dora else None
                layer[t] = LoraWeights(jnp.zeros((G, I, R), dtype), jnp.zeros((G, R, O), dtype), m)
            out.append(layer)
        return out

    def template(self, cfg: ModelConfig) -> AdapterWeights:
        """The weights' shapes (jax.ShapeDtypeStruct leaves, float32, slot axis first)."""
        return jax.eval_shape(lambda: self.zeros(cfg))

    def flatten(self, weights: AdapterWeights) -> jax.Array:
        """Slot-stacked weights as one f32[G, P] matrix, leaves in tree order (the trainer's
        storage: the optimizer runs on a few large arrays instead of one per projection)."""
        return jnp.concatenate(
            [x.reshape(x.shape[0], -1) for x in jax.tree.leaves(weights)], axis=1
        )

    def unflatten(
        self, flat: jax.Array, cfg: ModelConfig, layers: int | None = None
    ) -> AdapterWeights:
        """Inverse of `flatten`; works on one slot's [P] vector too (no slot axis). `layers`
        unflattens a prefix of that many layers (P = that many layers' parameters): every layer
        has the same layout, so [G, P] reshapes to [G, L, P / L] and each row is one layer."""
        template = self.template(cfg)
        if layers is not None:
            template = template[:layers]
        leaves, treedef = jax.tree.flatten(template)
        out, i = [], 0
        lead = flat.shape[:-1]
        for x in leaves:
            n = math.prod(x.shape[1:])
            out.append(flat[..., i : i + n].reshape(lead + x.shape[1:]))
            i += n
        return jax.tree.unflatten(treedef, out)

    def num_params_per_slot(self, cfg: ModelConfig) -> int:
        """Trainable parameters of one slot at rank R (magnitudes included when DoRA)."""
        n = 0
        for t in self.targets:
            I, O = target_shape(cfg, t)
            n += (I + O) * self.rank + (O if self.dora else 0)
        return n * self.num_layers


def dora_norm(w_oi: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """‖W + s_g (A_g B_g)ᵀ‖ over the input axis, per slot and output row, without forming the sum.

    w_oi: [O, I] base weight (HF layout); a: [G, I, R]; b: [G, R, O]; scale: f32[G] → f32[G, O]."""
    w = w_oi.astype(jnp.float32)
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    s = scale.astype(jnp.float32)[:, None]  # f32[G, 1]
    w2 = jnp.sum(w * w, axis=1)  # f32[O]
    wa = jnp.einsum("OI,GIR->GOR", w, a, precision=_HIGHEST)  # f32[G, O, R]
    ata = jnp.einsum("GIR,GIS->GRS", a, a, precision=_HIGHEST)  # f32[G, R, R]
    cross = jnp.einsum("GRO,GOR->GO", b, wa, precision=_HIGHEST)  # f32[G, O]
    quad = jnp.einsum("GRO,GRS,GSO->GO", b, ata, b, precision=_HIGHEST)  # f32[G, O]
    n2 = w2[None, :] + 2.0 * s * cross + s * s * quad
    return jnp.sqrt(jnp.maximum(n2, 0.0))


def dora_magnitude_init(w_oi: jax.Array, num_slots: int) -> jax.Array:
    """PEFT's initial magnitude with B = 0: the base weight's row norms. f32[G, O]."""
    w = w_oi.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(w * w, axis=1))  # f32[O]
    return jnp.broadcast_to(norm, (num_slots, norm.shape[0]))


@flax.struct.dataclass
class SlotParams:
    """Per-slot data (not trained) read by `MultiLora`: arrays, so changing them never
    recompiles."""

    scale: jax.Array  # f32[G]  alpha / r (or alpha / sqrt(r) with rsLoRA); 0 for an empty slot
    rank: jax.Array  # i32[G]  live rank of each slot (<= R)
    dora: jax.Array | None = None  # f32[G]  1 where the slot is DoRA
    target_mask: jax.Array | None = None  # f32[G, len(layout.targets)]  1 where the slot adapts
    # that projection (None: all); DoRA rescales only the projections its adapter targets
    dropout: jax.Array | None = None  # f32[G]  dropout probability on the adapter input


class MultiLora:
    """`llama.Adapters` over a bank of G slots.

    Token t uses slot `slot[t]` (-1: no adapter). When the tokens are sorted by slot,
    `group_sizes` (i32[G], tokens per slot, the rest after them unadapted) lets the operator skip
    its sort; `slot` is still needed for DoRA's per-token factor. `key` drives dropout (training
    only; None disables it)."""

    def __init__(
        self,
        layout: LoraLayout,
        weights: AdapterWeights,
        slots: SlotParams,
        slot: jax.Array,
        *,
        group_sizes: jax.Array | None = None,
        key: jax.Array | None = None,
        impl: str = "auto",
        layer_offset: int | jax.Array = 0,
    ):
        self.layout = layout
        # `weights` may hold a window of the layers (one, inside a scan over layers): layer i of
        # the model is weights[i - layer_offset]; the offset only matters for dropout's stream.
        self.layer_offset = layer_offset
        self.weights = weights
        self.slots = slots
        self.slot = slot  # i32[T]
        self.group_sizes = group_sizes  # i32[G] or None
        self.key = key
        self.impl = impl
        self._targets = frozenset(layout.targets)

    def targets(self, layer: int) -> frozenset[str]:
        return self._targets

    def _delta(self, x: jax.Array, w: LoraWeights) -> jax.Array:
        a, b = w.a.astype(x.dtype), w.b.astype(x.dtype)
        if self.group_sizes is not None:
            return lora_delta(
                x, a, b, self.group_sizes, self.slots.scale, rank=self.slots.rank, impl=self.impl
            )
        return lora_delta_by_slot(
            x, a, b, self.slot, self.slots.scale, rank=self.slots.rank, impl=self.impl
        )

    def _dropout(self, layer: int, target: str, x: jax.Array) -> jax.Array:
        if self.key is None or not self.layout.dropout or self.slots.dropout is None:
            return x
        key = jax.random.fold_in(self.key, self.layer_offset + layer)
        key = jax.random.fold_in(key, TARGETS.index(target))
        G = self.layout.num_slots
        p = jnp.where(self.slot >= 0, self.slots.dropout[jnp.clip(self.slot, 0, G - 1)], 0.0)
        keep = jax.random.uniform(key, x.shape) >= p[:, None]  # bool[T, I]
        return jnp.where(keep, x / (1.0 - p)[:, None].astype(x.dtype), 0).astype(x.dtype)

    def apply(
        self, layer: int, target: str, x: jax.Array, y: jax.Array, weight: Callable[[], jax.Array]
    ) -> jax.Array:
        w = self.weights[layer][target]
        x_in = self._dropout(layer, target, x)  # [T, I]
        delta = self._delta(x_in, w)  # [T, O]
        if not self.layout.dora:
            return y + delta
        G = self.layout.num_slots
        w_oi = weight()  # [O, I]
        r = jnp.arange(w.a.shape[2])
        live = (r[None, :] < self.slots.rank[:, None]).astype(jnp.float32)  # f32[G, R]
        norm = dora_norm(w_oi, w.a * live[:, None, :], w.b * live[:, :, None], self.slots.scale)
        factor = w.m / jax.lax.stop_gradient(norm)  # f32[G, O]
        is_dora = self.slots.dora > 0  # bool[G]
        if self.slots.target_mask is not None:
            is_dora &= self.slots.target_mask[:, self.layout.targets.index(target)] > 0
        is_dora = is_dora[:, None]  # bool[G, 1]
        factor = jnp.where(is_dora, factor, 1.0)
        idx = jnp.clip(self.slot, 0, G - 1)
        f = jnp.where((self.slot >= 0)[:, None], factor[idx], 1.0).astype(y.dtype)  # [T, O]
        if x_in is x:
            return f * (y + delta)
        base = jnp.einsum("TI,OI->TO", x_in, w_oi)  # [T, O]: PEFT's dora term sees dropout(x)
        return y + (f - 1) * base + f * delta
