"""Fixtures shared by several test files."""

import pytest

from radixserve.common import grpc_util
from radixserve.common.grpc_security import TOKEN_ENV


@pytest.fixture
def clean_grpc(monkeypatch):
    """No inter-service token from the environment, and grpc_util's process-wide settings reset before and
    after the test."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    grpc_util.reset()
    yield
    grpc_util.reset()
