"""The dense (unpaged) reference generator: one sequence, a contiguous cache, no batching tricks.

It is the oracle the paged engine is held to: the engine's greedy and seeded outputs must equal this
generator's token for token. It shares the model and the sampler with the engine and nothing else.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.config import ModelConfig
from rtpjax.layers.attention import DenseAttention, DenseCache, DenseMeta
from rtpjax.models import llama


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "collect_hidden"))
def _step(params, tokens, positions, caches, last, *, cfg, attention, collect_hidden=False):
    meta = DenseMeta(positions=positions, start=positions[0])
    x, caches, hidden = llama.forward(
        params, cfg, tokens, positions, caches, meta, attention, collect_hidden=collect_hidden
    )
    out = llama.logits(params, x[last][None])[0]  # f32[V]
    return out, caches, hidden


class DenseGenerator:
    """generate(prompt_ids, ...) → output ids, one sequence at a time."""

    def __init__(self, cfg: ModelConfig, params: llama.Params):
        self.cfg = cfg
        self.params = params
        self.dtype = params.embed.dtype
        self.attention = DenseAttention(scale=cfg.head_dim**-0.5, sliding_window=cfg.sliding_window)

    def _empty_cache(self, size: int) -> list[DenseCache]:
        K, H = self.cfg.num_kv_heads, self.cfg.head_dim
        z = jnp.zeros((size, K, H), self.dtype)
        return [DenseCache(z, z) for _ in range(self.cfg.num_layers)]

    def prefill(self, prompt_ids: Sequence[int], cache_size: int, collect_hidden: bool = False):
        """Logits after the prompt (f32[V]), the caches, and per-layer hidden states if asked."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("prompt_ids is empty")
        t = _bucket(n)
        tokens = np.zeros(t, np.int32)
        tokens[:n] = prompt_ids
        positions = np.arange(t, dtype=np.int32)
        caches = self._empty_cache(max(cache_size, t))
        return _step(
            self.params,
            tokens,
            positions,
            caches,
            n - 1,
            cfg=self.cfg,
            attention=self.attention,
            collect_hidden=collect_hidden,
        )

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        sample_fn=None,
        stop_token_ids: Sequence[int] = (),
    ) -> list[int]:
        """Greedy by default; `sample_fn(logits f32[V], step) -> int` for anything else."""
        n = len(prompt_ids)
        cache_size = _bucket(n + max_new_tokens)
        logits, caches, _ = self.prefill(prompt_ids, cache_size)
        out: list[int] = []
        stop = set(stop_token_ids)
        for step in range(max_new_tokens):
            token = int(jnp.argmax(logits)) if sample_fn is None else int(sample_fn(logits, step))
            out.append(token)
            if token in stop or step == max_new_tokens - 1:
                break
            pos = np.array([n + step], np.int32)
            logits, caches, _ = _step(
                self.params,
                np.array([token], np.int32),
                pos,
                caches,
                0,
                cfg=self.cfg,
                attention=self.attention,
            )
        return out
