"""Property-based request bodies: whatever a client sends, the server answers without a 500."""

from __future__ import annotations

import json
from typing import Iterator

import httpx
import pytest
from fake_engine import FakeEngine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from request_bodies import bodies, json_values, paths, post_expecting_no_500
from server_live import MODEL, live_server

from picochat.server.app import create_app


@pytest.fixture(scope="module")
def server() -> Iterator[httpx.Client]:
    engine = FakeEngine(reply="a few words", token_delay_s=0.0)
    with live_server(create_app(lambda: engine, model_name=MODEL)) as url, httpx.Client(base_url=url) as http:
        yield http


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=paths, body=bodies)
def test_json_bodies_never_cause_a_500(server: httpx.Client, path: str, body: dict) -> None:
    post_expecting_no_500(server, path, json.dumps(body).encode())  # NaN and Infinity included


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=paths, content=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bytes_never_cause_a_500(server: httpx.Client, path: str, content: bytes) -> None:
    post_expecting_no_500(server, path, content)
