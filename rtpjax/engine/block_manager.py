"""BlockManager: the paged-KV page allocator, with reference counts and a prefix cache.

Every page is in exactly one of three states:
- free: ref count 0, no cache entry; handed out first.
- in use: ref count > 0 (the number of live sequences whose page table holds it); may be cached.
- evictable: ref count 0 but cached (its hash maps to it); still matchable, kept in LRU order and
  reclaimed, oldest first, when no free page is left.
Page 0 is reserved as the null page the runner points padding at; it is never handed out.

The prefix cache keys FULL pages by a hash chain: hash(page i) = H(hash(page i-1), the page's
tokens, extra keys such as the adapter id, multimodal content hashes or a cache salt). H is blake2b
over a compact encoding, so hashes are stable across processes (a future KV tier can store them).
"""

from __future__ import annotations

import collections
import hashlib
import struct
from collections.abc import Iterable, Sequence

NULL_PAGE = 0
_HASH_BYTES = 16


def _encode_key(key: object, out: bytearray) -> None:
    """Append a type-tagged, length-prefixed encoding of one extra hash key."""
    if key is None:
        out += b"N"
    elif isinstance(key, bool):
        out += b"T" if key else b"F"
    elif isinstance(key, int):
        raw = str(key).encode()
        out += b"i" + struct.pack("<I", len(raw)) + raw
    elif isinstance(key, float):
        out += b"f" + struct.pack("<d", key)
    elif isinstance(key, str):
        raw = key.encode()
        out += b"s" + struct.pack("<I", len(raw)) + raw
    elif isinstance(key, bytes | bytearray):
        out += b"b" + struct.pack("<I", len(key)) + bytes(key)
    elif isinstance(key, tuple | list):
        out += b"(" + struct.pack("<I", len(key))
        for item in key:
            _encode_key(item, out)
    else:
        raise ValueError(
            f"extra_hash_keys item {key!r} has type {type(key).__name__}: allowed are None, bool, "
            "int, float, str, bytes and tuples of them"
        )


def encode_extra_keys(extra_keys: tuple) -> bytes:
    out = bytearray()
    _encode_key(tuple(extra_keys), out)
    return bytes(out)


_NO_EXTRA_KEYS = encode_extra_keys(())


def page_hash(parent: bytes | None, tokens: Sequence[int], extra_keys: tuple | bytes = ()) -> bytes:
    """Stable hash of one full page: (parent page's hash, its tokens, the extra keys)."""
    h = hashlib.blake2b(digest_size=_HASH_BYTES)
    h.update(parent if parent is not None else b"\x00" * _HASH_BYTES)
    # The tokens as little-endian int64 (struct: a third of numpy's cost for a page's few ids).
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    h.update(extra_keys if isinstance(extra_keys, bytes) else encode_extra_keys(extra_keys))
    return h.digest()


