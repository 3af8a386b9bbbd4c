"""Which KV page belongs to whom: a free list of page ids with reference counts, so pages can be shared between
sequences, plus the prefix cache that finds full pages by their contents. Host-side and pure Python; the device
arrays live in serve/kv_cache.py.

Page 0 is the null page: never handed out, it absorbs the writes of padded tokens and backs unused block-table
entries. The free list is first in, first out, so a freed page is reused as late as possible and allocation order
is deterministic.

Prefix caching (vLLM's automatic prefix caching): a full page whose K/V has been computed can be `register`ed under
a key that names its tokens and everything before them (`block_keys`). A freed page keeps its key while it waits
in the free list, so `lookup` can hand it to a later sequence with the same prefix. When `allocate` takes it for
new contents, the key is dropped first. The free list's order makes that eviction least recently freed first.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Sequence


class NoFreePages(RuntimeError):
    """Not enough free pages for an allocation (nothing was allocated)."""


class BlockAllocator:
    """Pages 1..num_pages-1 of a device page pool, handed out first in, first out, with reference counts."""

    NULL_PAGE = 0

    def __init__(self, num_pages: int) -> None:
        if not isinstance(num_pages, int) or isinstance(num_pages, bool) or num_pages < 2:
            raise ValueError(f"the page pool needs num_pages >= 2 (page 0 is reserved), got {num_pages!r}")
        self.num_pages = num_pages
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_pages))  # oldest first
        self._refs = [0] * num_pages
        self._page_of: dict[Hashable, int] = {}  # prefix-cache key -> page holding that block's K/V
        self._key_of: dict[int, Hashable] = {}

    @property
    def num_usable(self) -> int:
        """Pages that can ever be allocated: all but the null page."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` pages, each with reference count 1. All or nothing: raises NoFreePages and takes none if fewer are
        free."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"cannot allocate {n!r} pages")
        if n > len(self._free):
            raise NoFreePages(f"asked for {n} pages but {len(self._free)} of {self.num_usable} are free")
        pages = [self._free.popitem(last=False)[0] for _ in range(n)]
        for page in pages:
            self._refs[page] = 1
            if page in self._key_of:  # new contents: the cached block is gone
                del self._page_of[self._key_of.pop(page)]
        return pages

    def _check_allocated(self, page: int) -> None:
        if page == self.NULL_PAGE:
            raise ValueError("page 0 is the null page: it is never allocated, shared or freed")
        if not isinstance(page, int) or not 0 < page < self.num_pages or self._refs[page] == 0:
            raise ValueError(f"page {page!r} is not allocated")

    def share(self, pages: Iterable[int]) -> None:
        """One more owner for each of `pages` (all must be allocated; checked before anything changes)."""
        pages = list(pages)
        for page in pages:
            self._check_allocated(page)
        for page in pages:
            self._refs[page] += 1

    def free(self, pages: Iterable[int]) -> None:
        """One owner fewer for each of `pages`; a page with no owner left returns to the free list. Checked before
        anything changes: freeing the null page, a free page, or a page more times than it has owners raises
        ValueError naming the page and frees nothing."""
        pages = list(pages)
        for page, times in Counter(pages).items():
            self._check_allocated(page)
            if times > self._refs[page]:
                raise ValueError(f"page {page} freed {times} times but it has {self._refs[page]} owner(s)")
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free[page] = None

    def refcount(self, page: int) -> int:
        """How many owners `page` has (0: free; the null page always reads 0)."""
        if not isinstance(page, int) or not 0 <= page < self.num_pages:
            raise ValueError(f"page {page!r} is outside the pool [0, {self.num_pages})")
        return self._refs[page]

    # --- the prefix cache ------------------------------------------------------------------------------------

    @property
    def num_cached(self) -> int:
        """Pages registered in the prefix cache (in use or free)."""
        return len(self._key_of)

    def reset_cache(self) -> None:
        """Forget every cached block (their pages stay where they are): later lookups start from nothing."""
        self._page_of.clear()
        self._key_of.clear()

    def register(self, page: int, key: Hashable) -> None:
        """`page` (allocated) now holds the K/V of the full block named `key`. A key already cached elsewhere
        keeps its page (two sequences computed the same block at once); a page keeps its first key."""
        self._check_allocated(page)
        if key not in self._page_of and page not in self._key_of:
            self._page_of[key], self._key_of[page] = page, key

    def lookup(self, keys: Sequence[Hashable]) -> list[int]:
        """The pages of the longest run of `keys` that are cached, from the first; each gets one more owner (a
        free one leaves the free list). The caller frees them like allocated pages."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        for page in pages:
            if self._refs[page] == 0:
                del self._free[page]
            self._refs[page] += 1
        return pages


def block_keys(token_ids: Sequence[int], page_size: int, parent: Hashable = None) -> list[Hashable]:
    """One prefix-cache key per full block of `token_ids`: (the previous block's key's hash, this block's tokens).
    The tokens are compared exactly on lookup; a whole prefix is named through the chain of hashes."""
    keys: list[Hashable] = []
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        parent = (hash(parent), tuple(token_ids[start:start + page_size]))
        keys.append(parent)
    return keys
