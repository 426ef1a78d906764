"""Prefix cache: full KV pages found again by the tokens they hold.

A full page is named by a hash chained through every page before it, so a hit on page i
means the whole prefix up to page i matches, and a lookup walks the chain until the first
miss. Pages nobody references any more keep their content and wait in an LRU list; the
allocator takes them back (oldest first) only when it has no free page left.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

ROOT_HASH = 0x5EED


def hash_pages(token_ids: Sequence[int], page_size: int, parent: int = ROOT_HASH, start: int = 0) -> list[int]:
    """Chained hashes of the full pages of token_ids from page `start` on; `parent` is page start-1's hash."""
    hashes = []
    for first in range(start * page_size, len(token_ids) - page_size + 1, page_size):
        # Python hashes int tuples deterministically (no per-process salt).
        parent = hash((parent, tuple(token_ids[first : first + page_size])))
        hashes.append(parent)
    return hashes


class PrefixCache:
    def __init__(self) -> None:
        self._page_of: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced cached pages, oldest first

    def __len__(self) -> int:
        return len(self._page_of)

    @property
    def num_evictable(self) -> int:
        return len(self._lru)

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Pages of the longest cached prefix of a hash chain."""
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def insert(self, page_hash: int, page: int) -> None:
        """Remember that `page` holds the prefix named `page_hash` (first writer wins)."""
        if page_hash not in self._page_of and page not in self._hash_of:
            self._page_of[page_hash] = page
            self._hash_of[page] = page_hash

    def holds(self, page: int) -> bool:
        return page in self._hash_of

    # -- the allocator's side: parking unreferenced pages --------------------------------
    def park(self, page: int) -> None:
        self._lru[page] = None

    def unpark(self, page: int) -> None:
        self._lru.pop(page, None)

    def evict_oldest(self) -> int:
        """Forget the least recently released cached page and return it for reuse."""
        page, _ = self._lru.popitem(last=False)
        del self._page_of[self._hash_of.pop(page)]
        return page

    def clear(self) -> list[int]:
        """Forget every entry (e.g. after a weight update); returns the parked pages, now free."""
        parked = list(self._lru)
        self._page_of.clear()
        self._hash_of.clear()
        self._lru.clear()
        return parked
