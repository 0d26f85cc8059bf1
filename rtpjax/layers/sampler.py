"""On-device sampling: one token per row from a step's last-position logits.

`sample` is a pure jnp function; the model runner jits it (with the forward pass) and passes the
static flags that `sampler_flags` derives on the host, so a step compiles one of a few variants.
`pack_sampling_tensors` turns each row's SamplingParams into the padded arrays `sample` reads.

Order, as vLLM: logit_bias and suppressed ids -> repetition/presence/frequency penalties ->
(greedy rows: argmax) -> temperature -> top-k -> top-p -> min-p -> one Gumbel-max draw. The
returned logprobs are vLLM v1's default "raw" ones: log_softmax of the logits as the model made
them. A row's draw depends only on its (seed, step), not on the batch around it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.sampling_params import MAX_LOGPROBS, SAMPLING_EPS, SamplingParams

# Width of the fast top-k/top-p path: rows needing more of their best tokens fall back to a sort.
TOP_HEAD = 128
SORT_ROWS = 64


@flax.struct.dataclass
class SamplingTensors:
    """Per-row settings of one sampling step; padded rows keep the defaults (greedy, no-op)."""

    temperature: jax.Array  # f32[B]  below SAMPLING_EPS -> greedy for that row
    top_p: jax.Array  # f32[B]  1 -> off
    top_k: jax.Array  # i32[B]  0 -> off
    min_p: jax.Array  # f32[B]  0 -> off
    repetition_penalty: jax.Array  # f32[B]  1 -> off
    presence_penalty: jax.Array  # f32[B]
    frequency_penalty: jax.Array  # f32[B]
    seed: jax.Array  # u32[B]
    step: jax.Array  # i32[B]  tokens this row generated before this sample
    suppress: jax.Array  # i32[B, E]  ids forbidden this step (-1 pad)
    bias_ids: jax.Array  # i32[B, M]  logit_bias token ids (-1 pad)
    bias_values: jax.Array  # f32[B, M]


class SamplerOutput(NamedTuple):
    token_ids: jax.Array  # i32[B]
    logprob: jax.Array  # f32[B]  raw logprob of the sampled token
    top_ids: jax.Array  # i32[B, k]  most likely ids, best first
    top_logprobs: jax.Array  # f32[B, k]


class SamplerFlags(NamedTuple):
    """The static arguments of `sample` for one batch: `sample(..., **flags._asdict())`."""

    all_greedy: bool
    use_top_k_top_p: bool
    use_penalties: bool
    num_top_logprobs: int  # 0 or MAX_LOGPROBS: two variants; the host slices each row's count


def _rows(x: jax.Array) -> jax.Array:
    return jnp.arange(x.shape[0])[:, None]  # i32[B, 1]


def _valid_ids(ids: jax.Array, vocab: int) -> jax.Array:
    # -1 pads would wrap to the last token under jnp indexing; send them out of range to be dropped.
    return jnp.where(ids >= 0, ids, vocab)


def apply_bias_and_suppress(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """Adds logit_bias, then sets suppressed ids to -inf. f32[B, V] -> f32[B, V]."""
    V = logits.shape[-1]
    bias_ids = _valid_ids(t.bias_ids, V)
    logits = logits.at[_rows(logits), bias_ids].add(t.bias_values, mode="drop")
    suppress = _valid_ids(t.suppress, V)
    return logits.at[_rows(logits), suppress].set(-jnp.inf, mode="drop")


def apply_penalties(
    logits: jax.Array,  # f32[B, V]
    t: SamplingTensors,
    penalty_tokens: jax.Array,  # i32[B, M]  prompt and output ids, -1 pad
    output_tokens: jax.Array,  # i32[B, M2]  output ids, -1 pad
) -> jax.Array:
    """Repetition penalty on prompt ∪ output ids, then presence/frequency on output counts."""
    V = logits.shape[-1]
    seen = jnp.zeros(logits.shape, bool).at[_rows(logits), _valid_ids(penalty_tokens, V)]
    seen = seen.set(True, mode="drop")  # bool[B, V]
    counts = jnp.zeros(logits.shape, jnp.int32).at[_rows(logits), _valid_ids(output_tokens, V)]
    counts = counts.add(1, mode="drop")  # i32[B, V]
    rep = t.repetition_penalty[:, None]  # f32[B, 1]
    # As vLLM and HF: shrink a seen token's logit toward zero from either side.
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - t.frequency_penalty[:, None] * counts
    return logits - t.presence_penalty[:, None] * (counts > 0)


def top_k_exact(x: jax.Array, k: int, chunk: int = 32) -> tuple[jax.Array, jax.Array]:
    """Each row's k largest values, best first, and their ids: f32[B, V] -> f32[B, k], i32[B, k].

    XLA's GPU top_k sorts whole rows for k > 1. The k best tokens lie in the k chunks (of `chunk`
    ids) with the largest maxima, so only V/chunk maxima and k*chunk candidates get sorted. Equal
    values may come in another id order than lax.top_k's.
    """
    B, V = x.shape
    n_full = V // chunk
    if n_full <= k:
        return jax.lax.top_k(x, k)
    maxima = jnp.max(x[:, : n_full * chunk].reshape(B, n_full, chunk), axis=-1)  # f32[B, V/c]
    if n_full * chunk < V:
        maxima = jnp.concatenate([maxima, jnp.max(x[:, n_full * chunk :], -1, keepdims=True)], -1)
    _, best_chunks = jax.lax.top_k(maxima, k)  # i32[B, k]
    ids = (best_chunks[:, :, None] * chunk + jnp.arange(chunk)).reshape(B, k * chunk)
    candidates = jnp.take_along_axis(x, jnp.minimum(ids, V - 1), axis=-1)  # f32[B, k*c]
    candidates = jnp.where(ids < V, candidates, -jnp.inf)
    values, where = jax.lax.top_k(candidates, k)  # f32[B, k], i32[B, k]
    return values, jnp.take_along_axis(ids, where, axis=-1)


def _cut(
    desc: jax.Array,  # f32[B, W]  each row's W largest logits, best first
    top_k: jax.Array,  # i32[B]
    top_p: jax.Array,  # f32[B]
    lse_all: jax.Array,  # f32[B]  logsumexp of the whole row
) -> tuple[jax.Array, jax.Array]:
    """Top-k then top-p on the head `desc`: the smallest kept logit f32[B] and how many are kept
    i32[B]. Exact when the kept set ends inside the head and, if top-k is on, k <= W."""
    W = desc.shape[-1]
    k_in_head = (top_k >= 1) & (top_k <= W)
    in_k = jnp.arange(W) < jnp.where(k_in_head, top_k, W)[:, None]  # bool[B, W]
    head = jnp.where(in_k, desc, -jnp.inf)
    lse = jnp.where(k_in_head, jax.nn.logsumexp(head, axis=-1), lse_all)  # f32[B]
    probs = jnp.exp(head - lse[:, None])  # f32[B, W]
    # Keep a token while the mass strictly before it is below top_p: the smallest head reaching it.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((mass_before < top_p[:, None]) | (top_p >= 1.0)[:, None])
    kept = jnp.maximum(jnp.sum(keep, axis=-1), 1)  # i32[B]
    return jnp.take_along_axis(desc, kept[:, None] - 1, axis=-1)[:, 0], kept


def apply_top_k_top_p(
    logits: jax.Array,  # f32[B, V]  already divided by temperature
    top_k: jax.Array,  # i32[B]  0 -> off
    top_p: jax.Array,  # f32[B]  1 -> off
) -> jax.Array:
    """Keeps the top_k largest logits, then the smallest head of those whose probability reaches
    top_p (renormalised after top-k); the rest become -inf. Ties at the threshold all stay.

    Fast path: the exact TOP_HEAD best tokens per row (`top_k_exact`). A row's whole row is sorted
    only when its kept set may reach past them (top_k > TOP_HEAD, or top-p over a flat
    distribution). Either way a row's result does not depend on which rows share its batch.
    """
    V = logits.shape[-1]
    W = min(TOP_HEAD, V)
    k_on = (top_k >= 1) & (top_k < V)  # bool[B]
    active = k_on | (top_p < 1.0)
    lse_all = jax.nn.logsumexp(logits, axis=-1)  # f32[B]
    head, _ = top_k_exact(logits, W)  # f32[B, W]
    threshold, kept = _cut(head, top_k, top_p, lse_all)
    resolved = ~active | (W == V) | (k_on & (top_k <= W)) | (~k_on & (kept < W))  # bool[B]

    # The rest sort their whole row, in groups of G rows: only groups holding such a row sort, and
    # the sort holds a few [G, V] arrays, not [B, V].
    B = logits.shape[0]
    G = math.gcd(B, SORT_ROWS)

    def group_threshold(group: tuple[jax.Array, ...]) -> jax.Array:
        x, k, p, lse, fast, done = group  # f32[G, V], i32[G], f32[G], f32[G], f32[G], bool[G]

        def sort_rows(fast: jax.Array) -> jax.Array:
            full, _ = _cut(-jnp.sort(-x, axis=-1), k, p, lse)
            # Resolved rows keep the fast threshold, so batch-mates never change a row's draw.
            return jnp.where(done, fast, full)

        return jax.lax.cond(jnp.all(done), lambda t: t, sort_rows, fast)

    def sort_groups(threshold: jax.Array) -> jax.Array:
        groups = (logits, top_k, top_p, lse_all, threshold, resolved)
        grouped = tuple(a.reshape(B // G, G, *a.shape[1:]) for a in groups)
        return jax.lax.map(group_threshold, grouped).reshape(B)

    # The outer cond skips the loop over groups (about 0.5 ms at B=512 on an H100) when none sorts.
    threshold = jax.lax.cond(jnp.all(resolved), lambda t: t, sort_groups, threshold)
    threshold = jnp.where(active, threshold, -jnp.inf)
    return jnp.where(logits < threshold[:, None], -jnp.inf, logits)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drops tokens less likely than min_p times the most likely one. f32[B, V], f32[B]."""
    # p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p): no softmax needed, and the ratio
    # is the same before and after top-k/top-p renormalisation, which always keep the max.
    floor = jnp.max(logits, axis=-1) + jnp.log(min_p)  # f32[B]; min_p 0 -> -inf, keeps all
    return jnp.where(logits < floor[:, None], -jnp.inf, logits)


