"""The Llama family (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2) as pure functions.

Weights keep HF's [out, in] orientation and are fused by reshape + concatenate only, so loading
never transposes and the fused projections shard on heads:
- w_qkv [K, G+2, H, D]: per KV head, its G query heads, then its key head, then its value head;
  query head n = k·G + g, exactly HF's order. One matmul computes q, k and v.
- w_gate_up [2, F, D]: gate then up. One matmul computes both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp

from rtpjax.config import ModelConfig
from rtpjax.kernels import skinny_matmul as skinny
from rtpjax.layers.attention import Attention
from rtpjax.layers.norm import rms_norm
from rtpjax.layers.rope import apply_rope, cos_sin, inv_freq
from rtpjax.models.params import ArrayInfo, normal_init, ones_init, zeros_init
from rtpjax.sharding.rules import constrain


@flax.struct.dataclass
class Layer:
    attn_norm: Any  # [D]
    w_qkv: Any  # [K, G+2, H, D]
    b_qkv: Any  # [K, G+2, H] or None
    q_norm: Any  # [H] or None (Qwen3)
    k_norm: Any  # [H] or None (Qwen3)
    w_o: Any  # [D, K, G, H]
    b_o: Any  # [D] or None
    mlp_norm: Any  # [D]
    w_gate_up: Any  # [2, F, D]
    w_down: Any  # [D, F]


@flax.struct.dataclass
class Params:
    embed: Any  # [V, D]
    layers: Any  # list[Layer], one per layer (not stacked: each layer's weights stay contiguous)
    final_norm: Any  # [D]
    lm_head: Any  # [V, D] or None when tied to `embed`


def spec(cfg: ModelConfig, dtype: Any = jnp.bfloat16) -> Params:
    """Every weight of the model, declared once."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    K, G, H = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim

    def w(shape, axes, init=None):
        return ArrayInfo(tuple(shape), dtype, tuple(axes), init or normal_init())

    def layer() -> Layer:
        return Layer(
            attn_norm=w((D,), ("norm",), ones_init),
            w_qkv=w((K, G + 2, H, D), ("kv_heads", "qkv", "head_dim", "embed")),
            b_qkv=w((K, G + 2, H), ("kv_heads", "qkv", "head_dim"), zeros_init)
            if cfg.qkv_bias
            else None,
            q_norm=w((H,), ("norm",), ones_init) if cfg.qk_norm else None,
            k_norm=w((H,), ("norm",), ones_init) if cfg.qk_norm else None,
            w_o=w((D, K, G, H), ("embed", "kv_heads", "qkv", "head_dim")),
            b_o=w((D,), ("norm",), zeros_init) if cfg.o_bias else None,
            mlp_norm=w((D,), ("norm",), ones_init),
            w_gate_up=w((2, F, D), ("gate_up", "mlp", "embed")),
            w_down=w((D, F), ("embed", "mlp")),
        )

    return Params(
        embed=w((V, D), ("vocab", "embed")),
        layers=[layer() for _ in range(cfg.num_layers)],
        final_norm=w((D,), ("norm",), ones_init),
        lm_head=None if cfg.tie_word_embeddings else w((V, D), ("vocab", "embed")),
    )


class Adapters(Protocol):
    """What the model needs from adapters (LoRA, DoRA…; see layers/lora.py). `apply` returns the
    projection output with the adapter's contribution, given the projection input `x` [T, in], the
    base output without bias `y` [T, out] (HF's flat order) and `weight()`, the base weight
    [out, in] in HF's layout, built only if the adapter kind needs it (DoRA's norms).
    Targets: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj."""

    def apply(
        self, layer: int, target: str, x: jax.Array, y: jax.Array, weight: Callable[[], jax.Array]
    ) -> jax.Array: ...

    def targets(self, layer: int) -> frozenset[str]: ...


