"""Textual messages that carry engine events to the widgets (posted from worker threads)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from picochat.engine.protocol import Engine, FinishReason, MetricsSnapshot, RequestTimings


@dataclass
class LoadProgress(Message):
    """The engine factory reported progress (fraction None: indeterminate)."""

    description: str
    fraction: float | None


@dataclass
class EngineReady(Message):
    engine: Engine


@dataclass
class EngineFailed(Message):
    """The engine could not be built; ``error`` is a one-line message."""

    error: str


@dataclass
class ReplyChunk(Message):
    """Text generated since the previous chunk (several deltas batched)."""

    request_id: str
    text: str
    # the same text cut into (fragment, came from an accepted draft token) runs
    segments: tuple[tuple[str, bool], ...] = ()


@dataclass
class ReplyFinished(Message):
    request_id: str
    finish_reason: FinishReason
    timings: RequestTimings | None
    error: str | None


@dataclass
class MetricsUpdated(Message):
    snapshot: MetricsSnapshot