def row_keys(seed: jax.Array, step: jax.Array) -> jax.Array:
    """One PRNG key per row from its (seed, step) alone. u32[B], i32[B] -> key[B]."""
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seed, step)


def sample(
    logits: jax.Array,  # f32[B, V] (bf16 is upcast)
    t: SamplingTensors,
    penalty_tokens: jax.Array | None = None,  # i32[B, M]  prompt + output ids, -1 pad
    output_tokens: jax.Array | None = None,  # i32[B, M2]  output ids, -1 pad
    *,
    all_greedy: bool,
    use_top_k_top_p: bool,
    use_penalties: bool,
    num_top_logprobs: int,
) -> SamplerOutput:
    """Samples one token per row. The flags are static: all_greedy takes argmax only (no RNG, no
    sort); use_top_k_top_p enables the sort; use_penalties needs both token arrays."""
    if use_penalties and (penalty_tokens is None or output_tokens is None):
        raise ValueError("sample(use_penalties=True) needs both penalty_tokens and output_tokens")
    if not 0 <= num_top_logprobs <= logits.shape[-1]:
        raise ValueError(f"num_top_logprobs={num_top_logprobs} must be in [0, {logits.shape[-1]}]")
    raw = logits.astype(jnp.float32)  # f32[B, V]
    B = raw.shape[0]

    x = apply_bias_and_suppress(raw, t)
    if use_penalties:
        x = apply_penalties(x, t, penalty_tokens, output_tokens)
    token_ids = jnp.argmax(x, axis=-1).astype(jnp.int32)  # i32[B]
    if not all_greedy:
        greedy = t.temperature < SAMPLING_EPS  # bool[B]
        x = x / jnp.where(greedy, 1.0, t.temperature)[:, None]
        if use_top_k_top_p:
            x = apply_top_k_top_p(x, t.top_k, t.top_p)
        x = apply_min_p(x, t.min_p)
        gumbel = jax.vmap(lambda key: jax.random.gumbel(key, x.shape[-1:], jnp.float32))(
            row_keys(t.seed, t.step)
        )  # f32[B, V]
        drawn = jnp.argmax(x + gumbel, axis=-1).astype(jnp.int32)  # i32[B]
        token_ids = jnp.where(greedy, token_ids, drawn)

    lse = jax.nn.logsumexp(raw, axis=-1)  # f32[B]
    logprob = jnp.take_along_axis(raw, token_ids[:, None], axis=-1)[:, 0] - lse  # f32[B]
    if num_top_logprobs:
        top_values, top_ids = top_k_exact(raw, num_top_logprobs)  # f32[B, k], i32[B, k]
        top_logprobs = top_values - lse[:, None]
    else:
        top_ids = jnp.zeros((B, 0), jnp.int32)
        top_logprobs = jnp.zeros((B, 0), jnp.float32)
    return SamplerOutput(token_ids, logprob, top_ids.astype(jnp.int32), top_logprobs)


