"""Fuzz a running radixserve gateway through its own /openapi.json with schemathesis: valid and
invalid requests for every operation; reports any 5xx and any 4xx not in OpenAI's error shape.

Usage: python scripts/fuzz_api.py --base-url http://127.0.0.1:30000 [--cases-per-operation 200]
       [--seed N] [--api-key KEY] [--cap-tokens 16] [--timeout 60]
Exit status 1 when a problem was found. tests/gateway/test_schemathesis.py runs the same checks in CI.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import schemathesis

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tests.gateway.test_schemathesis import fuzz_schema  # noqa: E402

MAX_INT32 = (1 << 31) - 1
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_new_tokens")


def cap_generation(body, cap: int) -> None:
    """Shorten valid generation lengths (in place) so that a real model answers quickly; out-of-range
    values are left alone, as they must still be refused."""
    if not isinstance(body, dict):
        return
    targets = [body]
    params = body.get("sampling_params")
    if isinstance(params, dict):
        params.setdefault("max_new_tokens", cap)
        targets.append(params)
    elif params is None and ("text" in body or "input_ids" in body):
        body["sampling_params"] = {"max_new_tokens": cap}
    for target in targets:
        for field in LENGTH_FIELDS:
            value = target.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and cap < value <= MAX_INT32:
                target[field] = cap
    if ("messages" in body or "prompt" in body) and not any(f in body for f in LENGTH_FIELDS):
        body["max_tokens"] = cap


def make_call(base_url: str, headers: dict, cap: int, timeout: float):
    def call(case):
        if cap:
            cap_generation(case.body, cap)
        return case.call(base_url=base_url, headers=headers, timeout=timeout)
    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:30000")
    parser.add_argument("--cases-per-operation", type=int, default=200, help="per generation mode (valid, invalid)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random generation with this seed (default: derandomized)")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    parser.add_argument("--cap-tokens", type=int, default=16, help="cap valid generation lengths (0: no cap)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    args = parser.parse_args(argv)
    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", headers=headers)
    report = fuzz_schema(schema, args.cases_per_operation, make_call(base_url, headers, args.cap_tokens, args.timeout),
                         seed=args.seed)
    for label, statuses in sorted(report.statuses.items()):
        print(f"{label}: {dict(sorted(statuses.items(), key=str))}")
    for label, problem in report.problems.items():
        print(f"PROBLEM {label}: {problem}")
    print(f"{report.total} cases, {len(report.problems)} operations with problems")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
