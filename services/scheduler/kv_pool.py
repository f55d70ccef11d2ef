"""The KV slot allocators. Slot 0 is the executor's padding sink and is never handed out.

KVPool hands out single slots (page size 1). PagedKVPool hands out whole pages: page p holds slots
p*page_size .. p*page_size+page_size-1, and page 0 (which holds slot 0) is never handed out. A
request's slot list is laid out page by page: its token i sits at offset i % page_size of its
(i // page_size)-th page, so the list is contiguous within each page and only its last page can be
partly used. Both pools count free memory in slots and share one interface, so the scheduler core
does not branch on the page size.
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence


class SlotHolder(Protocol):
    """Anything that holds a page-by-page slot list (a request)."""

    slots: list[int]


class DoubleFreeError(RuntimeError):
    pass


class KVPool:
    """Single slots 1..size-1 (PagedKVPool also uses one as its allocator of page ids)."""

    page_size = 1

    def __init__(self, size: int, debug: bool = True, unit: str = "slot"):
        if size < 2:
            raise ValueError(f"a KV pool needs at least 2 {unit}s (got {size})")
        self.size = size
        self.debug = debug
        self.unit = unit
        self.num_pages = size
        self.capacity = size - 1  # slots that can be handed out
        # Popped from the end, so low slot ids go out first.
        self._free = list(range(size - 1, 0, -1))
        self._is_free = bytearray([0]) + bytearray([1]) * (size - 1)

    def available(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        if n == 0:
            return []
        slots = self._free[-n:][::-1]
        del self._free[-n:]
        if self.debug:
            for s in slots:
                self._is_free[s] = 0
        return slots

    def free(self, slots: Iterable[int]) -> None:
        slots = list(slots)
        if self.debug:
            for s in slots:
                if not 0 < s < self.size:
                    raise DoubleFreeError(f"{self.unit} {s} is outside 1..{self.size - 1}")
                if self._is_free[s]:
                    raise DoubleFreeError(f"{self.unit} {s} freed twice")
                self._is_free[s] = 1
        self._free.extend(reversed(slots))

    def reset(self) -> None:
        self.__init__(self.size, self.debug, self.unit)

    # ---- the page-aware interface the core uses (trivial with one-slot pages) ------------------

    def round_down(self, n: int) -> int:
        return n

    def round_up(self, n: int) -> int:
        """n slots rounded up to whole pages: what a request with n slotted tokens occupies."""
        return n

    def slots_needed(self, num_held: int, n: int) -> int:
        """Slots to take from the pool to append n tokens to a request holding num_held."""
        return n

    def extend(self, held: Sequence[int], n: int) -> list[int] | None:
        """Slots for n more tokens of a request whose slot list is held; None if out of memory."""
        return self.alloc(n)

    def decode_need(self, holders: Sequence[SlotHolder]) -> int:
        """Slots to take from the pool to append one token to each holder."""
        return len(holders)

    def alloc_decode(self, holders: Sequence[SlotHolder]) -> list[int] | None:
        """A slot for the next token of each holder; None if out of memory."""
        return self.alloc(len(holders))

    def free_slots(self) -> list[int]:
        return list(self._free)

    def occupied(self, own_slots: Sequence[int]) -> list[int]:
        """Every slot the pages of own_slots occupy (for leak checks); raises ValueError if
        own_slots is not laid out by pages."""
        return list(own_slots)


class PagedKVPool:
    """Allocates whole pages; free() takes slot lists that start on a page and run page by page."""

    def __init__(self, size: int, page_size: int, debug: bool = True):
        if page_size < 2:
            raise ValueError(f"use KVPool for page size {page_size}")
        if size // page_size < 2:
            raise ValueError(
                f"a KV pool of page size {page_size} needs at least {2 * page_size} slots "
                f"(got {size})"
            )
        self.size = size
        self.page_size = page_size
        self.debug = debug
        self.num_pages = size // page_size  # a partial page at the end is never used
        self.capacity = (self.num_pages - 1) * page_size
        self._pages = KVPool(self.num_pages, debug, unit="page")  # page ids 1..num_pages-1

    def available(self) -> int:
        return self._pages.available() * self.page_size

    def alloc_pages(self, n: int) -> list[int] | None:
        return self._pages.alloc(n)

    def free(self, slots: Iterable[int]) -> None:
        self._pages.free(self._pages_of(list(slots), check=self.debug))

    def reset(self) -> None:
        self._pages.reset()

    def round_down(self, n: int) -> int:
        return n - n % self.page_size

    def round_up(self, n: int) -> int:
        return -(-n // self.page_size) * self.page_size

    def slots_needed(self, num_held: int, n: int) -> int:
        return self.round_up(num_held + n) - self.round_up(num_held)

    def extend(self, held: Sequence[int], n: int) -> list[int] | None:
        ps = self.page_size
        room = min(n, -len(held) % ps)  # free tail of the request's last page
        pages = self.alloc_pages(-(-(n - room) // ps))
        if pages is None:
            return None
        slots = list(range(held[-1] + 1, held[-1] + 1 + room)) if room else []
        for page in pages:
            slots += range(page * ps, page * ps + ps)
        del slots[n:]
        return slots

    def decode_need(self, holders: Sequence[SlotHolder]) -> int:
        return self.page_size * self._pages_to_open(holders)

    def alloc_decode(self, holders: Sequence[SlotHolder]) -> list[int] | None:
        ps = self.page_size
        pages = self.alloc_pages(self._pages_to_open(holders))
        if pages is None:
            return None
        fresh = iter(pages)
        return [next(fresh) * ps if len(h.slots) % ps == 0 else h.slots[-1] + 1 for h in holders]

    def _pages_to_open(self, holders: Sequence[SlotHolder]) -> int:
        """How many holders have filled their last page."""
        return sum(1 for h in holders if len(h.slots) % self.page_size == 0)

    def free_slots(self) -> list[int]:
        ps = self.page_size
        return [s for p in self._pages.free_slots() for s in range(p * ps, p * ps + ps)]

    def occupied(self, own_slots: Sequence[int]) -> list[int]:
        ps = self.page_size
        pages = self._pages_of(own_slots, check=True)
        return [s for p in pages for s in range(p * ps, p * ps + ps)]

    def _pages_of(self, slots: Sequence[int], check: bool) -> list[int]:
        """The pages of a page-by-page slot list (the last page may be partial)."""
        ps = self.page_size
        pages = [s // ps for s in slots[::ps]]
        if check:
            for i, s in enumerate(slots):
                if s != pages[i // ps] * ps + i % ps:
                    raise ValueError(
                        f"slot list is not laid out by pages of {ps} at index {i}: "
                        f"{list(slots[: i + 1])}"
                    )
        return pages


def make_kv_pool(size: int, page_size: int = 1, debug: bool = True) -> KVPool | PagedKVPool:
    if page_size < 1:
        raise ValueError(f"page size must be at least 1 (got {page_size})")
    return KVPool(size, debug) if page_size == 1 else PagedKVPool(size, page_size, debug)
