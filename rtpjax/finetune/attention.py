"""Training attention: full causal attention over a batch of B rows of S tokens, flattened to [B·S].

The model hands every attention the flattened token axis ([T, K, G, H], T = B·S) and a per-layer
cache; training keeps no cache. Rows are independent; inside a row, token i sees token j when j <= i
and both belong to the same segment (packing puts several examples in one row; segment 0 is
padding, which sees only itself and is masked out of the loss). Padded rows without packing need
only the causal mask: padding sits after the real tokens, so no real token sees it.

Implementations (`impl`): "xla" (einsum with an explicit mask, every backend, needed for packing)
and "cudnn" (jax.nn.dot_product_attention's flash kernel, causal only, GPU, bf16/fp16).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "cudnn")


class RowMeta(NamedTuple):
    segments: jax.Array  # i32[B·S]  segment id per token within its row (0 = padding)


@dataclasses.dataclass(frozen=True)
class RowAttention:
    """`Attention` for B independent rows of `row_len` tokens each (see module docstring)."""

    scale: float
    row_len: int  # S
    packed: bool = False  # rows may hold several segments: mask across segments too
    impl: str = "xla"
    soft_cap: float | None = None
    sliding_window: int | None = None

    def __post_init__(self):
        if self.impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl={self.impl!r} must be one of {ATTENTION_IMPLS}")
        if self.impl == "cudnn" and (self.packed or self.soft_cap or self.sliding_window):
            raise ValueError(
                "attention impl='cudnn' supports causal rows only (no packing, "
                "soft cap or sliding window); use impl='xla'"
            )

    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, cache: Any, meta: RowMeta
    ) -> tuple[jax.Array, Any]:
        T, K, G, H = q.shape
        S = self.row_len
        B = T // S
        if B * S != T:
            raise ValueError(f"tokens T={T} must be a multiple of row_len={S}")
        q_b = q.reshape(B, S, K, G, H)
        k_b, v_b = k.reshape(B, S, K, H), v.reshape(B, S, K, H)
        if self.impl == "cudnn":
            out = jax.nn.dot_product_attention(
                q_b.reshape(B, S, K * G, H),
                k_b,
                v_b,
                scale=self.scale,
                is_causal=True,
                implementation="cudnn",
            )  # [B, S, N, H]
            return out.reshape(T, K, G, H), cache
        scores = (
            jnp.einsum("BTKGH,BSKH->BKGTS", q_b, k_b, preferred_element_type=jnp.float32)
            * self.scale
        )
        if self.soft_cap is not None:
            scores = self.soft_cap * jnp.tanh(scores / self.soft_cap)
        i = jnp.arange(S)
        visible = i[None, :] <= i[:, None]  # bool[T, S] within a row
        if self.sliding_window is not None:
            visible &= i[:, None] - i[None, :] < self.sliding_window
        visible = jnp.broadcast_to(visible, (B, S, S))
        if self.packed:
            seg = meta.segments.reshape(B, S)
            visible = visible & (seg[:, :, None] == seg[:, None, :])
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_b)
        return out.reshape(T, K, G, H).astype(q.dtype), cache
