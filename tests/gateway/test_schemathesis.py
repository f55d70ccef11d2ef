"""schemathesis against the gateway's own /openapi.json, in process over ASGI, with fake backends:
no generated request (valid or not) may get a 5xx, and every 4xx answers in OpenAI's error shape.

Generation is derandomized, so CI runs the same cases every time; scripts/fuzz_api.py runs the same
checks with more cases against a running server.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable

from radixserve.common.args import ServerArgs
from radixserve.gateway.app import create_app
from scripts import fuzz_api
from tests.gateway.fakes import FakeBackends, RunningGateway

CASES_PER_OPERATION = 60  # per generation mode; operations without inputs have a single case
MIN_TOTAL_CASES = 500
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
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return "message and type must be strings"
    if any(leak in error["message"] for leak in ("Traceback", "object at 0x", "<class ")):
        return "the message leaks Python internals"
    return None


def response_problem(response) -> str | None:
    if response.status_code >= 500:
        return f"server error {response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        problem = openai_error_problem(response)
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
        problem = response_problem(response)
        if problem:
            self.fail(case, problem)

    def fail(self, case, problem: str) -> None:
        label = case.operation.label
        self.statuses.setdefault(label, Counter())["error"] += 1
        if label not in self.problems:
            self.problems[label] = f"{problem}\n    reproduce: {case.as_curl_command()}"


def fuzz_operation(operation, mode, cases: int, call: Callable, report: FuzzReport, seed: int | None = None) -> None:
    """cases generated requests (derandomized unless seed is given) against one operation."""

    @settings(max_examples=cases, derandomize=seed is None, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        try:
            response = call(case)
        except Exception as e:  # in process, what the app raised (after its 500); over HTTP, a failed request
            report.fail(case, f"the call raised {type(e).__name__}: {e}")
            return
        report.record(case, response)

    if seed is not None:
        run = hypothesis_seed(seed)(run)
    try:
        run()
    except Unsatisfiable:
        assert mode is schemathesis.GenerationMode.NEGATIVE  # nothing to get wrong: no parameters, no body


def fuzz_schema(schema, cases: int, call: Callable, seed: int | None = None) -> FuzzReport:
    report = FuzzReport()
    for result in schema.get_all_operations():
        for mode in MODES:
            fuzz_operation(result.ok(), mode, cases, call, report, seed)
    return report


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    backends = FakeBackends(step_delay=0)
    args = ServerArgs(tokenizer_addr=backends.tokenizer_addr, scheduler_addr=backends.scheduler_addr,
                      detokenizer_addr=backends.detokenizer_addr, served_model_name="fake-model",
                      file_storage_path=str(tmp_path_factory.mktemp("storage")), log_level="warning")
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(args))
    backends.stop()


def test_generated_requests_get_no_5xx_and_openai_shaped_4xx(schema):
    report = fuzz_schema(schema, CASES_PER_OPERATION, lambda case: case.call())
    assert not report.problems, "\n".join(f"{label}: {p}" for label, p in report.problems.items())
    assert report.total >= MIN_TOTAL_CASES
    for label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /generate", "POST /abort_request"):
        assert report.statuses[label][200] > 0, (label, report.statuses[label])  # bodies got past validation too


def test_fuzz_script_against_a_running_server(tmp_path, capsys):
    backends = FakeBackends(step_delay=0)
    gateway = RunningGateway(backends, file_storage_path=str(tmp_path))
    try:
        status = fuzz_api.main(["--base-url", gateway.base_url, "--cases-per-operation", "3", "--seed", "1"])
    finally:
        gateway.close()
        backends.stop()
    out = capsys.readouterr().out
    assert status == 0, out
    assert "POST /v1/chat/completions: {" in out and "0 operations with problems" in out


def test_every_route_that_parses_its_own_body_documents_it(schema):
    post_routes = {path for path, ops in schema.raw_schema["paths"].items() if "post" in ops}
    without_body = {p for p in post_routes if "requestBody" not in schema.raw_schema["paths"][p]["post"]}
    assert without_body <= {"/flush_cache", "/v1/batches/{batch_id}/cancel"}, without_body
