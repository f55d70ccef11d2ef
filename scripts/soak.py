"""Soak test (not in CI): K concurrent streaming clients against a running server for a while.

Each client streams /v1/chat/completions requests back to back (random lengths, some cut off
mid-stream like impatient users); every --sample-s the script records errors so far, the RSS of
every radixserve process and the scheduler's KV use and running/waiting counts. At the end, once the
clients stop and the server is idle, the KV in use must be 0. Prints JSON lines; exit 1 on errors
or leaked slots.
Usage: python scripts/soak.py --base-url http://127.0.0.1:30000 --clients 32 --minutes 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import time

import aiohttp

WORDS = "the quick brown fox jumps over a lazy dog while rivers run to the sea under northern lights".split()


def rss_mb() -> dict[str, float]:
    """RSS of each radixserve service process, by service name."""
    out = subprocess.run(["ps", "-eo", "rss=,args="], capture_output=True, text=True).stdout
    sizes: dict[str, float] = {}
    for line in out.splitlines():
        rss, _, args = line.strip().partition(" ")
        parts = args.split()
        if "radixserve.cli" in parts and len(parts) > parts.index("radixserve.cli") + 1:
            name = parts[parts.index("radixserve.cli") + 1]
            if name in ("gateway", "tokenizer", "scheduler", "executor", "detokenizer"):
                sizes[name] = round(sizes.get(name, 0) + int(rss) / 1024, 1)
    return sizes


def error(stats: dict, message: str) -> None:
    stats["errors"] += 1
    if len(stats["first_errors"]) < 10:
        stats["first_errors"].append(message)


async def client(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    stop_at: float,
    rng: random.Random,
    stats: dict,
) -> None:
    while time.monotonic() < stop_at:
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))
        body = {
            "model": model,
            "stream": True,
            "max_tokens": rng.randint(16, 256),
            "temperature": 0.8,
            "messages": [{"role": "user", "content": prompt}],
        }
        cut_after = rng.randint(2, 20) if rng.random() < 0.1 else None
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    error(stats, f"HTTP {resp.status}: {(await resp.text())[:200]}")
                    await asyncio.sleep(1)
                    continue
                chunks = 0
                async for line in resp.content:
                    if line.startswith(b"data: ") and b'"error"' in line:
                        error(stats, line.decode()[:200])
                    chunks += 1
                    if cut_after is not None and chunks >= cut_after:
                        stats["cut"] += 1
                        break
                else:
                    stats["completed"] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            error(stats, f"{type(e).__name__}: {e}")
            await asyncio.sleep(1)


async def server_info(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/get_server_info") as resp:
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}: {(await resp.text())[:200]}"}
        scheduler = (await resp.json())["scheduler"]
    return {
        k: scheduler.get(k, 0)
        for k in ("running_requests", "waiting_requests", "in_use_tokens", "cached_tokens")
    }


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--sample-s", type=float, default=60)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    stats = {"errors": 0, "first_errors": [], "completed": 0, "cut": 0}
    started = time.monotonic()
    stop_at = started + a.minutes * 60
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(a.base_url + "/v1/models") as resp:
            model = (await resp.json())["data"][0]["id"]
        clients = [
            asyncio.create_task(
                client(session, a.base_url, model, stop_at, random.Random(a.seed + i), stats)
            )
            for i in range(a.clients)
        ]
        while time.monotonic() < stop_at:
            await asyncio.sleep(min(a.sample_s, max(0.0, stop_at - time.monotonic())))
            print(
                json.dumps(
                    {
                        "t_s": round(time.monotonic() - started),
                        "completed": stats["completed"],
                        "cut": stats["cut"],
                        "errors": stats["errors"],
                        "rss_mb": rss_mb(),
                        "server": await server_info(session, a.base_url),
                    }
                ),
                flush=True,
            )
        await asyncio.gather(*clients)
        await asyncio.sleep(2)  # the last aborts settle
        idle = await server_info(session, a.base_url)
    leaked = "error" in idle or any(
        idle[k] for k in ("in_use_tokens", "running_requests", "waiting_requests")
    )
    print(
        json.dumps(
            {
                "done": True,
                "completed": stats["completed"],
                "cut": stats["cut"],
                "errors": stats["errors"],
                "first_errors": stats["first_errors"],
                "idle_server": idle,
                "leaked": bool(leaked),
            }
        ),
        flush=True,
    )
    return 1 if stats["errors"] or leaked else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
