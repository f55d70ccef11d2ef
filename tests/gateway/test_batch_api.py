"""OpenAI's Files and Batch APIs through the official client, on a gateway over the fake backends."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from radixserve.gateway.api.file_store import BatchStore
from tests.gateway.fakes import MESSAGES, MODEL, RunningGateway, expected_output, wait_until

FINISHED = ("completed", "failed", "cancelled", "expired")
SLOW_STEP_S = 0.02


@pytest.fixture(scope="module")
def gw(backends, tmp_path_factory):
    running = RunningGateway(backends, file_storage_path=str(tmp_path_factory.mktemp("storage")))
    yield running
    running.close()


def client_of(gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="x", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def client(gw):
    return client_of(gw)


@pytest.fixture
def slow_lines(backends):
    """Lines take ~0.2 s each (max_tokens 20), so a batch can be stopped half way."""
    backends.scheduler.step_delay = SLOW_STEP_S
    yield
    backends.scheduler.step_delay = 0.002


def chat_line(custom_id: str, **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": MESSAGES, **body},
    }


def completion_line(custom_id: str, **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": MODEL, "prompt": "Once", **body},
    }


def jsonl(entries: list[dict]) -> bytes:
    return "".join(json.dumps(e) + "\n" for e in entries).encode()


def start_batch(client: openai.OpenAI, entries: list[dict], **extra):
    input_file = client.files.create(file=("input.jsonl", jsonl(entries)), purpose="batch")
    return client.batches.create(
        input_file_id=input_file.id, endpoint=entries[0]["url"], completion_window="24h", **extra
    )


def wait_for_batch(client: openai.OpenAI, batch_id: str, timeout: float = 15):
    deadline = time.time() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in FINISHED:
        assert time.time() < deadline, batch
        time.sleep(0.05)
    return batch


def results(client: openai.OpenAI, file_id: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id appears twice"
    return by_id


def comparable(body: dict) -> dict:
    """A response body less what differs between two identical requests (the fake caches prompts)."""
    usage = {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}
    return {**{k: v for k, v in body.items() if k not in ("id", "created")}, "usage": usage}


# ---- files ----


def test_files_upload_retrieve_list_download_delete(client, gw):
    data = jsonl([chat_line("a")])
    uploaded = client.files.create(file=("in.jsonl", data), purpose="batch")
    assert (
        uploaded.id.startswith("file-")
        and uploaded.object == "file"
        and uploaded.status == "processed"
    )
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(data), "in.jsonl", "batch")
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == data

    notes = client.files.create(file=("notes.bin", b"\x00\xff\r\n raw"), purpose="user_data")
    assert client.files.content(notes.id).content == b"\x00\xff\r\n raw"
    listed = [f.id for f in client.files.list()]
    assert listed.index(notes.id) < listed.index(uploaded.id)  # newest first
    assert [f.id for f in client.files.list(purpose="user_data")] == [notes.id]

    assert client.files.delete(notes.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(notes.id)
    r = httpx.get(f"{gw.base_url}/v1/files/{notes.id}/content")
    assert r.status_code == 404 and r.json() == {
        "error": {
            "message": f"No such File object: {notes.id}",
            "type": "invalid_request_error",
            "param": "file_id",
            "code": "not_found",
        }
    }
    assert httpx.delete(f"{gw.base_url}/v1/files/{notes.id}").status_code == 404

    bad_purpose = httpx.post(
        gw.base_url + "/v1/files", files={"file": ("x", b"y")}, data={"purpose": "junk"}
    )
    assert bad_purpose.status_code == 400 and bad_purpose.json()["error"]["param"] == "purpose"
    no_file = httpx.post(gw.base_url + "/v1/files", data={"purpose": "batch"})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"


# ---- batches ----


def test_batch_results_are_the_bodies_direct_calls_give(client, gw):
    entries = [
        chat_line("short", max_tokens=5),
        chat_line("long", max_tokens=30, temperature=0),
        chat_line("bad", max_tokens=-1),
        chat_line("streamed", max_tokens=5, stream=True),
    ]
    batch = start_batch(client, entries, metadata={"job": "nightly"})
    assert (
        batch.id.startswith("batch_")
        and batch.object == "batch"
        and batch.endpoint == "/v1/chat/completions"
    )
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "nightly"}
    assert batch.expires_at == batch.created_at + 24 * 3600

    done = wait_for_batch(client, batch.id)
    assert done.status == "completed" and done.errors is None
    assert (
        done.request_counts.total,
        done.request_counts.completed,
        done.request_counts.failed,
    ) == (4, 2, 2)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.failed_at is None and done.cancelled_at is None and done.expired_at is None
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"

    outputs = results(client, done.output_file_id)
    assert set(outputs) == {"short", "long"}
    for entry in entries[:2]:
        line = outputs[entry["custom_id"]]
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["request_id"] == line["response"]["body"]["id"]
        direct = httpx.post(
            gw.base_url + "/v1/chat/completions", json=entry["body"], timeout=30
        ).json()
        assert comparable(line["response"]["body"]) == comparable(direct)

    errors = results(client, done.error_file_id)
    assert set(errors) == {"bad", "streamed"}
    assert errors["bad"]["response"]["status_code"] == 400
    direct_error = httpx.post(gw.base_url + "/v1/chat/completions", json=entries[2]["body"]).json()
    assert errors["bad"]["response"]["body"] == direct_error
    assert errors["streamed"]["response"]["status_code"] == 400
    assert errors["streamed"]["response"]["body"]["error"]["param"] == "stream"


BAD_LINES = [
    (b"{not json", "invalid_json_line"),
    (b"[1, 2]", "invalid_json_line"),
    (json.dumps({**chat_line("x"), "custom_id": None}).encode(), "missing_required_parameter"),
    (json.dumps(chat_line("first")).encode(), "duplicate_custom_id"),
    (json.dumps({**chat_line("x"), "method": "GET"}).encode(), "invalid_method"),
    (json.dumps(completion_line("x")).encode(), "mismatched_endpoint"),
    (json.dumps({**chat_line("x"), "body": "hello"}).encode(), "missing_required_parameter"),
]


@pytest.mark.parametrize("second_line, code", BAD_LINES, ids=[code for _, code in BAD_LINES])
def test_bad_input_lines_are_rejected_at_creation(client, second_line, code):
    data = json.dumps(chat_line("first")).encode() + b"\n" + second_line + b"\n"
    input_file = client.files.create(file=("input.jsonl", data), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(
            input_file_id=input_file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert err.value.code == code and err.value.param == "input_file_id"
    assert err.value.body["message"].startswith("Line 2 of the input file:")


def test_bad_batch_parameters_are_rejected(client):
    good = client.files.create(file=("input.jsonl", jsonl([chat_line("a")])), purpose="batch").id
    other_purpose = client.files.create(
        file=("input.jsonl", jsonl([chat_line("a")])), purpose="user_data"
    ).id
    empty = client.files.create(file=("input.jsonl", b"\n"), purpose="batch").id
    cases = [
        (dict(input_file_id=good, endpoint="/v1/responses"), "endpoint"),
        (dict(input_file_id=good, completion_window="1h"), "completion_window"),
        (dict(input_file_id=other_purpose), "input_file_id"),
        (dict(input_file_id=empty), "input_file_id"),
    ]
    for overrides, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.batches.create(
                **{"endpoint": "/v1/chat/completions", "completion_window": "24h", **overrides}
            )
        assert err.value.param == param, overrides
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )


def test_batches_list_newest_first_in_pages_and_unknown_ids_are_404(client, gw):
    created = [
        start_batch(client, [completion_line(f"c{i}", max_tokens=i + 1)]).id for i in range(3)
    ]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == created[::-1][:2] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == created[0]
    for i, batch_id in enumerate(created):
        done = wait_for_batch(client, batch_id)
        text = results(client, done.output_file_id)[f"c{i}"]["response"]["body"]["choices"][0][
            "text"
        ]
        assert text == expected_output(i + 1)

    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")
    r = httpx.get(gw.base_url + "/v1/batches/batch_nope")
    assert (
        r.status_code == 404 and r.json()["error"]["message"] == "No such Batch object: batch_nope"
    )


def test_cancel_stops_launching_and_keeps_partial_output(client, gw, slow_lines):
    gw.gateway.app.state.batch_runner.concurrency = 2
    try:
        batch = start_batch(client, [chat_line(f"r{i}", max_tokens=20) for i in range(12)])
        assert wait_until(
            lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, timeout=10
        )
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at
        done = wait_for_batch(client, batch.id)
    finally:
        gw.gateway.app.state.batch_runner.concurrency = 32
    assert done.status == "cancelled" and done.cancelled_at and done.completed_at is None
    assert 2 <= done.request_counts.completed < 12 and done.request_counts.failed == 0
    assert len(results(client, done.output_file_id)) == done.request_counts.completed
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_restart_keeps_files_and_batches_and_resumes_or_expires_interrupted_ones(
    backends, tmp_path, slow_lines
):
    first = RunningGateway(backends, file_storage_path=str(tmp_path))
    try:
        client = client_of(first)
        backends.scheduler.step_delay = 0.002
        finished = wait_for_batch(
            client, start_batch(client, [completion_line("only", max_tokens=3)]).id
        )
        backends.scheduler.step_delay = SLOW_STEP_S
        first.gateway.app.state.batch_runner.concurrency = 2
        entries = [chat_line(f"r{i}", max_tokens=20) for i in range(10)]
        resumed, expiring = start_batch(client, entries), start_batch(client, entries)
        assert wait_until(
            lambda: (
                client.batches.retrieve(resumed.id).request_counts.completed >= 3
                and client.batches.retrieve(expiring.id).request_counts.completed >= 1
            ),
            timeout=10,
        )
    finally:
        first.close()
    finished_before_restart = set(backends.scheduler.completed)
    store = BatchStore(tmp_path)
    assert store.get(resumed.id)["status"] == "in_progress"
    store.save({**store.get(expiring.id), "expires_at": int(time.time()) - 1})

    second = RunningGateway(backends, file_storage_path=str(tmp_path))
    try:
        client = client_of(second)
        assert client.batches.retrieve(finished.id) == finished
        assert client.files.content(finished.output_file_id).text.count("\n") == 1
        assert {b.id for b in client.batches.list()} == {finished.id, resumed.id, expiring.id}
        done = wait_for_batch(client, resumed.id)
        expired = wait_for_batch(client, expiring.id)
        outputs, expired_outputs = (
            results(client, done.output_file_id),
            results(client, expired.output_file_id),
        )
        expired_errors = results(client, expired.error_file_id)
    finally:
        second.close()

    assert (
        done.status == "completed"
        and done.request_counts.completed == 10
        and set(outputs) == {e["custom_id"] for e in entries}
    )
    kept = [o for o in outputs.values() if o["response"]["request_id"] in finished_before_restart]
    assert len(kept) >= 3  # lines finished before the restart were not run again

    assert expired.status == "expired" and expired.expired_at and expired.completed_at is None
    assert expired.request_counts.completed == len(expired_outputs) >= 1
    assert set(expired_outputs) | set(expired_errors) == {e["custom_id"] for e in entries}
    assert all(
        e["response"] is None and e["error"]["code"] == "batch_expired"
        for e in expired_errors.values()
    )
