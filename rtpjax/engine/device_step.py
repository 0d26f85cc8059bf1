"""The jitted device side of one engine step: its inputs (`StepInputs`, `StepStatic`), the step
itself (`device_step`: embed, layers with paged attention, logits, on-device sampling; K decode
iterations in one `fori_loop` for multi-step decode) and the layout of its packed outputs.
ModelRunner (model_runner.py) prepares the inputs on the host and jits `device_step`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.config import ModelConfig
from rtpjax.engine import packing
from rtpjax.layers import sampler as sampler_lib
from rtpjax.layers.paged_attention import PagedAttention, PagedMeta
from rtpjax.models import llama
from rtpjax.sampling_params import MAX_LOGPROBS


class StepInputs(NamedTuple):
    """Host arrays of one step (numpy), padded to the step's (T, B) bucket."""

    tokens: np.ndarray  # i32[T]
    token_src: np.ndarray  # i32[T]  row of the previous step's sampled ids to read, or -1
    positions: np.ndarray  # i32[T]
    slot_mapping: np.ndarray  # i32[T]
    kv_lens: np.ndarray  # i32[B]
    page_indices: np.ndarray  # i32[B, pages_per_seq]
    cu_q_lens: np.ndarray  # i32[B+1]
    num_seqs: np.ndarray  # i32[1]
    logits_idx: np.ndarray  # i32[B]  last token of each row
    next_tokens: np.ndarray  # i32[T]  the prompt token after each position (prompt logprobs)
    sampling: sampler_lib.SamplingTensors  # numpy leaves, [B] rows
    penalty_tokens: np.ndarray | None  # i32[B, M]
    output_tokens: np.ndarray | None  # i32[B, M2]
    row_steps: np.ndarray | None = None  # i32[B]  multi-step decode: tokens each row samples


class StepStatic(NamedTuple):
    """The static (compile-time) choices of a step."""

    flags: sampler_lib.SamplerFlags
    max_q_len: int | None  # 1 for decode-only steps
    prompt_logprobs: bool
    fresh_prefill: bool = False  # no sequence has cached KV: cuDNN attention (packed_prefill.py)
    num_steps: int = 1  # multi-step decode: model iterations in this launch
    # > 0: a prefill step over cached prefixes (prefix_prefill.py), bound on their summed tokens
    max_prefix_tokens: int = 0


def output_layout(rows: int, tokens: int, static: StepStatic) -> packing.Layout:
    """The layout of a step's packed outputs: (SamplerOutput, prompt logprobs or None)."""
    i32, f32 = np.int32, np.float32
    sds = jax.ShapeDtypeStruct
    k = static.flags.num_top_logprobs
    r = (rows,) if static.num_steps == 1 else (static.num_steps, rows)  # multi-step: [K, B, ...]
    out = sampler_lib.SamplerOutput(sds(r, i32), sds(r, f32), sds((*r, k), i32), sds((*r, k), f32))
    prompt = None
    if static.prompt_logprobs:
        m = MAX_LOGPROBS
        prompt = (
            sds((tokens,), i32),
            sds((tokens,), f32),
            sds((tokens, m), i32),
            sds((tokens, m), f32),
        )
    return packing.Layout.of((out, prompt))


def stage_inputs(resident, buf):
    """Copy a step's packed inputs into the donated resident buffer of their size."""
    return resident.at[:].set(buf)


