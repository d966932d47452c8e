"""Transcripts: JSON round trip, atomic saves in the XDG data dir, latest(), exports."""

from __future__ import annotations

import json
import os

from picochat.tui import transcript
from picochat.tui.transcript import Message, ReplyStats, Transcript


def sample() -> Transcript:
    return Transcript(model="m", system_prompt="be kind", messages=[
        Message("user", "hi ünïcode"), Message("assistant", "**hello**", ReplyStats("cancelled", 3, 7, 0.2, 12.5))])


def test_round_trip_and_chat_messages():
    chat = sample()
    again = Transcript.from_json(chat.to_json())
    assert again == chat
    assert again.chat_messages() == [{"role": "system", "content": "be kind"},
                                     {"role": "user", "content": "hi ünïcode"},
                                     {"role": "assistant", "content": "**hello**"}]


def test_save_is_atomic_and_latest_finds_the_newest(xdg_dirs):
    older, newer = sample(), sample()
    older.save()
    path = newer.save()
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 10))
    (transcript.transcripts_dir() / "junk.json").write_text("{not json")
    assert path.parent == xdg_dirs / "data" / "picochat" / "transcripts"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert transcript.latest().id == newer.id


def test_latest_is_none_without_transcripts():
    assert transcript.latest() is None


def test_exports(xdg_dirs):
    chat = sample()
    markdown = chat.export("markdown").read_text()
    assert "## User\n\nhi ünïcode" in markdown and "7 tokens" in markdown and "cancelled" in markdown
    data = json.loads(chat.export("json").read_text())
    assert data["messages"][1]["stats"]["output_tokens"] == 7


def test_stats_summary_from_timings():
    from picochat.engine.protocol import RequestTimings

    t = RequestTimings("r", arrival=0.0, prompt_tokens=5, scheduled=0.1, first_token=0.3, finished=1.3,
                       output_tokens=11)
    stats = ReplyStats.from_timings("stop", t)
    assert stats.summary() == "11 tokens · TTFT 300 ms · 10.0 tok/s"
    assert ReplyStats.from_timings("error", None).summary() == "0 tokens · error"
