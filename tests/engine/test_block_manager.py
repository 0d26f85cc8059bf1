"""BlockManager: allocation, ref counts, the null page, the prefix cache and its LRU eviction."""

import pytest

from rtpjax.engine.block_manager import BlockManager, page_hash


def _chain(bm: BlockManager, tokens: list[int], extra: tuple = ()) -> list[bytes]:
    hashes: list[bytes] = []
    bm.extend_hashes(hashes, tokens, extra, len(tokens) // bm.page_size)
    return hashes


def _cache_sequence(bm: BlockManager, tokens: list[int], extra: tuple = ()) -> list[int]:
    """Allocate pages for tokens and register every full one, as the scheduler would."""
    pages = bm.allocate(-(-len(tokens) // bm.page_size))
    for page, h in zip(pages, _chain(bm, tokens, extra), strict=False):
        bm.register(page, h)
    return pages


def test_null_page_never_handed_out_and_pool_exhausts():
    bm = BlockManager(num_pages=6, page_size=4)
    pages = bm.allocate(5)
    assert sorted(pages) == [1, 2, 3, 4, 5]
    assert bm.num_free_pages == 0 and not bm.can_allocate(1) and bm.usage() == 1.0
    with pytest.raises(ValueError, match="allocate"):
        bm.allocate(1)
    bm.free(pages)
    assert bm.num_free_pages == 5 and bm.usage() == 0.0
    bm.check_invariants()


def test_ref_counts_and_double_free():
    bm = BlockManager(num_pages=4, page_size=2)
    (page,) = bm.allocate(1)
    bm.acquire([page])
    assert bm.ref_count(page) == 2
    bm.free([page])
    assert bm.ref_count(page) == 1 and bm.num_used_pages == 1
    bm.free([page])
    assert bm.ref_count(page) == 0 and bm.num_free_pages == 3
    with pytest.raises(ValueError, match="double free"):
        bm.free([page])
    with pytest.raises(ValueError, match="double free"):
        bm.free([0])
    with pytest.raises(ValueError, match="is free"):
        bm.acquire([page])


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_pages"):
        BlockManager(num_pages=1, page_size=4)
    with pytest.raises(ValueError, match="page_size"):
        BlockManager(num_pages=8, page_size=0)


def test_hash_is_stable_across_processes():
    # Fixed digests: a switch to Python's salted hash() or another encoding changes them.
    h1 = page_hash(None, [1, 2, 3, 4], ())
    assert h1.hex() == "1a8024da08401e0fedffbfb6ff9ea3a8"
    h2 = page_hash(h1, [5, 6, 7, 8], ("lora-a", 7, b"x", None))
    assert h2.hex() == "72688d61f89e5429e0bbbe8246b91a6b"


def test_hash_covers_parent_tokens_and_extra_keys():
    base = page_hash(None, [1, 2], ("a",))
    assert page_hash(None, [1, 2], ("b",)) != base
    assert page_hash(None, [1, 2], ()) != base
    assert page_hash(None, [2, 1], ("a",)) != base
    assert page_hash(b"\x01" * 16, [1, 2], ("a",)) != base
    # The encoding is type-tagged and length-prefixed: these must not collide.
    assert page_hash(None, [1], ("ab", "c")) != page_hash(None, [1], ("a", "bc"))
    assert page_hash(None, [1], (1,)) != page_hash(None, [1], ("1",))
    with pytest.raises(ValueError, match="extra_hash_keys"):
        page_hash(None, [1], (object(),))


def test_match_prefix_longest_chain_and_partial_pages():
    bm = BlockManager(num_pages=16, page_size=4)
    tokens = list(range(10))  # pages [0..3], [4..7] full; [8, 9] partial
    pages = _cache_sequence(bm, tokens)
    assert bm.num_cached_pages == 2  # the partial page is never registered
    assert bm.match_prefix([*range(8), 50, 51, 52]) == pages[:2]
    assert bm.match_prefix([0, 1, 2, 3, 9, 9, 9, 9, 9]) == pages[:1]
    assert bm.match_prefix([9, 1, 2, 3, 4, 5, 6, 7, 8]) == []
    # A prompt shorter than a page or only matching a partial page finds nothing.
    assert bm.match_prefix([0, 1, 2]) == []
    assert bm.match_prefix(list(range(11))) == pages[:2]


def test_full_match_drops_last_page():
    bm = BlockManager(num_pages=16, page_size=4)
    pages = _cache_sequence(bm, list(range(12)))
    assert bm.match_prefix(list(range(12))) == pages[:2]  # logits need one computed token
    assert bm.match_prefix(list(range(13))) == pages[:3]
    assert bm.match_prefix(list(range(4))) == []


def test_extra_keys_miss():
    bm = BlockManager(num_pages=16, page_size=4)
    tokens = list(range(9))
    pages = _cache_sequence(bm, tokens, extra=("adapter-1",))
    assert bm.match_prefix(tokens, ("adapter-1",)) == pages[:2]
    assert bm.match_prefix(tokens, ("adapter-2",)) == []
    assert bm.match_prefix(tokens, ()) == []
    assert bm.match_prefix(tokens, ("adapter-1", "salt")) == []


def test_lru_eviction_order_and_free_pages_first():
    bm = BlockManager(num_pages=8, page_size=2)
    a = _cache_sequence(bm, [1, 2, 3, 4])  # 2 cached pages
    b = _cache_sequence(bm, [5, 6, 7, 8])  # 2 cached pages
    bm.free(a)  # released tail first: a[1] is older than a[0] in the LRU
    bm.free(b)
    assert bm.num_evictable_pages == 4 and bm.num_free_pages == 7 and bm.num_used_pages == 0
    fresh = bm.allocate(3)  # 3 truly free pages go first; nothing evicted
    assert set(fresh).isdisjoint(a + b) and bm.num_cached_pages == 4
    assert bm.allocate(1) == [a[1]]
    assert bm.match_prefix([1, 2, 3, 4, 0]) == [a[0]]  # a[1]'s hash is gone
    assert bm.allocate(2) == [a[0], b[1]]
    assert bm.match_prefix([1, 2, 0]) == [] and bm.match_prefix([5, 6, 7, 8, 0]) == [b[0]]
    bm.check_invariants()


def test_acquire_revives_evictable_page_and_refreshes_lru():
    bm = BlockManager(num_pages=6, page_size=2)
    a = _cache_sequence(bm, [1, 2])
    b = _cache_sequence(bm, [3, 4])
    bm.free(a)
    bm.free(b)
    before = bm.num_free_pages
    assert bm.num_evictable_among(a) == 1
    bm.acquire(a)  # a prefix-cache hit on a released page
    assert bm.ref_count(a[0]) == 1 and bm.num_free_pages == before - 1
    assert bm.num_evictable_among(a) == 0
    bm.free(a)  # now a is the most recently released
    bm.allocate(3)  # the 3 truly free pages
    assert bm.allocate(1) == b  # b is older than a now
    bm.check_invariants()


def test_duplicate_hash_keeps_first_page():
    bm = BlockManager(num_pages=8, page_size=2)
    first = _cache_sequence(bm, [7, 7])
    second = bm.allocate(1)
    assert not bm.register(second[0], _chain(bm, [7, 7])[0])
    assert bm.is_cached(first[0]) and not bm.is_cached(second[0])
    assert not bm.register(first[0], page_hash(None, [1, 1]))  # a page keeps its one hash
    bm.free(second)
    assert bm.num_evictable_pages == 0  # uncached: back to the free list
    bm.free(first)
    assert bm.num_evictable_pages == 1
    assert bm.match_prefix([7, 7, 1]) == first
    with pytest.raises(ValueError, match="not in use"):
        bm.register(second[0], page_hash(None, [9, 9]))


def test_prefix_caching_disabled():
    bm = BlockManager(num_pages=8, page_size=2, enable_prefix_caching=False)
    pages = bm.allocate(2)
    assert not bm.register(pages[0], page_hash(None, [1, 2]))
    bm.free(pages)
    assert bm.num_evictable_pages == 0 and bm.match_prefix([1, 2, 3]) == []


def test_hit_counters():
    bm = BlockManager(num_pages=8, page_size=2)
    assert bm.prefix_hit_rate == 0.0
    bm.record_prefix_lookup(10, 4)
    bm.record_prefix_lookup(6, 0)
    assert (bm.prefix_queried_tokens, bm.prefix_hit_tokens) == (16, 4)
    assert bm.prefix_hit_rate == 0.25


def test_check_invariants_detects_corruption():
    bm = BlockManager(num_pages=6, page_size=2)
    bm.check_invariants()
    page = bm.allocate(1)[0]
    bm._free.append(page)  # a page both in use and free
    with pytest.raises(RuntimeError, match="free / evictable / in use"):
        bm.check_invariants()
