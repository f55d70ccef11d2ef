"""Request data cannot reach Python internals through chat templates, nor files outside the storage folder."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from radixserve.common.args import ServerArgs
from radixserve.common.model_files import resolve_model_path
from radixserve.gateway.app import create_app
from radixserve.gateway.api.errors import ApiError
from radixserve.gateway.api.file_store import BatchStore, FileStore
from radixserve.tokenizer.conversation import Conversation
from radixserve.tokenizer.core import TokenizerCore

HOSTILE_TEMPLATES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set _ = messages.append(1) %}{{ messages }}",  # the environment is immutable too
]
HOSTILE_IDS = [
    "../secret",
    "..",
    "%2E%2E",
    "/etc/passwd",
    "file-\x00",
    "a/../../secret",
    "x" * 300,
    "",
]
SECRET = "do-not-serve-me"


@pytest.fixture(scope="module")
def core() -> TokenizerCore:
    return TokenizerCore(resolve_model_path(None))


def render(core: TokenizerCore, template: str, content: str = "hi") -> str:
    core.tokenizer.chat_template = template
    return core.render_chat(
        Conversation([{"role": "user", "content": content}], add_generation_prompt=True)
    )


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_templates_cannot_reach_python_internals(core, template):
    original = core.tokenizer.chat_template
    try:
        with pytest.raises(ValueError, match="chat template error: SecurityError"):
            render(core, template)
    finally:
        core.tokenizer.chat_template = original


def test_unsafe_attributes_read_as_undefined(core):
    original = core.tokenizer.chat_template
    try:
        assert render(core, "[{{ ''.__class__ }}][{{ messages.pop }}]") == "[][]"
    finally:
        core.tokenizer.chat_template = original


def test_message_content_is_data_not_template(core):
    content = "{{ ''.__class__.__mro__ }}{% for x in range(3) %}x{% endfor %}"
    assert content in render(core, core.tokenizer.chat_template, content)


@pytest.fixture
def storage(tmp_path):
    root = tmp_path / "storage"
    root.mkdir()
    # Files beside and above the stores' folders that a traversing id would name.
    for folder in (tmp_path, root):
        (folder / "secret.json").write_text(
            f'{{"id": "x", "purpose": "batch", "secret": "{SECRET}"}}'
        )
        (folder / "secret.data").write_text(SECRET)
    return root


@pytest.mark.parametrize("bad_id", HOSTILE_IDS)
def test_store_ids_cannot_leave_the_storage_folder(storage, bad_id):
    files, batches = FileStore(storage), BatchStore(storage)
    for operation in (
        files.get,
        files.read,
        files.delete,
        files.content_path,
        batches.get,
        batches.progress_path,
    ):
        with pytest.raises(ApiError) as err:
            operation(bad_id)
        assert err.value.status == 404, operation
    assert (storage / "secret.data").read_text() == SECRET  # delete did not reach it


@pytest.mark.parametrize(
    "bad_id",
    ["..%2Fsecret", "..%2F..%2Fsecret", "%2E%2E", "%2Fetc%2Fpasswd", "file-%00", "..%5Csecret"],
)
def test_file_and_batch_routes_refuse_traversing_ids(storage, bad_id):
    client = TestClient(create_app(ServerArgs(file_storage_path=str(storage))))
    for method, path in (
        ("GET", f"/v1/files/{bad_id}"),
        ("GET", f"/v1/files/{bad_id}/content"),
        ("DELETE", f"/v1/files/{bad_id}"),
        ("GET", f"/v1/batches/{bad_id}"),
        ("POST", f"/v1/batches/{bad_id}/cancel"),
    ):
        r = client.request(method, path)
        assert r.status_code in (400, 404), (method, path, r.status_code)
        assert SECRET not in r.text
    r = client.post(
        "/v1/batches",
        json={
            "input_file_id": "../secret",
            "endpoint": "/v1/completions",
            "completion_window": "24h",
        },
    )
    assert r.status_code == 404 and SECRET not in r.text
    assert (storage / "secret.data").read_text() == SECRET
