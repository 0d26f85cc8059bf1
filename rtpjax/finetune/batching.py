"""Host-side batches: rows of several tasks laid out sorted by adapter slot and padded to a
[B, S] bucket (powers of two), the only shapes the compiled step sees."""

from __future__ import annotations

import numpy as np

from rtpjax.finetune import step as st


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def build_batch(parts: list[tuple[int, list[dict], float]], min_len: int = 16) -> st.Batch:
    """Rows of (slot, rows, target tokens of that slot's optimizer step), sorted by slot, padded
    to [B, S] buckets (powers of two) → a host Batch."""
    parts = sorted(parts, key=lambda p: p[0])
    n = sum(len(rows) for _, rows, _ in parts)
    B = _pow2(n)
    S = _pow2(max((len(r["inputs"]) for _, rows, _ in parts for r in rows), default=1), min_len)
    tokens = np.zeros((B, S), np.int32)
    targets = np.zeros((B, S), np.int32)
    weights = np.zeros((B, S), np.float32)
    positions = np.zeros((B, S), np.int32)
    segments = np.zeros((B, S), np.int32)
    row_slot = np.full((B,), -1, np.int32)
    i = 0
    for slot, rows, norm in parts:
        for r in rows:
            k = len(r["inputs"])
            tokens[i, :k], targets[i, :k] = r["inputs"], r["targets"]
            weights[i, :k] = r["mask"] / max(norm, 1.0)
            positions[i, :k], segments[i, :k] = r["positions"], r["segments"]
            row_slot[i] = slot
            i += 1
    return st.Batch(tokens, targets, weights, positions, segments, row_slot)