def _qkv_weight(layer: Layer, part: slice | int) -> Callable[[], jax.Array]:
    def weight():
        w = layer.w_qkv[:, part]  # [K, G, H, D] or [K, H, D]
        return w.reshape(-1, w.shape[-1])

    return weight


def _adapt_qkv(adapters: Adapters, i: int, h: jax.Array, layer: Layer, q, k, v):
    """Adapter contributions to the fused projection's q, k and v (HF order: head n = k·G + g)."""
    live = adapters.targets(i)
    T, K, G, H = q.shape
    if "q_proj" in live:
        q = adapters.apply(
            i, "q_proj", h, q.reshape(T, K * G * H), _qkv_weight(layer, slice(0, G))
        ).reshape(T, K, G, H)
    if "k_proj" in live:
        k = adapters.apply(i, "k_proj", h, k.reshape(T, K * H), _qkv_weight(layer, G)).reshape(
            T, K, H
        )
    if "v_proj" in live:
        v = adapters.apply(i, "v_proj", h, v.reshape(T, K * H), _qkv_weight(layer, G + 1)).reshape(
            T, K, H
        )
    return q, k, v


def block(
    layer: Layer,
    cfg: ModelConfig,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    cache: Any,
    meta: Any,
    attention: Attention,
    adapters: Adapters | None = None,
    index: int = 0,
    *,
    matmul: str = "auto",
) -> tuple[jax.Array, Any]:
    """Decoder layer number `index`. x: [T, D]; cos, sin: [T, H]. Returns (x [T, D], cache).
    `matmul`: see `use_skinny`."""
    G = cfg.q_per_kv
    T, D = x.shape
    stream = use_skinny(x, matmul)
    h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
    if stream:
        qkv = _stream(h, layer.w_qkv.reshape(-1, D)).reshape(T, *layer.w_qkv.shape[:3])
    else:
        qkv = jnp.einsum("TD,KCHD->TKCH", h, layer.w_qkv)  # [T, K, G+2, H]
    q, k, v = qkv[:, :, :G], qkv[:, :, G], qkv[:, :, G + 1]  # [T,K,G,H], [T,K,H], [T,K,H]
    if adapters is not None:
        q, k, v = _adapt_qkv(adapters, index, h, layer, q, k, v)
    if layer.b_qkv is not None:
        q = q + layer.b_qkv[:, :G]
        k = k + layer.b_qkv[:, G]
        v = v + layer.b_qkv[:, G + 1]
    q = constrain(q, ("tokens", "kv_heads", "qkv", "head_dim"))
    if layer.q_norm is not None:
        q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
        k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o, cache = attention(q, k, v, cache, meta)  # [T, K, G, H]
    if stream:
        attn_out = _stream(o.reshape(T, -1), layer.w_o.reshape(D, -1))
    else:
        # One contracting dim. Contracting (K, G, H) directly made XLA transpose w_o and o into
        # another layout on every step (two extra kernels per layer and w_o read and written once
        # more: measured in the compiled GPU decode step, docs/benchmarks.md).
        attn_out = jnp.einsum("TE,DE->TD", o.reshape(T, -1), layer.w_o.reshape(D, -1))
    if adapters is not None and "o_proj" in adapters.targets(index):
        w_o = layer.w_o
        attn_out = adapters.apply(
            index,
            "o_proj",
            o.reshape(o.shape[0], -1),
            attn_out,
            lambda: w_o.reshape(w_o.shape[0], -1),
        )
    if layer.b_o is not None:
        attn_out = attn_out + layer.b_o
    x = x + attn_out
    h = rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
    if stream:
        w_gu = layer.w_gate_up
        gate_up = _stream(h, w_gu.reshape(-1, D)).reshape(T, *w_gu.shape[:2])
    else:
        gate_up = jnp.einsum("TD,CFD->TCF", h, layer.w_gate_up)  # [T, 2, F]
    gate_up = constrain(gate_up, ("tokens", "gate_up", "mlp"))
    gate, up = gate_up[:, 0], gate_up[:, 1]  # [T, F]
    if adapters is not None:
        live = adapters.targets(index)
        w_gu = layer.w_gate_up
        if "gate_proj" in live:
            gate = adapters.apply(index, "gate_proj", h, gate, lambda: w_gu[0])
        if "up_proj" in live:
            up = adapters.apply(index, "up_proj", h, up, lambda: w_gu[1])
    act = jax.nn.silu(gate) * up  # [T, F]
    if stream:
        down = _stream(act, layer.w_down)
    else:
        down = jnp.einsum("TF,DF->TD", act, layer.w_down)
    if adapters is not None and "down_proj" in adapters.targets(index):
        w_down = layer.w_down
        down = adapters.apply(index, "down_proj", act, down, lambda: w_down)
    x = x + down
    return constrain(x, ("tokens", "embed")), cache


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    caches: list[Any],
    meta: Any,
    attention: Attention,
    *,
    adapters: Adapters | None = None,
    collect_hidden: bool = False,
    matmul: str = "auto",
) -> tuple[jax.Array, list[Any], list[jax.Array]]:
    """tokens, positions: i32[T] → (final-normed hidden [T, D], updated caches, per-layer hidden).

    `collect_hidden` returns the residual stream after the embedding and after every layer (as HF's
    output_hidden_states does, except that HF's last entry is after the final norm)."""
    x = jnp.take(params.embed, tokens, axis=0)  # [T, D]
    x = constrain(x, ("tokens", "embed"))
    cos, sin = cos_sin(positions, inv_freq(cfg), x.dtype)
    hidden = [x] if collect_hidden else []
    new_caches = []
    for i, layer in enumerate(params.layers):
        with jax.named_scope(f"layer{i}"):
            x, cache = block(
                layer, cfg, x, cos, sin, caches[i], meta, attention, adapters, i, matmul=matmul
            )
        new_caches.append(cache)
        if collect_hidden:
            hidden.append(x)
    x = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    return x, new_caches, hidden


