"""Fuzz a running radixserve gateway through its own /openapi.json with schemathesis: valid and
invalid requests for every operation; reports any 5xx and any 4xx not in OpenAI's error shape
(Anthropic's on Anthropic's routes, /v1/messages...).

Usage: python scripts/fuzz_api.py --base-url http://127.0.0.1:30000 [--cases-per-operation 200]
       [--seed N] [--api-key KEY] [--cap-tokens 16] [--timeout 60]
Exit status 1 when a problem was found. tests/gateway/test_schemathesis.py runs the same checks in CI.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable

from radixserve.gateway.api.anthropic_protocol import is_anthropic_path

MAX_INT32 = (1 << 31) - 1
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_new_tokens")
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)


def openai_error_problem(response) -> str | None:
    """Why a 4xx response is not OpenAI's {"error": {"message", "type", "param", "code"}}, or None."""
    try:
        body = response.json()
    except ValueError:
        return "the body is not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return "the body is not {'error': {message, type, param, code}}"
    return message_problem(error)


def anthropic_error_problem(response) -> str | None:
    """Why a 4xx response is not Anthropic's {"type": "error", "error": {"type", "message"}}."""
    try:
        body = response.json()
    except ValueError:
        return "the body is not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if (
        body.get("type") != "error"
        or not isinstance(error, dict)
        or set(error) != {"type", "message"}
    ):
        return "the body is not {'type': 'error', 'error': {type, message}}"
    return message_problem(error)


def message_problem(error: dict) -> str | None:
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return "message and type must be strings"
    if any(leak in error["message"] for leak in ("Traceback", "object at 0x", "<class ")):
        return "the message leaks Python internals"
    return None


def response_problem(response, path: str = "") -> str | None:
    if response.status_code >= 500:
        return f"server error {response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        check = anthropic_error_problem if is_anthropic_path(path) else openai_error_problem
        problem = check(response)
        if problem:
            return f"{response.status_code}: {problem}: {response.text[:300]}"
    return None


class FuzzReport:
    """Status codes per operation, and the first problem found per operation."""

    def __init__(self):
        self.statuses: dict[str, Counter] = {}
        self.problems: dict[str, str] = {}

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.statuses.values())

    def record(self, case, response) -> None:
        self.statuses.setdefault(case.operation.label, Counter())[response.status_code] += 1
        problem = response_problem(response, case.operation.path)
        if problem:
            self.fail(case, problem)

    def fail(self, case, problem: str) -> None:
        label = case.operation.label
        self.statuses.setdefault(label, Counter())["error"] += 1
        if label not in self.problems:
            self.problems[label] = f"{problem}\n    reproduce: {case.as_curl_command()}"


def fuzz_operation(
    operation, mode, cases: int, call: Callable, report: FuzzReport, seed: int | None = None
) -> None:
    """cases generated requests (derandomized unless seed is given) against one operation."""

    @settings(
        max_examples=cases,
        derandomize=seed is None,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        try:
            response = call(case)
        except (
            Exception
        ) as e:  # in process, what the app raised (after its 500); over HTTP, a failed request
            report.fail(case, f"the call raised {type(e).__name__}: {e}")
            return
        report.record(case, response)

    if seed is not None:
        run = hypothesis_seed(seed)(run)
    try:
        run()
    except Unsatisfiable:
        assert (
            mode is schemathesis.GenerationMode.NEGATIVE
        )  # nothing to get wrong: no parameters, no body


def fuzz_schema(schema, cases: int, call: Callable, seed: int | None = None) -> FuzzReport:
    report = FuzzReport()
    for result in schema.get_all_operations():
        for mode in MODES:
            fuzz_operation(result.ok(), mode, cases, call, report, seed)
    return report


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
    parser.add_argument(
        "--cases-per-operation", type=int, default=200, help="per generation mode (valid, invalid)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random generation with this seed (default: derandomized)",
    )
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    parser.add_argument(
        "--cap-tokens", type=int, default=16, help="cap valid generation lengths (0: no cap)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    args = parser.parse_args(argv)
    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", headers=headers)
    report = fuzz_schema(
        schema,
        args.cases_per_operation,
        make_call(base_url, headers, args.cap_tokens, args.timeout),
        seed=args.seed,
    )
    for label, statuses in sorted(report.statuses.items()):
        print(f"{label}: {dict(sorted(statuses.items(), key=str))}")
    for label, problem in report.problems.items():
        print(f"PROBLEM {label}: {problem}")
    print(f"{report.total} cases, {len(report.problems)} operations with problems")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
