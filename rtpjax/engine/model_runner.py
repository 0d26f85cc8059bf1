"""ModelRunner: turns a SchedulerOutput into one jitted device step and hands back sampled tokens.

The only place the serving side jits. One step is one flattened ragged batch: every scheduled
chunk's tokens in a single [T] vector, sequences described by cu_q_lens / kv_lens / page tables,
padded to a small set of (T, B) buckets so compiles stay bounded (`num_compiled_variants`). The KV
pages are donated; sampling runs on device; only sampled ids (and requested logprobs) come back.

Overlap: a decode chunk whose input token is still on the device (ScheduledChunk.from_device) reads
it from the previous step's sampled ids, which never leave the device for that purpose, so the host
can prepare and launch step N+1 before step N's tokens are back.

Multi-step decode (StepStatic.num_steps = K > 1): a decode-only step runs the model K times in one
launch (a fori_loop on the device), each iteration's sampled ids becoming the next one's input, so
the host's per-launch work (schedule, prepare, launch, post) is paid once per K tokens. Row b
samples `row_steps[b]` <= K tokens; its later iterations write their KV into the null page.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rtpjax import env
from rtpjax.config import ModelConfig
from rtpjax.engine import packing
from rtpjax.engine.device_step import (
    StepInputs,
    StepStatic,
    device_step,
    output_layout,
    stage_inputs,
)
from rtpjax.engine.input_batch import InputBatch
from rtpjax.engine.scheduler import ScheduledChunk, SchedulerOutput
from rtpjax.kernels import packed_prefill
from rtpjax.layers import sampler as sampler_lib
from rtpjax.layers.paged_attention import PagedAttention
from rtpjax.models import llama
from rtpjax.sampling_params import MAX_LOGPROBS, SamplingParams
from rtpjax.sharding import rules

# Fields of a ScheduledChunk, read over a whole step's chunks at C speed (map + np.fromiter).
_START, _NUM_TOKENS, _SAMPLES = (operator.itemgetter(i) for i in range(1, 4))
_STEPS = operator.itemgetter(5)


# Prefix-prefill steps (cuDNN over a cached prefix, StepStatic.max_prefix_tokens): at most this many
# sequence rows, each of its two cuDNN calls writes softmax stats of f32[B, N, T] (16 x 32 x 8192 x
# 4 B = 17 MB at Llama-3-8B's largest bucket, 268 MB at B = 256), and every row bucket is one more
# compiled variant; the prefix bucket is a power of two of at least this many tokens.
PREFIX_PREFILL_MAX_ROWS = 16
PREFIX_MIN_TOKENS = 256


def _pow2(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class PreparedStep:
    inputs: StepInputs
    static: StepStatic
    chunks: list[ScheduledChunk]  # row b ↔ chunks[b]
    needs_sync: bool  # the next step needs this step's tokens on the host (penalties)
    # Built once by prepare for fetch: which rows sample (None: all n rows do), the seq ids of
    # those rows in row order, and the rows computing prompt positions of prompt-logprobs requests.
    samples: np.ndarray | None = None  # bool[n]
    sampled_ids: list[int] = dataclasses.field(default_factory=list)
    prompt_rows: list[int] = dataclasses.field(default_factory=list)


class StepResult(NamedTuple):
    """Host copies of what a step produced, one entry per row that sampled."""

    seq_ids: list[int]
    token_ids: np.ndarray  # i32[R]
    logprob: np.ndarray  # f32[R]
    top_ids: np.ndarray  # i32[R, k]
    top_logprobs: np.ndarray  # f32[R, k]
    prompt_logprobs: dict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]]  # seq → (start, ...)
    # Multi-step decode: tokens each row sampled; the arrays above then have a step axis after R
    # (token_ids i32[R, K], logprob f32[R, K], top_* [R, K, k]), valid up to num_tokens[r].
    num_tokens: np.ndarray | None = None  # i32[R]


@dataclasses.dataclass
class InflightStep:
    prepared: PreparedStep
    outputs: jax.Array  # i32[...]: SamplerOutput (+ prompt logprobs) packed, see `out_layout`
    out_layout: packing.Layout


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        params: llama.Params,
        mesh: Mesh,
        *,
        num_pages: int,
        page_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        attention_impl: str = "auto",
        eos_token_ids: frozenset[int] | None = None,
        small_decode_buckets: bool | None = None,
        cudnn_prefill: bool = False,
        stable_inputs: bool | None = None,
    ):
        self.cfg = cfg
        self.params = params
        self.mesh = mesh
        self.page_size = page_size
        self.num_pages = num_pages
        self.pages_per_seq = -(-max_model_len // page_size)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_rows = _pow2(max_num_seqs, 8)
        self.token_buckets = sorted({_pow2(n, 16) for n in _doublings(16, max_num_batched_tokens)})
        self.dtype = params.embed.dtype
        self.attention_impl = attention_impl
        self.tight_rows = jax.default_backend() == "cpu"
        # Decode-only steps of fewer sequences than the smallest token bucket get (T, B) buckets of
        # 1, 2, 4, 8: the weights stream the same at M = 1 as at 16 but XLA's GEMMs are faster
        # there, and the attention kernel sizes its kv splits for the real batch (default: on
        # accelerators; on CPU the extra compiles cost more than they save).
        self.small_decode = (
            not self.tight_rows if small_decode_buckets is None else small_decode_buckets
        )
        self.kv_sharding = rules.named_sharding(
            mesh, ("pages", "page_slots", "kv_heads", "head_dim")
        )
        self.kv = self._allocate_kv()
        self.prev_sampled = jax.device_put(np.zeros(self.max_rows, np.int32))
        self._prev_rows: dict[int, int] = {}  # seq_id → row in the previous step's sampled ids
        eos = frozenset(cfg.eos_token_ids) if eos_token_ids is None else eos_token_ids
        self.batch = InputBatch(self.pages_per_seq, eos, max_num_seqs)
        self._out_layouts: dict[tuple, packing.Layout] = {}  # one per compiled variant
        # Opt-in: steps whose sequences all start at position 0 take cuDNN's flash attention on
        # GPUs, and prefill steps over cached prefixes with no decode row two cuDNN calls merged
        # by their LSE (`_prefix_bucket`). On Hopper the default paged path (the Mosaic GPU
        # kernel, 0.89-1.01 of cuDNN) is as fast end to end, without the extra step variants
        # (each compiles ~10 s longer on an H200): docs/kernels/attention.md.
        self.cudnn_prefill = (
            cudnn_prefill
            and attention_impl == "auto"
            and cfg.sliding_window is None
            and packed_prefill.cudnn_supported(cfg.head_dim, self.dtype)
        )
        self._step = jax.jit(
            functools.partial(device_step, cfg=cfg),
            static_argnames=("layout", "static", "attention"),
            donate_argnames=("kv", "prev_sampled"),
        )
        # XLA replays each step variant as a CUDA graph and re-records, before a launch, every
        # command whose buffers moved. With stable inputs each step's packed inputs are first
        # copied into a device buffer kept per input size (donated, so the copy lands at the same
        # address) and the step reads that one; the KV pages and the sampled ids are donated
        # anyway. Default: with RTPJAX_STABLE_GRAPHS=1 on GPUs (opt-in, see rtpjax/env.py).
        self.stable_inputs = (
            jax.default_backend() == "gpu" and env.stable_graphs()
            if stable_inputs is None
            else stable_inputs
        )
        self._staging: dict[int, jax.Array] = {}  # packed input size → its resident buffer
        self._stage = jax.jit(stage_inputs, donate_argnums=0)

    # -- memory -----------------------------------------------------------------------------------

    def kv_shape(self) -> tuple[int, ...]:
        return (self.num_pages, self.page_size, 2 * self.cfg.num_kv_heads, self.cfg.head_dim)

    def _allocate_kv(self) -> list[jax.Array]:
        make = jax.jit(
            lambda: jnp.zeros(self.kv_shape(), self.dtype), out_shardings=self.kv_sharding
        )
        return [make() for _ in range(self.cfg.num_layers)]

    @staticmethod
    def page_bytes(cfg: ModelConfig, page_size: int, dtype: Any) -> int:
        """Bytes of one page over all layers."""
        return (
            cfg.num_layers
            * page_size
            * 2
            * cfg.num_kv_heads
            * cfg.head_dim
            * jnp.dtype(dtype).itemsize
        )

    # -- sequences --------------------------------------------------------------------------------

    def register(self, seq_id: int, params: SamplingParams, seed: int) -> None:
        self.batch.add(seq_id, params, seed)

    def release(self, seq_id: int) -> None:
        self.batch.remove(seq_id)

    @property
    def num_compiled_variants(self) -> int:
        return len(self._out_layouts)

    # -- one step ---------------------------------------------------------------------------------

    def prepare(self, sched: SchedulerOutput) -> PreparedStep:
        chunks = sched.chunks
        n = len(chunks)
        total = sched.num_batched_tokens
        starts = np.fromiter(map(_START, chunks), np.int32, n)
        # Every chunk has at least one token: total == n is a decode-only step (one token a row).
        decode = total == n
        if decode:
            q_lens = np.ones(n, np.int32)
        else:
            q_lens = np.fromiter(map(_NUM_TOKENS, chunks), np.int32, n)
        max_prefix = self._prefix_bucket(starts, q_lens) if self.cudnn_prefill and not decode else 0
        if self.small_decode and decode and n < self.token_buckets[0]:
            T = B = _pow2(n, 1)
        else:
            T = self.token_buckets[bisect.bisect_left(self.token_buckets, total)]
            # Row buckets: on accelerators tied to the token bucket (one compile per token bucket;
            # the padded rows' logits cost ~1% of a large prefill); on CPU as tight as possible,
            # where padded logits rows are expensive. Prefix-prefill steps: tight everywhere, as
            # cuDNN's softmax stats are [B, N, T].
            if max_prefix:
                B = _pow2(n, 1)
            elif self.tight_rows:
                B = min(_pow2(n, 8), self.max_rows)
            else:
                B = min(T, self.max_rows)
        ps = self.page_size
        batch = self.batch
        seq_ids = [c[0].seq_id for c in chunks]  # c.seq.seq_id
        slots = batch.slots_of(seq_ids, sched.paged)
        iota = np.arange(max(T, B) + 1, dtype=np.int32)  # i32[max(T, B) + 1]

        all_device = sched.num_host_chunks == 0
        # A from_device chunk always samples: the all-device step needs no per-chunk look.
        samples = None if all_device else np.fromiter(map(_SAMPLES, chunks), np.bool_, n)
        cu = np.empty(B + 1, np.int32)
        if decode:
            cu[: n + 1] = iota[: n + 1]
        else:
            cu[0] = 0
            np.cumsum(q_lens, out=cu[1 : n + 1])
        cu[n + 1 :] = cu[n]
        kv_lens = np.zeros(B, np.int32)
        kv_lens[:n] = starts + q_lens
        page_indices = np.zeros((B, self.pages_per_seq), np.int32)
        page_indices[:n] = batch.page_table[slots]

        # Positions and slots of every token, vectorised over the flattened step.
        positions = np.zeros(T, np.int32)
        slot_mapping = np.zeros(T, np.int32)  # padding tokens write into the null page 0
        if decode:
            positions[:n] = starts
            row_of_token = iota[:n]
        else:
            row_of_token = np.repeat(iota[:n], q_lens)  # [total]
            positions[:total] = iota[:total] - np.repeat(cu[:n] - starts, q_lens)
        pos = positions[:total]
        slot_mapping[:total] = page_indices[row_of_token, pos // ps] * ps + pos % ps

        tokens = np.zeros(T, np.int32)
        token_src = np.full(T, -1, np.int32)
        prev_rows = self._prev_rows
        if all_device:
            # Decode-only, every input token still on the device. Each row's sampled id sits where
            # the last step prepared put it (batch.prev_row); execute's seq_id → row map says the
            # same once that step launched (it holds as many rows), and is read if it does not.
            if len(prev_rows) == batch.num_prev_rows:
                np.take(batch.prev_row, slots, out=token_src[:n])
            else:
                token_src[:n] = np.fromiter(map(prev_rows.__getitem__, seq_ids), np.int32, n)
        else:
            for b, c in enumerate(chunks):
                lo = cu[b]
                if c.from_device:
                    token_src[lo] = prev_rows[seq_ids[b]]
                elif c.num_tokens == 1:
                    tokens[lo] = c.seq.all_token_ids[c.start]
                else:
                    ids = c.seq.all_token_ids
                    tokens[lo : lo + c.num_tokens] = ids[c.start : c.start + c.num_tokens]
        logits_idx = np.zeros(B, np.int32)
        logits_idx[:n] = cu[1 : n + 1] - 1

        # Tokens each row generated before this sample (a pending one included). A sampling
        # chunk's sample lands at position start + num_tokens, right after the row's prompt and
        # its earlier outputs (known or pending); a row that does not sample has none pending.
        generated = kv_lens[:n] - batch.prompt_len[slots]
        if samples is not None and not samples.all():
            for b in np.flatnonzero(~samples).tolist():
                s = chunks[b].seq
                generated[b] = s.num_output_tokens + s.num_pending
        sampling = batch.sampling(slots, generated, B)
        wants = batch.any_flag(slots)  # (sampling, top-k/p, penalties, special, logprobs)
        flags = sampler_lib.SamplerFlags(
            all_greedy=not wants[0],
            use_top_k_top_p=bool(wants[1]),
            use_penalties=bool(wants[2]),
            num_top_logprobs=MAX_LOGPROBS if wants[4] else 0,
        )
        penalty_tokens = output_tokens = None
        if flags.use_penalties:
            seqs = [c.seq for c in chunks]
            pen = [s.all_token_ids if s.params.uses_penalties() else () for s in seqs]
            out = [s.output_token_ids if s.params.uses_penalties() else () for s in seqs]
            penalty_tokens = sampler_lib.pack_token_ids(pen, B)
            output_tokens = sampler_lib.pack_token_ids(out, B)

        next_tokens = np.zeros(T, np.int32)
        prompt_rows = []  # rows whose chunk computes prompt positions of a prompt-logprobs request
        if batch.num_prompt_logprobs:
            for b, c in enumerate(chunks):
                if c.seq.params.prompt_logprobs is not None and c.start < c.seq.num_prompt_tokens:
                    prompt_rows.append(b)
                    prompt = c.seq.prompt_token_ids
                    nxt = prompt[c.start + 1 : min(c.start + c.num_tokens + 1, len(prompt))]
                    next_tokens[cu[b] : cu[b] + len(nxt)] = nxt
        max_q_len = 1 if decode else None
        num_steps = sched.num_steps
        row_steps = None
        if num_steps > 1:
            if (
                not decode
                or (samples is not None and not samples.all())
                or flags.use_penalties
                or prompt_rows
            ):
                raise ValueError(
                    "a multi-step step must be decode-only with every row sampling, and no "
                    "penalties or prompt logprobs"
                )
            row_steps = np.zeros(B, np.int32)
            row_steps[:n] = np.fromiter(map(_STEPS, chunks), np.int32, n)
        inputs = StepInputs(
            tokens,
            token_src,
            positions,
            slot_mapping,
            kv_lens,
            page_indices,
            cu,
            np.array([n], np.int32),
            logits_idx,
            next_tokens,
            sampling,
            penalty_tokens,
            output_tokens,
            row_steps,
        )
        fresh = self.cudnn_prefill and max_q_len is None and not starts.any()
        static = StepStatic(flags, max_q_len, bool(prompt_rows), fresh, num_steps, max_prefix)
        if samples is None:
            sampled_ids = seq_ids
            batch.prev_row[slots] = iota[:n]
        else:
            sampled_rows = np.flatnonzero(samples)
            sampled_ids = [seq_ids[b] for b in sampled_rows.tolist()]
            batch.prev_row[slots[sampled_rows]] = sampled_rows
        batch.num_prev_rows = len(sampled_ids)
        return PreparedStep(
            inputs,
            static,
            list(chunks),
            needs_sync=flags.use_penalties,
            samples=samples,
            sampled_ids=sampled_ids,
            prompt_rows=prompt_rows,
        )

    def _prefix_bucket(self, starts: np.ndarray, q_lens: np.ndarray) -> int:
        """max_prefix_tokens of a prefill step (starts, q_lens: i32[n]), or 0 where it takes
        another path. A prefix-prefill step has at most PREFIX_PREFILL_MAX_ROWS rows, some chunk
        over a cached prefix (start > 0: else it is a fresh step), and no row of one token over a
        prefix (a decode, or a prompt's last token after a cache hit: the paged kernel reads just
        its context, where the gather would copy all of it); its bucket is the smallest power of
        two >= max(Σ starts, PREFIX_MIN_TOKENS), capped at the pool's tokens (Σ starts counts a
        shared prefix once per row, so it may exceed the pool: then not this path)."""
        if len(starts) > PREFIX_PREFILL_MAX_ROWS:
            return 0
        ctx = int(starts.sum())
        pool = self.num_pages * self.page_size
        if ctx == 0 or ctx > pool or ((q_lens == 1) & (starts > 0)).any():
            return 0
        return min(_pow2(ctx, PREFIX_MIN_TOKENS), pool)

    def execute(self, step: PreparedStep) -> InflightStep:
        """Launch the step (asynchronously). Its small inputs travel as one buffer, its outputs
        come back as one (packing.py)."""
        buf, layout = packing.pack(step.inputs)
        key = (layout, step.static)
        out_layout = self._out_layouts.get(key)
        if out_layout is None:
            x = step.inputs
            out_layout = self._out_layouts[key] = output_layout(
                x.kv_lens.shape[0], x.tokens.shape[0], step.static
            )
        with jax.set_mesh(self.mesh):
            if self.stable_inputs:
                resident = self._staging.get(buf.size)
                if resident is None:
                    replicated = NamedSharding(self.mesh, PartitionSpec())
                    resident = jax.device_put(np.zeros(buf.shape, buf.dtype), replicated)
                buf = self._staging[buf.size] = self._stage(resident, buf)
            self.kv, outputs, self.prev_sampled = self.call(self._step, buf, layout, step)
        outputs.copy_to_host_async()
        self._prev_rows = {c.seq.seq_id: b for b, c in enumerate(step.chunks) if c.samples}
        return InflightStep(step, outputs, out_layout)

    def _attention(self, step: PreparedStep) -> PagedAttention:
        return PagedAttention(
            scale=self.cfg.head_dim**-0.5,
            sliding_window=self.cfg.sliding_window,
            impl=self.attention_impl,
            max_q_len=step.static.max_q_len,
            fresh_prefill=step.static.fresh_prefill,
            max_prefix_tokens=step.static.max_prefix_tokens,
        )

    def call(self, fn: Any, buf: Any, layout: packing.Layout, step: PreparedStep) -> Any:
        """`fn` (the jitted step, or its `.lower`) on the runner's weights, KV pages and last
        sampled ids, with `buf` as `step`'s packed inputs (call under the runner's mesh)."""
        return fn(
            self.params,
            self.kv,
            buf,
            self.prev_sampled,
            layout=layout,
            static=step.static,
            attention=self._attention(step),
        )

    def lower(self, step: PreparedStep) -> jax.stages.Lowered:
        """The jitted step lowered for `step`'s shapes (to inspect its compiled HLO)."""
        buf, layout = packing.pack(step.inputs)
        with jax.set_mesh(self.mesh):
            return self.call(self._step.lower, buf, layout, step)

    def fetch(self, inflight: InflightStep) -> StepResult:
        """Block until the step is done and return its samples (rows that sample only)."""
        out, prompt_lp = packing.unpack_host(np.asarray(inflight.outputs), inflight.out_layout)
        ids, lp, top_ids, top_lp = out
        step = inflight.prepared
        n = len(step.chunks)
        # Rows that sample: the first n (every row of the step samples) or those of the mask.
        rows = slice(0, n) if step.samples is None else step.samples
        result_prompt: dict[int, tuple] = {}
        if prompt_lp is not None:
            _, p_lp, p_tid, p_tlp = prompt_lp
            cu = step.inputs.cu_q_lens
            for b in step.prompt_rows:
                c = step.chunks[b]
                lo, hi = int(cu[b]), int(cu[b + 1])
                result_prompt[c.seq.seq_id] = (c.start, p_lp[lo:hi], p_tid[lo:hi], p_tlp[lo:hi])
        if step.static.num_steps > 1:  # [K, B, ...] → the rows' [R, K, ...]
            return StepResult(
                step.sampled_ids,
                ids[:, :n].T,
                lp[:, :n].T,
                top_ids[:, :n].swapaxes(0, 1),
                top_lp[:, :n].swapaxes(0, 1),
                result_prompt,
                step.inputs.row_steps[:n],
            )
        return StepResult(
            step.sampled_ids,
            ids[:n][rows],
            lp[:n][rows],
            top_ids[:n][rows],
            top_lp[:n][rows],
            result_prompt,
        )


def _doublings(lo: int, hi: int) -> list[int]:
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= 2
    return [*out, hi]
