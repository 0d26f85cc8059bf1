"""The engine's attention: write this step's keys/values into the paged cache, then ragged paged
attention over every sequence of the step (kernels/ragged_paged_attention.py picks the GPU kernel,
jax's TPU kernel or the XLA path by platform), or, for the prefill steps the engine marks, cuDNN
flash attention (kernels/packed_prefill.py, kernels/prefix_prefill.py)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
from jax.sharding import PartitionSpec as P

from rtpjax.kernels.packed_prefill import packed_causal_attention
from rtpjax.kernels.prefix_prefill import prefix_prefill_attention
from rtpjax.kernels.ragged_paged_attention import ragged_paged_attention, write_kv


class PagedMeta(NamedTuple):
    """One ragged step (see docs/glossary.md); B counts padded sequence rows."""

    slot_mapping: jax.Array  # i32[T]  page_id * page_size + offset of each token; padding → page 0
    kv_lens: jax.Array  # i32[B]  KV length after this step
    page_indices: jax.Array  # i32[B, pages_per_seq]
    cu_q_lens: jax.Array  # i32[B+1]
    num_seqs: jax.Array  # i32[1]


@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """Static (hashable) settings; `max_q_len` is the step bucket's bound on any sequence's query
    tokens (1 for decode-only steps), used by the kernels to pick block shapes. `fresh_prefill`:
    every sequence of the step starts at position 0, so attention reads only the step's own
    keys and values (cuDNN flash attention over the packed tokens, kernels/packed_prefill.py);
    the keys and values are still written to the pages for later steps. `max_prefix_tokens` > 0:
    a prefill step over cached prefixes whose sum is at most this (static) bound; attention is
    kernels/prefix_prefill.py's two cuDNN calls (chunk × gathered prefix, chunk × chunk) merged by
    their LSE (impl "auto": the XLA path off GPUs). At most one of the two is set."""

    scale: float
    sliding_window: int | None = None
    soft_cap: float | None = None
    impl: str = "auto"
    max_q_len: int | None = None
    fresh_prefill: bool = False
    max_prefix_tokens: int = 0

    def __call__(self, q, k, v, kv_pages, meta: PagedMeta):
        mesh = jax.sharding.get_abstract_mesh()
        tp = 1 if mesh.empty else mesh.shape.get("tensor", 1)
        if tp == 1:
            return self._local(q, k, v, kv_pages, meta)
        # Tensor parallelism: every shard owns K/tp KV heads (and their G query heads each) and the
        # matching slice of every page; attention needs no communication. shard_map makes that
        # explicit, so custom kernels (Pallas GPU, TPU) run per shard instead of being gathered.
        heads = P(None, "tensor", None)
        specs = (
            P(None, "tensor", None, None),
            heads,
            heads,
            P(None, None, "tensor", None),
            PagedMeta(*(P() for _ in PagedMeta._fields)),
        )
        # check_vma=False: the body is per-shard by construction (no collectives), and the XLA
        # path's scan carries would otherwise need explicit pcasts.
        return jax.shard_map(
            self._local,
            mesh=mesh,
            in_specs=specs,
            out_specs=(P(None, "tensor", None, None), specs[3]),
            check_vma=False,
        )(q, k, v, kv_pages, meta)

    def _local(self, q, k, v, kv_pages, meta: PagedMeta):
        T, K, G, H = q.shape
        kv_pages = write_kv(kv_pages, k, v, meta.slot_mapping)
        if (self.fresh_prefill or self.max_prefix_tokens) and (
            self.sliding_window is not None or self.soft_cap is not None
        ):
            raise ValueError(
                f"fresh_prefill={self.fresh_prefill}, max_prefix_tokens={self.max_prefix_tokens}: "
                "the cuDNN prefill paths support neither sliding_window nor soft_cap"
            )
        if self.fresh_prefill and self.max_prefix_tokens:
            raise ValueError(
                f"max_prefix_tokens={self.max_prefix_tokens} with fresh_prefill: a fresh step "
                "has no cached prefix (want 0)"
            )
        if self.max_prefix_tokens:
            # The pages after this step's write: the prefix is positions < kv_len - q_len, which
            # the write does not touch, and reading the written pool keeps the update in place.
            out = prefix_prefill_attention(
                q.reshape(T, K * G, H),
                k,
                v,
                kv_pages,
                meta.page_indices,
                meta.cu_q_lens,
                meta.kv_lens,
                meta.num_seqs,
                sm_scale=self.scale,
                max_prefix_tokens=self.max_prefix_tokens,
            )
            return out.reshape(T, K, G, H), kv_pages
        if self.fresh_prefill:
            out = packed_causal_attention(
                q.reshape(T, K * G, H), k, v, meta.cu_q_lens, meta.num_seqs, sm_scale=self.scale
            )
            return out.reshape(T, K, G, H), kv_pages
        out = ragged_paged_attention(
            q.reshape(T, K * G, H),
            kv_pages,
            meta.kv_lens,
            meta.page_indices,
            meta.cu_q_lens,
            meta.num_seqs,
            sm_scale=self.scale,
            sliding_window=self.sliding_window,
            soft_cap=self.soft_cap,
            impl=self.impl,
            max_q_len=self.max_q_len,
        )
        return out.reshape(T, K, G, H), kv_pages
