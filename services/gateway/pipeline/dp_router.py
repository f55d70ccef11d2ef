"""Which data-parallel replica (scheduler + executor pair, --dp-size) serves a request: --load-balance-method.

- round_robin: the replicas in turn.
- shortest_queue: the replica with the fewest requests in flight from this gateway (ties in turn).
- cache_aware (default), modelled on sglang_router's cache-aware policy: the gateway keeps, per replica, an
  approximate prefix tree of the prompts (token ids) it sent there (prefix_tree.py). A request goes to the
  replica whose tree shares the longest prefix with its prompt when that prefix is more than
  cache_threshold of the prompt; otherwise to the least-loaded replica (fewest requests in flight; ties:
  the smallest tree, i.e. the most room in its cache). When the load is uneven (the most and the least
  loaded replica differ by more than balance_abs_threshold requests and by more than a factor of
  balance_rel_threshold) the prefix is ignored and the least-loaded replica takes the request.

The thresholds here are 0.5, 32 and 1.1. For comparison: sglang_router's Router docstring gives 0.5, 32
and 1.0001, the CLI defaults of sglang-router 0.3.2 are 0.3, 64 and 1.5. Unlike sglang_router (one shared
tree with per-worker timestamps, evicted on a timer) each replica has its own tree, evicted on insert.

A replica marked unavailable (its requests failed with UNAVAILABLE, or its health probe failed) is left
out for UNAVAILABLE_S seconds, unless every replica is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from radixserve.gateway.pipeline.prefix_tree import PrefixTree

METHODS = ("round_robin", "shortest_queue", "cache_aware")
CACHE_THRESHOLD = 0.5
BALANCE_ABS_THRESHOLD = 32
BALANCE_REL_THRESHOLD = 1.1
MAX_TREE_TOKENS = 1 << 20  # per replica
UNAVAILABLE_S = 5.0


class DataParallelRouter:
    def __init__(
        self,
        replicas: int,
        method: str = "cache_aware",
        *,
        cache_threshold: float = CACHE_THRESHOLD,
        balance_abs_threshold: int = BALANCE_ABS_THRESHOLD,
        balance_rel_threshold: float = BALANCE_REL_THRESHOLD,
        max_tree_tokens: int = MAX_TREE_TOKENS,
    ):
        if method not in METHODS:
            raise ValueError(
                f"unknown load balance method {method!r} (choose from {', '.join(METHODS)})"
            )
        if replicas < 1:
            raise ValueError("at least one replica")
        self.method = method
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.inflight = [0] * replicas  # requests running on each replica (routed or pinned)
        self.routed = [0] * replicas  # requests route() sent to each replica since start
        # Prompts are remembered only where there is a choice to make (one replica: no trees at all).
        self.trees = (
            [PrefixTree(max_tree_tokens) for _ in range(replicas)]
            if method == "cache_aware" and replicas > 1
            else []
        )
        self._next = 0
        self._unavailable_until = [float("-inf")] * replicas

    @property
    def replicas(self) -> int:
        return len(self.inflight)

    def route(self, input_ids: Sequence[int]) -> int:
        """The replica for a prompt; counts the request in flight there until finished(replica)."""
        replica = self._choose(input_ids) if self.replicas > 1 else 0
        if self.trees:
            self.trees[replica].insert(input_ids)
        self.routed[replica] += 1
        self.inflight[replica] += 1
        return replica

    def pin(self, replica: int) -> int:
        """Count a request sent to a given replica (health probes) in flight there; returns replica."""
        self.inflight[replica] += 1
        return replica

    def finished(self, replica: int) -> None:
        self.inflight[replica] = max(0, self.inflight[replica] - 1)

    def mark_unavailable(self, replica: int) -> None:
        self._unavailable_until[replica] = time.monotonic() + UNAVAILABLE_S

    def mark_available(self, replica: int) -> None:
        """The replica just passed a health probe: route to it again at once (a probe that failed while it
        was still starting, e.g. warming up, must not keep it out after the server says ready)."""
        self._unavailable_until[replica] = float("-inf")

    def _candidates(self) -> list[int]:
        """The available replicas (all when none is), in turn from the next one."""
        n = self.replicas
        ring = [(self._next + k) % n for k in range(n)]
        self._next = (self._next + 1) % n
        now = time.monotonic()
        available = [r for r in ring if self._unavailable_until[r] <= now]
        return available or ring

    def _choose(self, input_ids: Sequence[int]) -> int:
        candidates = self._candidates()
        if self.method == "round_robin":
            return candidates[0]
        if self.method == "shortest_queue":
            return min(candidates, key=lambda r: self.inflight[r])
        return self._cache_aware(candidates, input_ids)

    def _least_loaded(self, candidates: list[int]) -> int:
        return min(candidates, key=lambda r: (self.inflight[r], self.trees[r].size))

    def _cache_aware(self, candidates: list[int], input_ids: Sequence[int]) -> int:
        loads = [self.inflight[r] for r in candidates]
        low, high = min(loads), max(loads)
        if high - low > self.balance_abs_threshold and high > low * self.balance_rel_threshold:
            return self._least_loaded(candidates)
        matched = {r: self.trees[r].match(input_ids) for r in candidates}
        best = max(candidates, key=lambda r: (matched[r], -self.inflight[r]))
        if input_ids and matched[best] / len(input_ids) > self.cache_threshold:
            return best
        return self._least_loaded(candidates)
