"""The KV slot allocator. Slot 0 is the executor's padding sink; slots 1..size-1 are handed out."""
from __future__ import annotations

from typing import Iterable


class DoubleFreeError(RuntimeError):
    pass


class KVPool:
    def __init__(self, size: int, debug: bool = True):
        if size < 2:
            raise ValueError(f"a KV pool needs at least 2 slots (got {size})")
        self.size = size
        self.debug = debug
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
                    raise DoubleFreeError(f"slot {s} is outside 1..{self.size - 1}")
                if self._is_free[s]:
                    raise DoubleFreeError(f"slot {s} freed twice")
                self._is_free[s] = 1
        self._free.extend(reversed(slots))

    def reset(self) -> None:
        self.__init__(self.size, self.debug)