# ---------------------------------------------------------------------------------------------
# Host side: numpy only.


def _bucket(n: int, minimum: int = 4) -> int:
    """Next power of two >= n (at least `minimum`), so widths take few values across steps."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def sampler_flags(params: Sequence[SamplingParams | None]) -> SamplerFlags:
    """The static flags of `sample` for a batch (None rows are padding and count as greedy)."""
    live = [p for p in params if p is not None]
    wants_top = any(p.logprobs for p in live)
    return SamplerFlags(
        all_greedy=all(p.is_greedy() for p in live),
        use_top_k_top_p=any(p.uses_top_k_top_p() for p in live),
        use_penalties=any(p.uses_penalties() for p in live),
        num_top_logprobs=MAX_LOGPROBS if wants_top else 0,
    )


def _per_row(name: str, values: Sequence[int], rows: int) -> np.ndarray:
    array = np.asarray(values, np.int64)
    if array.shape != (rows,):
        raise ValueError(f"{name} has shape {array.shape}; it needs one entry per row: ({rows},)")
    return array


def pack_sampling_tensors(
    params: Sequence[SamplingParams | None],
    steps: Sequence[int],
    seeds: Sequence[int],
    num_output: Sequence[int],
    eos_ids: Sequence[int] | int,
    batch_size: int,
    *,
    suppress_width: int | None = None,
    bias_width: int | None = None,
) -> SamplingTensors:
    """SamplingTensors of numpy arrays for a batch of `batch_size` rows; rows past len(params) and
    None rows are greedy no-ops.

    steps: the RNG step of each row (usually its output tokens so far). seeds: the seed each row
    draws with, chosen by the engine: the request's seed (plus the child index for n > 1) or, for an
    unseeded request, one random seed fixed at arrival; it is reduced mod 2**32. num_output: tokens
    each row has generated, for min_tokens, under which its stop_token_ids and (unless ignore_eos)
    the eos_ids are suppressed. suppress_width / bias_width fix the widths E and M (default: the
    next power of two, at least 4, so few shapes reach the jitted step).
    """
    rows = len(params)
    if rows > batch_size:
        raise ValueError(f"batch_size={batch_size} is smaller than the {rows} rows given")
    steps_a = _per_row("steps", steps, rows)
    # Python ints of any size (vLLM accepts any int seed), reduced before numpy sees them.
    seeds_a = _per_row("seeds", [int(s) % (1 << 32) for s in seeds], rows)
    num_output_a = _per_row("num_output", num_output, rows)
    eos = (eos_ids,) if isinstance(eos_ids, int | np.integer) else tuple(eos_ids)

    suppress_rows: list[list[int]] = [[] for _ in range(rows)]
    bias_rows: list[list[tuple[int, float]]] = [[] for _ in range(rows)]
    for i, p in enumerate(params):
        if p is None:
            continue
        if num_output_a[i] < p.min_tokens:
            ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))
            suppress_rows[i] = sorted(ids)
        bias_rows[i] = sorted((p.logit_bias or {}).items())
    E = _width("suppress_width", suppress_width, max(map(len, suppress_rows), default=0))
    M = _width("bias_width", bias_width, max(map(len, bias_rows), default=0))

    out = dict(
        temperature=np.zeros(batch_size, np.float32),
        top_p=np.ones(batch_size, np.float32),
        top_k=np.zeros(batch_size, np.int32),
        min_p=np.zeros(batch_size, np.float32),
        repetition_penalty=np.ones(batch_size, np.float32),
        presence_penalty=np.zeros(batch_size, np.float32),
        frequency_penalty=np.zeros(batch_size, np.float32),
        seed=np.zeros(batch_size, np.uint32),
        step=np.zeros(batch_size, np.int32),
        suppress=np.full((batch_size, E), -1, np.int32),
        bias_ids=np.full((batch_size, M), -1, np.int32),
        bias_values=np.zeros((batch_size, M), np.float32),
    )
    out["seed"][:rows] = seeds_a
    out["step"][:rows] = steps_a
    for i, p in enumerate(params):
        if p is None:
            continue
        out["repetition_penalty"][i] = p.repetition_penalty
        out["presence_penalty"][i] = p.presence_penalty
        out["frequency_penalty"][i] = p.frequency_penalty
        if not p.is_greedy():  # greedy rows keep temperature 0 and no filters, as vLLM
            out["temperature"][i] = p.temperature
            out["top_p"][i] = p.top_p
            out["top_k"][i] = max(p.top_k, 0)
            out["min_p"][i] = p.min_p
        out["suppress"][i, : len(suppress_rows[i])] = suppress_rows[i]
        if bias_rows[i]:
            ids, values = zip(*bias_rows[i], strict=True)
            out["bias_ids"][i, : len(ids)] = ids
            out["bias_values"][i, : len(values)] = values
    return SamplingTensors(**out)


def _width(name: str, given: int | None, needed: int) -> int:
    if given is None:
        return _bucket(needed)
    if given < needed:
        raise ValueError(f"{name}={given} is too small: a row needs {needed} entries")
    return given


def pack_token_ids(
    token_lists: Sequence[Sequence[int]], batch_size: int, width: int | None = None
) -> np.ndarray:
    """Token histories as i32[batch_size, width], -1 padded (for penalty_tokens / output_tokens);
    width defaults to the next power of two of the longest list."""
    needed = max(map(len, token_lists), default=0)
    if len(token_lists) > batch_size:
        raise ValueError(f"batch_size={batch_size} is smaller than the {len(token_lists)} rows")
    out = np.full((batch_size, _width("width", width, needed)), -1, np.int32)
    for i, ids in enumerate(token_lists):
        out[i, : len(ids)] = ids
    return out
