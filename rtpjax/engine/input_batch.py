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
# What a padding row (and a greedy row's temperature / top_p / min_p) holds: sampling no-ops.
_NOOP = {"temperature": 0.0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}
_NOOP_FLOATS = np.array([_NOOP.get(f, 0.0) for f in _FLOAT_FIELDS], np.float32)  # f32[6]
# Rows of InputBatch.table: the six float fields, then top_k and seed (all 4 bytes wide, kept as
# raw u32 bits so one gather serves them all); a padding row's column: no-ops, top_k 0, seed 0.
_TOP_K, _SEED = len(_FLOAT_FIELDS), len(_FLOAT_FIELDS) + 1
_NOOP_COLUMN = np.concatenate([_NOOP_FLOATS.view(np.uint32), np.zeros(2, np.uint32)])  # u32[8]
# Columns of InputBatch.flags.
SAMPLES, TOP_K_P, PENALTIES, SPECIAL, LOGPROBS = range(5)
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
        # One row per sampling field (_FLOAT_FIELDS, top_k, seed): a step gathers all eight with
        # one take. floats / top_k / seed are typed views of its rows.
        self.table = np.zeros((_SEED + 1, 0), np.uint32)  # u32[8, C]
        self._views()
        # Prompt length of each slot's sequence (written with its page row at each admission).
        self.prompt_len = np.zeros(0, np.int32)  # i32[C]
        # Row of each slot in the sampled ids of the last step prepared (written by the runner's
        # prepare for the rows that sample; how many it wrote in num_prev_rows): where the next
        # step's from_device chunks read their input token once that step has run.
        self.prev_row = np.zeros(0, np.int32)  # i32[C]
        self.num_prev_rows = 0
        # Per-slot booleans, columns SAMPLES .. LOGPROBS: not greedy, top-k/top-p, penalties,
        # min_tokens/logit_bias, logprobs; and how many live slots have each (a step asks the
        # rows only when some but not all live sequences do).
        self.flags = np.zeros((0, 5), np.bool_)  # bool[C, 5]
        self._flag_counts = [0] * 5
        # Live sequences asking for prompt logprobs: a step scans its chunks for them only if any.
        self.num_prompt_logprobs = 0
        self._empty_special: dict[int, tuple[np.ndarray, ...]] = {}  # rows → _no_special arrays
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        self.page_table = np.resize(self.page_table, (capacity, self.pages_per_seq))
        self.page_table[old:] = 0
        table = np.zeros((_SEED + 1, capacity), np.uint32)
        table[:, :old] = self.table
        self.table = table
        self._views()
        self.prompt_len = np.resize(self.prompt_len, capacity)
        self.prev_row = np.resize(self.prev_row, capacity)
        self.flags = np.resize(self.flags, (capacity, 5))
        self.flags[old:] = False
        self._params.extend([None] * (capacity - old))
        self._pt_len.extend([0] * (capacity - old))
        self._pt_adm.extend([-1] * (capacity - old))
        self._free.extend(range(capacity - 1, old - 1, -1))
        self.capacity = capacity

    def _views(self) -> None:
        self.floats = self.table[:_TOP_K].view(np.float32)  # f32[6, C]
        self.top_k = self.table[_TOP_K].view(np.int32)  # i32[C]
        self.seed = self.table[_SEED]  # u32[C]

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
        for j, f in enumerate(_FLOAT_FIELDS):
            value = getattr(params, f)
            if greedy and f in ("temperature", "top_p", "min_p"):
                value = _NOOP[f]
            self.floats[j, s] = value
        self.top_k[s] = 0 if greedy else max(params.top_k, 0)
        self.seed[s] = seed % (1 << 32)
        self.flags[s] = (
            not greedy,
            params.uses_top_k_top_p(),
            params.uses_penalties(),
            bool(params.min_tokens or params.logit_bias),
            params.logprobs is not None,
        )
        for j in np.flatnonzero(self.flags[s]):
            self._flag_counts[j] += 1
        self.num_prompt_logprobs += params.prompt_logprobs is not None

    def remove(self, seq_id: int) -> None:
        s = self._slot.pop(seq_id, None)
        if s is not None:
            self.num_prompt_logprobs -= self._params[s].prompt_logprobs is not None
            self._params[s] = None
            for j in np.flatnonzero(self.flags[s]):
                self._flag_counts[j] -= 1
            self._free.append(s)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._slot

    # -- per step ---------------------------------------------------------------------------------

    def slots(self, seqs: list[Sequence]) -> np.ndarray:
        """i32[n] slots of `seqs`, their page-table rows (and prompt_len) brought up to date."""
        slot_of, pt_len, pt_adm = self._slot, self._pt_len, self._pt_adm
        out = []
        for seq in seqs:
            s = slot_of[seq.seq_id]
            out.append(s)
            # Most steps add no page to a row: one length test (and one admission test) each.
            if len(seq.page_ids) != pt_len[s] or seq.num_admissions != pt_adm[s]:
                self._write_row(s, seq)
        return np.array(out, np.int32)

    def slots_of(self, seq_ids: list[int], paged: list[Sequence]) -> np.ndarray:
        """i32[n] slots of `seq_ids`, with the page-table rows of `paged` brought up to date.

        `paged` must hold every sequence among seq_ids whose page_ids changed since its row was
        last written (SchedulerOutput.paged does): the rows of the others are not looked at.
        """
        slot_of, pt_len, pt_adm = self._slot, self._pt_len, self._pt_adm
        for seq in paged:
            s = slot_of[seq.seq_id]
            if len(seq.page_ids) != pt_len[s] or seq.num_admissions != pt_adm[s]:
                self._write_row(s, seq)
        return np.fromiter(map(slot_of.__getitem__, seq_ids), np.int32, len(seq_ids))

    def _write_row(self, s: int, seq: Sequence) -> None:
        pages = seq.page_ids
        n, have = len(pages), self._pt_len[s]
        if seq.num_admissions != self._pt_adm[s] or n < have:
            self.page_table[s, :n] = pages  # a new admission (after preemption): rewrite the row
            self._pt_adm[s] = seq.num_admissions
            self.prompt_len[s] = seq.num_prompt_tokens
        else:
            self.page_table[s, have:n] = pages[have:]  # only the pages added since
        self._pt_len[s] = n

    def sampling(self, slots: np.ndarray, steps: np.ndarray, rows: int) -> SamplingTensors:
        """SamplingTensors of numpy arrays for the step's rows (padding rows greedy no-ops)."""
        n = len(slots)
        table = np.empty((_SEED + 1, rows), np.uint32)  # u32[8, B]
        np.take(self.table, slots, axis=1, out=table[:, :n])
        table[:, n:] = _NOOP_COLUMN[:, None]
        if self._flag_counts[SPECIAL] and self.flags[slots, SPECIAL].any():
            suppress, bias_ids, bias_values = self._special(slots, steps, rows)
        else:
            suppress, bias_ids, bias_values = self._no_special(rows)
        step = np.zeros(rows, np.int32)
        step[:n] = steps
        temperature, top_p, min_p, repetition, presence, frequency = table[:_TOP_K].view(
            np.float32
        )  # f32[B] each
        return SamplingTensors(
            temperature=temperature,
            top_p=top_p,
            top_k=table[_TOP_K].view(np.int32),
            min_p=min_p,
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
            seed=table[_SEED],
            step=step,
            suppress=suppress,
            bias_ids=bias_ids,
            bias_values=bias_values,
        )

    def _special(
        self, slots: np.ndarray, steps: np.ndarray, rows: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(suppress i32[B, E], bias_ids i32[B, M], bias_values f32[B, M]) of the step's rows."""
        suppress_rows, bias_rows = [], []
        for i, s in enumerate(slots):
            p = self._params[s]
            if not self.flags[s, SPECIAL]:
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
        return suppress, bias_ids, bias_values

    def _no_special(self, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """_special's arrays when no row suppresses or biases: the same every step of `rows` rows,
        so built once (read-only)."""
        arrays = self._empty_special.get(rows)
        if arrays is None:
            arrays = (
                np.full((rows, _MIN_WIDTH), -1, np.int32),
                np.full((rows, _MIN_WIDTH), -1, np.int32),
                np.zeros((rows, _MIN_WIDTH), np.float32),
            )
            for a in arrays:
                a.flags.writeable = False
            self._empty_special[rows] = arrays
        return arrays

    def any_flag(self, slots: np.ndarray) -> np.ndarray:
        """bool[5]: does any row want (sampling, top-k/p, penalties, special, logprobs)."""
        wants = np.zeros(5, np.bool_)
        if len(slots) == 0:
            return wants
        # A flag no live sequence has is off, one every live sequence has is on: only a flag
        # some live sequences have needs the step's rows.
        live = len(self._slot)
        for j, count in enumerate(self._flag_counts):
            if count:
                wants[j] = count == live or self.flags[slots, j].any()
        return wants

    def multi_step_ok(self) -> bool:
        """Whether a multi-step decode step may run: no live sequence has penalties (their token
        counts change every iteration), min_tokens or logit_bias (suppression changes with the
        step; kept on the single-step path), or prompt logprobs."""
        counts = self._flag_counts
        return not (counts[PENALTIES] or counts[SPECIAL] or self.num_prompt_logprobs)

    def params(self, slot: int) -> SamplingParams | None:
        return self._params[slot]
