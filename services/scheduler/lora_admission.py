"""How many LoRA adapters a step may run, at admission: the executor holds --max-loras-per-batch adapters
in GPU slots, and every running request decodes in every step, so the running requests (with the chunked
one and those admitted in the step being planned) may name at most that many distinct adapters. The base
model takes no slot.

Admission order prefers requests whose adapter is already active (its slot is loaded: no copy, no
eviction); a request whose adapter does not fit waits, and the requests behind it may still be admitted.
Pure Python."""

from __future__ import annotations

from typing import Iterable

from radixserve.scheduler.request import Request


def active_adapters(requests: Iterable[Request | None]) -> set[str]:
    """The adapters the given requests (None skipped) name."""
    return {r.lora_name for r in requests if r is not None and r.lora_name}


def adapter_fits(req: Request, active: set[str], max_loras: int) -> bool:
    """Whether req may join requests that use `active` without passing max_loras adapters."""
    return not req.lora_name or req.lora_name in active or len(active) < max_loras


def resident_first(order: list[Request], active: set[str]) -> list[Request]:
    """order with the requests of active adapters (and the base model) first, each part in order (the
    planner applies it only while some adapter is active)."""
    near = [r for r in order if not r.lora_name or r.lora_name in active]
    far = [r for r in order if r.lora_name and r.lora_name not in active]
    return near + far


def adapter_in_use(core, name: str) -> bool:
    """Whether a request of the scheduler core runs, waits with or still releases KV of adapter name."""
    return any(r.lora_name == name for r in (*core.requests.values(), *core.kv.releasing))


def drop_adapter_cache(core, name: str) -> bool:
    """Free the prefix cache's KV of adapter name (once it is not in use); False while still locked."""
    return core.cache.drop_namespace(name, core.pool.free)
