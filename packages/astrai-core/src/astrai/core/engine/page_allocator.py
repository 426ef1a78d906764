"""Reference-counted allocation of KV pages, O(1) per page.

Free pages sit on a stack. A page whose last reference goes away returns to the stack,
unless the prefix cache still names it: then it is parked there (content kept, reusable by
a later request with the same prefix) and reclaimed only when the stack is empty.
"""

from __future__ import annotations

from .prefix_cache import PrefixCache


class OutOfPages(RuntimeError):
    """No free page and nothing left to evict; the scheduler preempts a request and retries."""


class PageAllocator:
    def __init__(self, num_pages: int, prefix_cache: PrefixCache | None = None):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.refcount = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache()

    @property
    def num_free(self) -> int:
        """Pages that can be handed out now: truly free plus evictable cached ones."""
        return len(self._free) + self.prefix_cache.num_evictable

    @property
    def num_used(self) -> int:
        """Pages referenced by at least one sequence."""
        return self.num_pages - self.num_free

    def allocate(self) -> int:
        if self._free:
            page = self._free.pop()
        elif self.prefix_cache.num_evictable:
            page = self.prefix_cache.evict_oldest()
        else:
            raise OutOfPages(f"all {self.num_pages} KV pages are in use")
        self.refcount[page] = 1
        return page

    def retain(self, page: int) -> None:
        """One more reference (a prefix-cache hit or a forked sample sharing the page)."""
        if self.refcount[page] == 0:
            self.prefix_cache.unpark(page)
        self.refcount[page] += 1

    def release(self, page: int) -> None:
        count = self.refcount[page] - 1
        if count < 0:
            raise RuntimeError(f"KV page {page} released more often than it was taken")
        self.refcount[page] = count
        if count == 0:
            if self.prefix_cache.holds(page):
                self.prefix_cache.park(page)
            else:
                self._free.append(page)

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix; parked pages become free, referenced ones stop being shareable."""
        self._free.extend(self.prefix_cache.clear())
