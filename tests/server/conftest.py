"""Fixtures: picochat serve on an ephemeral loopback port, in front of a FakeEngine."""

from __future__ import annotations

from typing import Iterator

import pytest
from fake_engine import FakeEngine
from server_live import MODEL, live_server

from picochat.server.app import create_app


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def url(engine: FakeEngine) -> Iterator[str]:
    with live_server(create_app(lambda: engine, model_name=MODEL)) as base:
        yield base
