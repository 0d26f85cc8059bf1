"""InputBatch: per-sequence state the runner keeps across steps (vLLM v1's "persistent batch").

Preparing a step must cost well under a millisecond at batch 256, so nothing is rebuilt per step
that did not change: each live sequence owns a slot holding its page-table row (updated with only
the pages added since the last step) and its sampling settings (written once). A step then gathers
its rows with a few numpy fancy-indexes.
"""

from __future__ import annotations

import numpy as np

from rtpjax.engine.sequence import Sequence
from rtpjax.layers.sampler import SamplingTensors
from rtpjax.sampling_params import SamplingParams

_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
_MIN_WIDTH = 4  # suppress / logit_bias widths: powers of two from 4, so few shapes compile


def _pow2(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


class InputBatch:
    def __init__(self, pages_per_seq: int, eos_ids: frozenset[int], capacity: int = 64):
        self.pages_per_seq = pages_per_seq
        self.eos_ids = eos_ids
        self._slot: dict[int, int] = {}
        self._free: list[int] = []
        self._params: list[SamplingParams | None] = []
        self._pt_len: list[int] = []  # pages written into page_table per slot
        self._pt_adm: list[int] = []  # the admission those pages belong to
        self.capacity = 0
        self.page_table = np.zeros((0, pages_per_seq), np.int32)  # i32[C, P]
        self.floats = {f: np.zeros(0, np.float32) for f in _FLOAT_FIELDS}
        self.top_k = np.zeros(0, np.int32)
        self.seed = np.zeros(0, np.uint32)
        # Per-slot booleans: not greedy, top-k/top-p, penalties, min_tokens/logit_bias, logprobs.
        self.flags = np.zeros((0, 5), np.bool_)
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        self.page_table = np.resize(self.page_table, (capacity, self.pages_per_seq))
        self.page_table[old:] = 0
        self.floats = {f: np.resize(a, capacity) for f, a in self.floats.items()}
        self.top_k = np.resize(self.top_k, capacity)
        self.seed = np.resize(self.seed, capacity)
        self.flags = np.resize(self.flags, (capacity, 5))
        self._params.extend([None] * (capacity - old))
        self._pt_len.extend([0] * (capacity - old))
        self._pt_adm.extend([-1] * (capacity - old))
        self._free.extend(range(capacity - 1, old - 1, -1))
        self.capacity = capacity

    # -- membership -------------------------------------------------------------------------------

    def add(self, seq_id: int, params: SamplingParams, seed: int) -> None:
        if not self._free:
            self._grow(2 * self.capacity)
        s = self._free.pop()
        self._slot[seq_id] = s
        self._params[s] = params
        self._pt_len[s] = 0
        self._pt_adm[s] = -1
        greedy = params.is_greedy()
        for f in _FLOAT_FIELDS:
            value = getattr(params, f)
            if greedy and f in ("temperature", "top_p", "min_p"):
                value = {"temperature": 0.0, "top_p": 1.0, "min_p": 0.0}[f]
            self.floats[f][s] = value
        self.top_k[s] = 0 if greedy else max(params.top_k, 0)
        self.seed[s] = seed % (1 << 32)
        self.flags[s] = (
            not greedy,
            params.uses_top_k_top_p(),
            params.uses_penalties(),
            bool(params.min_tokens or params.logit_bias),
            params.logprobs is not None,
        )

    def remove(self, seq_id: int) -> None:
        s = self._slot.pop(seq_id, None)
        if s is not None:
            self._params[s] = None
            self._free.append(s)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._slot

    # -- per step ---------------------------------------------------------------------------------

    def slots(self, seqs: list[Sequence]) -> np.ndarray:
        """i32[n] slots of `seqs`, their page-table rows brought up to date."""
        out = np.empty(len(seqs), np.int32)
        slot_of, pt_len, pt_adm, table = self._slot, self._pt_len, self._pt_adm, self.page_table
        for i, seq in enumerate(seqs):
            s = slot_of[seq.seq_id]
            out[i] = s
            pages = seq.page_ids
            n, have = len(pages), pt_len[s]
            if seq.num_admissions != pt_adm[s] or n < have:
                table[s, :n] = pages  # a new admission (after preemption): rewrite the row
                pt_adm[s] = seq.num_admissions
                pt_len[s] = n
            elif n > have:
                table[s, have:n] = pages[have:]
                pt_len[s] = n
        return out

    def sampling(
        self, slots: np.ndarray, seqs: list[Sequence], steps: np.ndarray, rows: int
    ) -> SamplingTensors:
        """SamplingTensors of numpy arrays for the step's rows (padding rows greedy no-ops)."""
        n = len(slots)

        def pad(a: np.ndarray, fill) -> np.ndarray:
            out = np.full(rows, fill, a.dtype)
            out[:n] = a[slots]
            return out

        f = self.floats
        suppress_rows, bias_rows = [], []
        if self.flags[slots, 3].any():
            for i, s in enumerate(slots):
                p = self._params[s]
                if not self.flags[s, 3]:
                    continue
                if int(steps[i]) < p.min_tokens:
                    ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_ids))
                    suppress_rows.append((i, sorted(ids)))
                if p.logit_bias:
                    bias_rows.append((i, sorted(p.logit_bias.items())))
        E = _pow2(max((len(r) for _, r in suppress_rows), default=0), _MIN_WIDTH)
        M = _pow2(max((len(r) for _, r in bias_rows), default=0), _MIN_WIDTH)
        suppress = np.full((rows, E), -1, np.int32)
        bias_ids = np.full((rows, M), -1, np.int32)
        bias_values = np.zeros((rows, M), np.float32)
        for i, ids in suppress_rows:
            suppress[i, : len(ids)] = ids
        for i, items in bias_rows:
            bias_ids[i, : len(items)] = [k for k, _ in items]
            bias_values[i, : len(items)] = [v for _, v in items]
        step = np.zeros(rows, np.int32)
        step[:n] = steps
        return SamplingTensors(
            temperature=pad(f["temperature"], 0.0),
            top_p=pad(f["top_p"], 1.0),
            top_k=pad(self.top_k, 0),
            min_p=pad(f["min_p"], 0.0),
            repetition_penalty=pad(f["repetition_penalty"], 1.0),
            presence_penalty=pad(f["presence_penalty"], 0.0),
            frequency_penalty=pad(f["frequency_penalty"], 0.0),
            seed=pad(self.seed, 0),
            step=step,
            suppress=suppress,
            bias_ids=bias_ids,
            bias_values=bias_values,
        )

    def any_flag(self, slots: np.ndarray) -> np.ndarray:
        """bool[5]: does any row want (sampling, top-k/p, penalties, special, logprobs)."""
        return self.flags[slots].any(axis=0)

    def params(self, slot: int) -> SamplingParams | None:
        return self._params[slot]
