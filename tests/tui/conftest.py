"""Fixtures for the console tests: private XDG dirs, a console on the fake engine, and waits
that poll the app (never sleep-and-assert)."""

from __future__ import annotations

import time
from typing import Callable

import pytest
from textual.pilot import Pilot

from fake_engine import FakeEngine
from picochat.engine.protocol import MetricsSnapshot, RequestTimings
from picochat.tui.app import PicochatApp, make_app
from picochat.tui.screens.chat import ChatScreen
from picochat.tui.widgets.prompt_input import PromptInput


@pytest.fixture(autouse=True)
def xdg_dirs(tmp_path, monkeypatch):
    """Transcripts, exports and the user config go to this test's own folders."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("NO_COLOR", raising=False)
    return tmp_path


async def wait_until(pilot: Pilot, condition: Callable[[], object], what: str, timeout_s: float = 20.0) -> None:
    """Let the app run until ``condition()`` holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


async def open_chat(pilot: Pilot, timeout_s: float = 20.0) -> ChatScreen:
    """Wait for the engine to load and the chat screen to show; returns it."""
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, ChatScreen), "the chat screen", timeout_s)
    await pilot.pause()
    return pilot.app.screen  # type: ignore[return-value]


async def send(pilot: Pilot, text: str) -> None:
    pilot.app.screen.query_one(PromptInput).text = text
    await pilot.press("enter")


async def wait_reply_done(pilot: Pilot, screen: ChatScreen, timeout_s: float = 20.0) -> None:
    await wait_until(pilot, lambda: not screen.streaming and screen.transcript.messages
                     and screen.transcript.messages[-1].role == "assistant", "the reply to finish", timeout_s)


def console(engine: FakeEngine, **kwargs) -> PicochatApp:
    return make_app(lambda progress: engine, metrics_interval=None, **kwargs)


# ---------------------------------------------------------------- fixed metrics for snapshots

def fixed_request(i: int, queue: float, prefill: float, decode: float, prompt: int, output: int) -> RequestTimings:
    t = RequestTimings(f"req-{i}", arrival=100.0, prompt_tokens=prompt, output_tokens=output)
    t.scheduled = 100.0 + queue
    t.first_token = t.scheduled + prefill
    t.finished = t.first_token + decode
    t.finish_reason = "stop"
    return t


FIXED_REQUESTS = (fixed_request(1, 0.00, 0.08, 1.20, 24, 40), fixed_request(2, 0.30, 0.12, 0.90, 60, 32),
                  fixed_request(3, 0.05, 0.40, 2.10, 300, 96))


class FixedMetricsEngine(FakeEngine):
    """The fake engine with metrics that never change: snapshots must not depend on timing."""

    def metrics(self) -> MetricsSnapshot:
        snap = super().metrics()
        return MetricsSnapshot(**{**snap.__dict__, "time": 0.0, "num_requests_running": 1,
                                  "num_requests_waiting": 2, "recent_requests": FIXED_REQUESTS})


@pytest.fixture
def anyio_backend():
    """Textual runs on asyncio."""
    return "asyncio"
