"""Fixtures shared by several test files."""

import pytest

from radixserve.common import grpc_util
from radixserve.common.grpc_security import TOKEN_ENV
from tests.stack import DEFAULT_STACK_FLAGS, running_stack, stop_stack
from tests.tiny_stack import flush_cache, start_tiny_stack


@pytest.fixture
def clean_grpc(monkeypatch):
    """No inter-service token from the environment, and grpc_util's process-wide settings reset before and
    after the test."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    grpc_util.reset()
    yield
    grpc_util.reset()


@pytest.fixture(scope="session")
def default_stack(tmp_path_factory):
    """`radixserve serve` with the default settings on the embedded SmolLM2 (DEFAULT_STACK_FLAGS), one
    for the whole session: the test files that need nothing else share it instead of each starting its
    own. Its radix cache holds what earlier files left; each test checks only what it sends."""
    with running_stack(tmp_path_factory.mktemp("default_stack"), *DEFAULT_STACK_FLAGS) as s:
        yield s


@pytest.fixture(scope="session")
def session_tiny_stack(tmp_path_factory):
    """start_tiny_stack with no flags of its own, one for the session (see tiny_stack)."""
    stack = start_tiny_stack(tmp_path_factory.mktemp("tiny_stack"))
    yield stack
    stop_stack(stack)
    assert stack.proc.returncode == 0, stack.log_tail()


@pytest.fixture
def tiny_stack(session_tiny_stack):
    """The session's plain tiny stack with its radix cache flushed, as a fresh one holds nothing: for the
    tests that compare its answers with another stack's or only ask it something."""
    flush_cache(session_tiny_stack)
    return session_tiny_stack
