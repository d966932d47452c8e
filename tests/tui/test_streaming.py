"""pump(): deltas are batched into at most a few chunks a second, nothing is lost."""

from __future__ import annotations

from picochat.engine.protocol import Delta, Stream
from picochat.tui.messages import ReplyChunk, ReplyFinished
from picochat.tui.streaming import pump


def test_queued_deltas_are_batched_and_complete():
    stream = Stream("r1")
    words = [f" w{i}" for i in range(500)]
    for i, word in enumerate(words):
        stream._put(Delta("r1", word, (i,)))
    stream._put(Delta("r1", "", (), finish_reason="length"))
    posted = []
    pump(stream, posted.append, max_rate_hz=1.0)  # one flush, then the rest within the same second
    chunks = [m for m in posted if isinstance(m, ReplyChunk)]
    assert "".join(c.text for c in chunks) == "".join(words)
    assert len(chunks) <= 2
    assert isinstance(posted[-1], ReplyFinished) and posted[-1].finish_reason == "length"
