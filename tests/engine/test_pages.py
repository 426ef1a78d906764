"""Page allocator and prefix cache: reference counts, LRU reuse, chained hashes."""

import pytest

from astrai.core.engine.page_allocator import OutOfPages, PageAllocator
from astrai.core.engine.prefix_cache import PrefixCache, hash_pages


def test_allocate_release_and_refcounts():
    alloc = PageAllocator(3)
    pages = [alloc.allocate() for _ in range(3)]
    assert sorted(pages) == [0, 1, 2] and alloc.num_free == 0 and alloc.num_used == 3
    with pytest.raises(OutOfPages):
        alloc.allocate()
    alloc.retain(pages[0])
    alloc.release(pages[0])
    assert alloc.num_free == 0  # still referenced once
    alloc.release(pages[0])
    assert alloc.num_free == 1
    assert alloc.allocate() == pages[0]
    alloc.release(pages[1])
    with pytest.raises(RuntimeError, match="released more often"):
        alloc.release(pages[1])


def test_hashes_are_chained_through_earlier_pages():
    a = hash_pages([1, 2, 3, 4, 5, 6, 7], page_size=2)
    assert len(a) == 3  # only full pages
    b = hash_pages([9, 9, 3, 4, 5, 6], page_size=2)
    # Same tokens in page 1, different history: different hash.
    assert a[1] != b[1]
    # Hashing can resume from any page given the previous hash.
    assert hash_pages([1, 2, 3, 4, 5, 6, 7], 2, parent=a[0], start=1) == a[1:]


def test_cached_pages_are_reused_then_evicted_oldest_first():
    cache = PrefixCache()
    alloc = PageAllocator(4, cache)
    tokens = list(range(8))
    hashes = hash_pages(tokens, 2)
    pages = [alloc.allocate() for _ in hashes]
    for h, p in zip(hashes, pages):
        cache.insert(h, p)
    assert cache.lookup(hashes) == pages
    assert cache.lookup(hash_pages([0, 1, 2, 3, 99, 99], 2)) == pages[:2]  # stops at the first miss
    for p in reversed(pages):  # released tail first, as the scheduler does
        alloc.release(p)
    assert alloc.num_used == 0 and alloc.num_free == 4 and cache.num_evictable == 4
    # A hit takes a parked page back without it ever being free.
    alloc.retain(pages[0])
    assert alloc.num_used == 1 and cache.num_evictable == 3
    # New allocations evict the least recently parked page: the tail of the prefix.
    fresh = alloc.allocate()
    assert fresh == pages[3] and not cache.holds(fresh)
    assert cache.lookup(hashes) == pages[:3]
    alloc.release(pages[0])
    alloc.release(fresh)
    alloc.clear_prefix_cache()
    assert len(cache) == 0 and alloc.num_free == 4 and cache.lookup(hashes) == []
