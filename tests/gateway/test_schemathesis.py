"""schemathesis against the gateway's own /openapi.json, in process over ASGI, with fake backends:
no generated request (valid or not) may get a 5xx, and every 4xx answers in OpenAI's error shape
(Anthropic's on Anthropic's routes).

Generation is derandomized, so CI runs the same cases every time; scripts/fuzz_api.py runs the same
checks with more cases against a running server.
"""

from __future__ import annotations

import pytest
import schemathesis

from radixserve.common.args import ServerArgs
from radixserve.gateway.app import create_app
from scripts import fuzz_api
from scripts.fuzz_api import fuzz_schema
from tests.gateway.fakes import FakeBackends, RunningGateway

CASES_PER_OPERATION = 60  # per generation mode; operations without inputs have a single case
MIN_TOTAL_CASES = 500


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    backends = FakeBackends(step_delay=0)
    args = ServerArgs(
        tokenizer_addr=backends.tokenizer_addr,
        scheduler_addr=backends.scheduler_addr,
        detokenizer_addr=backends.detokenizer_addr,
        served_model_name="fake-model",
        file_storage_path=str(tmp_path_factory.mktemp("storage")),
        log_level="warning",
    )
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(args))
    backends.stop()


def test_generated_requests_get_no_5xx_and_openai_shaped_4xx(schema):
    report = fuzz_schema(schema, CASES_PER_OPERATION, lambda case: case.call())
    assert not report.problems, "\n".join(f"{label}: {p}" for label, p in report.problems.items())
    assert report.total >= MIN_TOTAL_CASES
    for label in (
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /generate",
        "POST /abort_request",
    ):
        assert report.statuses[label][200] > 0, (
            label,
            report.statuses[label],
        )  # bodies got past validation too


def test_fuzz_script_against_a_running_server(tmp_path, capsys):
    backends = FakeBackends(step_delay=0)
    gateway = RunningGateway(backends, file_storage_path=str(tmp_path))
    try:
        status = fuzz_api.main(
            ["--base-url", gateway.base_url, "--cases-per-operation", "3", "--seed", "1"]
        )
    finally:
        gateway.close()
        backends.stop()
    out = capsys.readouterr().out
    assert status == 0, out
    assert "POST /v1/chat/completions: {" in out and "0 operations with problems" in out


def test_every_route_that_parses_its_own_body_documents_it(schema):
    post_routes = {path for path, ops in schema.raw_schema["paths"].items() if "post" in ops}
    without_body = {
        p for p in post_routes if "requestBody" not in schema.raw_schema["paths"][p]["post"]
    }
    takes_no_body = {
        "/flush_cache",
        "/v1/batches/{batch_id}/cancel",
        "/v1/responses/{response_id}/cancel",
    }
    assert without_body <= takes_no_body, without_body