def logits(params: Params, x: jax.Array, *, matmul: str = "auto") -> jax.Array:
    """x: [T, D] (final-normed) → f32[T, V]."""
    head = params.embed if params.lm_head is None else params.lm_head
    if use_skinny(x, matmul):
        out = _stream(x, head, jnp.float32)
    else:
        out = jnp.einsum("TD,VD->TV", x, head, preferred_element_type=jnp.float32)
    return constrain(out, ("tokens", "vocab"))


# Decode steps of at most this many tokens stream the weights through kernels/skinny_matmul on
# GPUs (measured faster than XLA's GEMMs up to M = 8; docs/kernels/skinny_matmul.md).
SKINNY_MAX_TOKENS = 8


def use_skinny(x: jax.Array, matmul: str) -> bool:
    """Whether this step's projections take the weight-streaming kernel. `matmul`: "auto" (GPU,
    at most SKINNY_MAX_TOKENS tokens, no tensor parallelism, a supported dtype), "xla" (never),
    "skinny" (always: off a GPU the kernel runs in Pallas interpret mode; for tests)."""
    if matmul not in ("auto", "xla", "skinny"):
        raise ValueError(f"matmul={matmul!r} must be one of auto, xla, skinny")
    if matmul != "auto":
        return matmul == "skinny"
    mesh = jax.sharding.get_abstract_mesh()
    tp = 1 if mesh.empty else mesh.shape.get("tensor", 1)
    return x.shape[0] <= SKINNY_MAX_TOKENS and tp == 1 and jax.default_backend() == "gpu"


def _stream(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x[M, K] · w[N, K]ᵀ through the weight-streaming kernel (XLA for shapes it does not cover)."""
    (M, K), N = x.shape, w.shape[0]
    ok = x.dtype == w.dtype and skinny.supports(M, N, K, x.dtype)
    return skinny.skinny_matmul(x, w, out_dtype=out_dtype, impl="gpu" if ok else "xla")
