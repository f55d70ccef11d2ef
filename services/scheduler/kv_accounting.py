"""The scheduler core's KV bookkeeping: the slot pool, the prefix cache, and the slots requests hold.

Pages (page_size > 1): the pool hands out whole pages and a request's slots run page by page (its
token i at offset i % page_size of its (i // page_size)-th page). The prefix cache matches and
stores whole pages only, so the partial last page of a finished or retracted request is freed,
not cached. The pool's and the cache's sizes are counted in slots.

Every slot is at all times exactly one of: free in the pool, evictable in the cache, locked in the
cache (the prefix path of a request), or owned by a request (its slots past that prefix).
"""

from __future__ import annotations

from radixserve.scheduler.kv_pool import make_kv_pool
from radixserve.scheduler.radix_cache import make_radix_cache
from radixserve.scheduler.request import Request


class KVAccounting:
    def __init__(self, pool_size: int, page_size: int, disable_radix_cache: bool, debug: bool):
        self.pool = make_kv_pool(pool_size, page_size, debug=debug)
        self.cache = make_radix_cache(page_size, disable=disable_radix_cache)
        # Aborted requests whose KV waits for the update of their last in-flight step.
        self.releasing: list[Request] = []

    def reclaimable(self) -> int:
        return self.pool.available() + self.cache.evictable_size()

    def decode_fits(self, batch: list[Request]) -> bool:
        """Whether memory can hold one more token of each request in batch."""
        return self.pool.decode_need(batch) <= self.reclaimable()

    def alloc(self, held: list[int], n: int, keep: int = 0) -> list[int] | None:
        """Slots for n more tokens of a request holding `held`, evicting cache entries as needed
        but leaving `keep` slots reclaimable; None if memory cannot."""
        need = self.pool.slots_needed(len(held), n)
        available = self.pool.available()
        if need + keep > available + self.cache.evictable_size():
            return None
        if need > available:
            self.cache.evict(need - available, self.pool.free)
        return self.pool.extend(held, n)

    def alloc_decode(self, batch: list[Request]) -> list[int] | None:
        """A slot for the next token of each request in batch, evicting as needed."""
        short = self.pool.decode_need(batch) - self.pool.available()
        if short > 0:
            self.cache.evict(short, self.pool.free)
        return self.pool.alloc_decode(batch)

    def alloc_draft(self, held: list[int], n: int) -> list[int] | None:
        """Slots for n draft tokens after held, from free memory only (drafts are optional: they do
        not evict the cache); None if it cannot."""
        if self.pool.slots_needed(len(held), n) > self.pool.available():
            return None
        return self.pool.extend(held, n)

    def keep_slots(self, req: Request, keep: int) -> None:
        """Shorten req's slots to its first keep (its rejected draft slots go back to the pool; with
        pages, only whole pages past them: the rest of its last page stays its own)."""
        cut = max(self.pool.round_up(keep), req.prefix_len)
        if cut < len(req.slots):
            self.pool.free(req.slots[cut:])
        del req.slots[keep:]

    def release(self, req: Request, cache_len: int | None = None) -> None:
        """Hand the KV of the first cache_len tokens (default: all known tokens with a slot), in
        whole pages, to the cache, free the rest of the request's slots, and unlock its prefix."""
        if req.last_node is None:
            return
        if cache_len is None:
            cache_len = min(len(req.slots), req.seq_len)
        cache_len = self.pool.round_down(cache_len)
        already_cached = self.cache.insert(
            req.cache_seq[:cache_len], req.slots[:cache_len], req.lora_name
        )
        self.pool.free(req.slots[req.prefix_len : already_cached] + req.slots[cache_len:])
        self.cache.dec_lock_ref(req.last_node)
        req.slots = []
        req.prefix_len = 0
        req.last_node = None

    def release_when_settled(self, req: Request) -> None:
        """Release an aborted request's KV now, or once no step in flight writes it any more."""
        if req.busy:
            self.releasing.append(req)
        else:
            self.release(req)

    def release_settled(self) -> None:
        settled = [r for r in self.releasing if not r.busy]
        for req in settled:
            self.release(req)
        if settled:
            self.releasing = [r for r in self.releasing if r.busy]

    def flush_cache(self) -> int:
        """Free every unlocked cache entry; return the number of slots freed."""
        return self.cache.evict(self.cache.evictable_size(), self.pool.free)

    def reset(self) -> None:
        """Forget every slot's holder: the pool is all free, the cache empty."""
        self.pool.reset()
        self.cache.reset()
        self.releasing = []

    def own_slots(self, req: Request) -> int:
        """Slots req holds that the cache does not (its partial last page counted whole)."""
        return self.pool.round_up(len(req.slots)) - req.prefix_len

    def in_use(self, holders: list[Request]) -> int:
        """Slots held by the requests in holders, their locked cache paths included."""
        return self.cache.protected_size() + sum(self.own_slots(r) for r in holders)

    def check_leak(self, holders: list[Request], deep: bool = False) -> str | None:
        """An error message if some KV slot is unaccounted for, given every request that holds
        slots (or, deep, held twice or a request's slots are not laid out by pages)."""
        own = sum(self.own_slots(r) for r in holders)
        free, evictable = self.pool.available(), self.cache.evictable_size()
        protected = self.cache.protected_size()
        total = self.pool.capacity
        if free + evictable + protected + own != total:
            return (
                f"KV slot leak: free {free} + cached {evictable} + locked {protected} + "
                f"request-owned {own} != pool {total}"
            )
        if not holders and protected:
            return f"KV lock leak: {protected} cached slots still locked with no running request"
        if deep:
            return self._check_slots_deep(holders)
        return None

    def _check_slots_deep(self, holders: list[Request]) -> str | None:
        ps = self.pool.page_size
        held = self.pool.free_slots() + self.cache.all_slots()
        for r in holders:
            if r.prefix_len % ps:
                return f"request {r.request_id}: cached prefix of {r.prefix_len} is not whole pages"
            try:
                held += self.pool.occupied(r.slots[r.prefix_len :])
            except ValueError as e:
                return f"request {r.request_id}: {e}"
        if sorted(held) != list(range(ps, self.pool.num_pages * ps)):
            return "KV slot bookkeeping corrupt: a slot is held twice or not at all"
        return None