class BlockManager:
    """Allocates KV pages 1..num_pages-1, counts references and keeps the prefix cache."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        if not (isinstance(num_pages, int) and num_pages >= 2):
            raise ValueError(f"num_pages={num_pages!r} must be an int >= 2 (page 0 is reserved)")
        if not (isinstance(page_size, int) and page_size >= 1):
            raise ValueError(f"page_size={page_size!r} must be an int >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_pages
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        # Cached pages with ref 0, least recently released first.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._hash_to_page: dict[bytes, int] = {}
        self._page_to_hash: dict[int, bytes] = {}
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    # -- capacity ---------------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        """Pages allocate() can hand out now: truly free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_pages(self) -> int:
        return len(self._evictable)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - 1 - self.num_free_pages

    @property
    def num_cached_pages(self) -> int:
        return len(self._hash_to_page)

    def usage(self) -> float:
        """Fraction of the allocatable pages in use (ref count > 0)."""
        return self.num_used_pages / (self.num_pages - 1)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free_pages

    def ref_count(self, page_id: int) -> int:
        return self._ref[page_id]

    def is_cached(self, page_id: int) -> bool:
        return page_id in self._page_to_hash

    def num_evictable_among(self, page_ids: Iterable[int]) -> int:
        """How many of these pages acquire() would take out of the evictable pool."""
        return sum(1 for p in page_ids if self._ref[p] == 0)

    # -- allocation -------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """n fresh pages with ref count 1: truly free ones first, then the LRU evictable ones."""
        if n > self.num_free_pages:
            raise ValueError(
                f"allocate(n={n}): only {self.num_free_pages} pages are free or evictable; "
                "check can_allocate first"
            )
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._hash_to_page[self._page_to_hash.pop(page)]
            self._ref[page] = 1
            pages.append(page)
        return pages

    def acquire(self, page_ids: Iterable[int]) -> None:
        """ref + 1 on pages already in use or cached (a prefix-cache hit revives evictable ones)."""
        for page in page_ids:
            if self._ref[page] == 0:
                if page not in self._evictable:
                    raise ValueError(f"acquire: page {page} is free, not cached; allocate it")
                del self._evictable[page]
            self._ref[page] += 1

    def free(self, page_ids: Sequence[int]) -> None:
        """ref - 1 on each page. A page reaching 0 becomes evictable if cached, else free.

        Pages are released last first, so a sequence's tail pages (the least shareable) are the
        first evicted and its prefix stays matchable longest.
        """
        for page in reversed(page_ids):
            if page == NULL_PAGE or self._ref[page] <= 0:
                raise ValueError(f"free: page {page} has ref count {self._ref[page]}: double free")
            self._ref[page] -= 1
            if self._ref[page] == 0:
                if page in self._page_to_hash:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    # -- prefix cache -----------------------------------------------------------------------------

    def extend_hashes(
        self, hashes: list[bytes], token_ids: Sequence[int], extra_keys: tuple, num_pages: int
    ) -> None:
        """Extend a sequence's hash chain in place to cover its first num_pages full pages."""
        ps = self.page_size
        if len(hashes) >= num_pages:
            return
        # Every running sequence crosses a page boundary now and then: most have no extra keys.
        extra = encode_extra_keys(extra_keys) if extra_keys else _NO_EXTRA_KEYS
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_pages):
            parent = page_hash(parent, token_ids[i * ps : (i + 1) * ps], extra)
            hashes.append(parent)

    def match_hashes(self, hashes: Sequence[bytes], num_tokens: int) -> list[int]:
        """Cached pages for the longest prefix of `hashes` found, for a sequence of num_tokens.

        When every token would be covered, the last page is dropped: at least one token must be
        computed to produce logits. Pure lookup: no ref counts, LRU order or counters change.
        """
        if not self.enable_prefix_caching:
            return []
        pages = []
        for h in hashes:
            page = self._hash_to_page.get(h)
            if page is None:
                break
            pages.append(page)
        if pages and len(pages) * self.page_size >= num_tokens:
            pages.pop()
        return pages

    def match_prefix(self, token_ids: Sequence[int], extra_keys: tuple = ()) -> list[int]:
        """Cached pages holding the longest prefix of token_ids (see match_hashes)."""
        if not self.enable_prefix_caching:
            return []
        hashes: list[bytes] = []
        self.extend_hashes(hashes, token_ids, extra_keys, len(token_ids) // self.page_size)
        return self.match_hashes(hashes, len(token_ids))

    def register(self, page_id: int, page_hash_: bytes) -> bool:
        """Offer a full, computed, in-use page to the cache under its hash.

        The first page registered under a hash keeps it; a later page with the same hash stays
        uncached (returns False), as does an already-cached page.
        """
        if not self.enable_prefix_caching:
            return False
        if self._ref[page_id] <= 0:
            raise ValueError(f"register: page {page_id} is not in use (ref count 0)")
        if page_hash_ in self._hash_to_page or page_id in self._page_to_hash:
            return False
        self._hash_to_page[page_hash_] = page_id
        self._page_to_hash[page_id] = page_hash_
        return True

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queried_tokens += num_queried_tokens
        self.prefix_hit_tokens += num_hit_tokens

    @property
    def prefix_hit_rate(self) -> float:
        """Cached tokens found / tokens looked up, over admissions so far (0.0 before any)."""
        if self.prefix_queried_tokens == 0:
            return 0.0
        return self.prefix_hit_tokens / self.prefix_queried_tokens

    # -- checks -----------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise RuntimeError if the page pools or the cache maps are inconsistent."""
        free, evictable = set(self._free), set(self._evictable)
        used = {p for p in range(1, self.num_pages) if self._ref[p] > 0}
        problems = []
        if len(free) != len(self._free):
            problems.append("a page is on the free list twice")
        if free & evictable or free & used or evictable & used:
            problems.append("a page is in two of free / evictable / in use")
        if len(free) + len(evictable) + len(used) != self.num_pages - 1:
            problems.append("free + evictable + in use != num_pages - 1")
        if self._ref[NULL_PAGE] != 0 or NULL_PAGE in free | evictable:
            problems.append("the null page was handed out")
        if any(r < 0 for r in self._ref):
            problems.append("a negative ref count")
        if free & set(self._page_to_hash):
            problems.append("a free page is cached")
        if not evictable <= set(self._page_to_hash):
            problems.append("an evictable page is not cached")
        if len(self._hash_to_page) != len(self._page_to_hash) or any(
            self._hash_to_page.get(h) != p for p, h in self._page_to_hash.items()
        ):
            problems.append("the hash maps disagree")
        if problems:
            raise RuntimeError("BlockManager invariants broken: " + "; ".join(problems))
