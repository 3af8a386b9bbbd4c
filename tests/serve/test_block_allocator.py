"""The block allocator: page 0 is never handed out, allocation is all or nothing, reference counts keep a shared
page until its last owner frees it, the counts add up, and misuse raises naming the page."""

import pytest

from serve.block_allocator import BlockAllocator, NoFreePages


def test_allocation_skips_the_null_page_and_is_all_or_nothing():
    pool = BlockAllocator(5)
    pages = pool.allocate(3)
    assert 0 not in pages and len(set(pages)) == 3
    assert pool.num_free == 1 and pool.num_used == 3 and pool.num_usable == 4
    assert pool.can_allocate(1) and not pool.can_allocate(2)
    with pytest.raises(NoFreePages, match="asked for 2 pages but 1 of 4 are free"):
        pool.allocate(2)
    assert pool.num_free == 1  # nothing taken by the failed call
    assert issubclass(NoFreePages, RuntimeError)
    pool.free(pages)
    assert pool.num_free == 4 and sorted(pool.allocate(4)) == [1, 2, 3, 4]
    assert pool.allocate(0) == []


def test_every_page_is_handed_out_once_until_freed():
    pool = BlockAllocator(9)
    held = [pool.allocate(1)[0] for _ in range(8)]
    assert sorted(held) == list(range(1, 9)) and pool.num_free == 0
    pool.free(held[2:5])
    again = pool.allocate(3)
    assert sorted(again) == sorted(held[2:5])  # only freed pages come back
    assert all(pool.refcount(p) == 1 for p in held)


def test_shared_pages_live_until_the_last_owner_frees_them():
    pool = BlockAllocator(3)
    [page] = pool.allocate(1)
    pool.share([page])
    pool.share([page])
    assert pool.refcount(page) == 3
    pool.free([page])
    pool.free([page])
    assert pool.num_free == 1 and pool.refcount(page) == 1 and not pool.can_allocate(2)
    pool.free([page])
    assert pool.num_free == 2 and pool.refcount(page) == 0


def test_misuse_names_the_page_and_changes_nothing():
    pool = BlockAllocator(4)
    [page] = pool.allocate(1)
    for misuse, pages, pattern in [(pool.free, [0], "page 0 is the null page"),
                                   (pool.free, [3], "page 3 is not allocated"),
                                   (pool.free, [7], "page 7 is not allocated"),
                                   (pool.share, [3], "page 3 is not allocated"),
                                   (pool.free, [page, page], f"page {page} freed 2 times but it has 1 owner")]:
        with pytest.raises(ValueError, match=pattern):
            misuse(pages)
    assert pool.refcount(page) == 1 and pool.num_free == 2  # the bad calls changed nothing
    pool.free([page])
    with pytest.raises(ValueError, match=f"page {page} is not allocated"):
        pool.free([page])  # double free
    with pytest.raises(ValueError, match="num_pages >= 2.*got 1"):
        BlockAllocator(1)
    with pytest.raises(ValueError, match="page -1 is outside"):
        pool.refcount(-1)