def device_step(
    params,
    kv,
    buf,
    prev_sampled,
    *,
    cfg: ModelConfig,
    layout: packing.Layout,
    static: StepStatic,
    attention: PagedAttention,
):
    x: StepInputs = packing.unpack_device(buf, layout)
    tokens = jnp.where(x.token_src >= 0, prev_sampled[jnp.maximum(x.token_src, 0)], x.tokens)
    if static.num_steps > 1:
        return _multi_step(params, kv, x, tokens, prev_sampled, cfg, static, attention)
    meta = PagedMeta(x.slot_mapping, x.kv_lens, x.page_indices, x.cu_q_lens, x.num_seqs)
    hidden, kv, _ = llama.forward(params, cfg, tokens, x.positions, kv, meta, attention)
    logits = llama.logits(params, hidden[x.logits_idx])  # f32[B, V]
    out = sampler_lib.sample(
        logits, x.sampling, x.penalty_tokens, x.output_tokens, **static.flags._asdict()
    )
    prompt_lp = None
    if static.prompt_logprobs:
        all_logits = llama.logits(params, hidden)  # f32[T, V]
        lse = jax.nn.logsumexp(all_logits, axis=-1)
        nxt = jnp.take_along_axis(all_logits, x.next_tokens[:, None], axis=-1)[:, 0] - lse
        top_v, top_i = jax.lax.top_k(all_logits, MAX_LOGPROBS)
        prompt_lp = (x.next_tokens, nxt, top_i.astype(jnp.int32), top_v - lse[:, None])
    outputs = (out, prompt_lp)
    expected = output_layout(x.kv_lens.shape[0], x.tokens.shape[0], static)
    if packing.Layout.of(outputs) != expected:  # trace time only: the host unpacks by `expected`
        raise AssertionError(f"step outputs {packing.Layout.of(outputs)} != {expected}")
    rows = out.token_ids.shape[0]
    sampled = jnp.zeros_like(prev_sampled).at[:rows].set(out.token_ids)
    return kv, packing.pack_device(outputs), sampled


def _multi_step(params, kv, x: StepInputs, tokens, prev_sampled, cfg, static, attention):
    """K = static.num_steps decode iterations in one launch (see the module docstring). Every row
    has one token (row b is token b); iteration i computes position start + i of each row that
    still samples (i < row_steps[b]) and feeds its sampled id to iteration i + 1."""
    K = static.num_steps
    T, B = x.tokens.shape[0], x.kv_lens.shape[0]
    page_size = kv[0].shape[1]
    flags = static.flags._asdict()
    row = jnp.minimum(jnp.arange(T), B - 1)  # i32[T]: token t is row t (t < B)
    is_row = jnp.arange(T) < B  # bool[T]
    last = jnp.maximum(x.row_steps - 1, 0)  # i32[B]: a row's last iteration that samples

    def body(i, carry):
        kv, tokens, outs = carry
        pos = x.positions + i  # i32[T]
        live = is_row & (i < x.row_steps[row])  # bool[T]
        page = x.page_indices[row, jnp.minimum(pos // page_size, x.page_indices.shape[1] - 1)]
        slots = jnp.where(live, page * page_size + pos % page_size, 0)  # dead → the null page
        kv_lens = x.kv_lens + jnp.minimum(i, last)  # past its steps a row re-reads its last KV
        meta = PagedMeta(slots, kv_lens, x.page_indices, x.cu_q_lens, x.num_seqs)
        hidden, kv, _ = llama.forward(params, cfg, tokens, pos, kv, meta, attention)
        logits = llama.logits(params, hidden[x.logits_idx])  # f32[B, V]
        sampling = x.sampling.replace(step=x.sampling.step + i)
        out = sampler_lib.sample(logits, sampling, None, None, **flags)
        outs = jax.tree.map(lambda acc, o: acc.at[i].set(o), outs, out)
        tokens = jnp.zeros_like(tokens).at[:B].set(out.token_ids)
        return kv, tokens, outs

    k = static.flags.num_top_logprobs
    outs = sampler_lib.SamplerOutput(
        jnp.zeros((K, B), jnp.int32),
        jnp.zeros((K, B), jnp.float32),
        jnp.zeros((K, B, k), jnp.int32),
        jnp.zeros((K, B, k), jnp.float32),
    )
    kv, _, outs = jax.lax.fori_loop(0, K, body, (kv, tokens, outs))
    # The next step reads each row's newest token: the one of its last iteration that sampled.
    newest = jnp.take_along_axis(outs.token_ids, last[None], axis=0)[0]  # i32[B]
    sampled = jnp.zeros_like(prev_sampled).at[:B].set(newest)
    return kv, packing.pack_device((outs, None)), sampled
