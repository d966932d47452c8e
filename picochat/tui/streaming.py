"""Reading a Stream on a worker thread and handing it to the UI at a capped rate.

Deltas can arrive hundreds of times a second; repainting Markdown that often costs the engine
CPU time and makes the screen flicker. :func:`pump` joins the deltas that arrive within one
repaint interval into one :class:`ReplyChunk`, so the UI sees at most ``max_rate_hz`` chunks a
second, then one :class:`ReplyFinished`.
"""

from __future__ import annotations

import time
from typing import Callable

from textual.message import Message

from picochat.engine.protocol import Stream
from picochat.tui.messages import ReplyChunk, ReplyFinished

# 15, not 25: on 2 cores the repaints' CPU came out of the engine's (benchmarks/console.py, bf16,
# one run each: console / headless decode 0.82 at 25 a second, 0.88 at 15; keystroke max 100 -> 42 ms)
MAX_REPAINTS_PER_S = 15.0


def pump(stream: Stream, post: Callable[[Message], object], max_rate_hz: float = MAX_REPAINTS_PER_S) -> None:
    """Post the stream's text as batched chunks, then its end. Blocks until the stream ends."""
    interval = 1.0 / max_rate_hz
    pending: list[tuple[str, bool]] = []
    next_flush = time.perf_counter()
    while True:
        wait = max(0.0, next_flush - time.perf_counter()) if pending else None
        delta = stream.get(timeout=wait)
        if delta is not None and delta.text:
            pending.append((delta.text, any(delta.accepted_draft)))
        now = time.perf_counter()
        if pending and (now >= next_flush or (delta is not None and delta.finished)):
            text = "".join(fragment for fragment, _ in pending)
            segments = tuple(pending)
            pending.clear()
            post(ReplyChunk(stream.request_id, text, segments))
            next_flush = now + interval
        if delta is not None and delta.finished:
            post(ReplyFinished(stream.request_id, delta.finish_reason, delta.timings, delta.error))
            return
