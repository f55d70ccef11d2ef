"""Fixtures of the gateway tests."""

import pytest

from tests.gateway.fakes import FakeBackends


@pytest.fixture(scope="module")
def backends():
    fakes = FakeBackends()
    yield fakes
    fakes.stop()
