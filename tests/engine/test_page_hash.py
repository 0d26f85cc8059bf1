"""Prefix-cache page hashes are stable across processes and versions (a KV tier may store them):
fixed pages hash to the values the first implementation (numpy int64 bytes) gave."""

from __future__ import annotations

import numpy as np

from rtpjax.engine.block_manager import BlockManager, page_hash


def test_page_hashes_keep_their_values():
    assert page_hash(None, list(range(100, 116)), ()).hex() == "7ee248a650593c08baf08cf7cd80867d"
    parent, tokens, extra = bytes(range(16)), [0, 1, 2**31 - 1, 49151], ("salt", 7, b"x", None)
    want = "8cb974a1e5e14fb38eba66ccb52594f3"
    assert page_hash(parent, tokens, extra).hex() == want
    assert page_hash(parent, np.array(tokens, np.int32), extra).hex() == want


def test_hash_chain_matches_page_by_page_hashes():
    ids = list(range(1000, 1040))
    for extra in ((), ("salt", 3)):
        hashes: list[bytes] = []
        BlockManager(8, 16).extend_hashes(hashes, ids, extra, 2)
        first = page_hash(None, ids[:16], extra)
        assert hashes == [first, page_hash(first, ids[16:32], extra)]
