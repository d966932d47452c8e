"""Chat transcripts: the conversation the console shows, saved as JSON after every turn.

A :class:`Transcript` is the system prompt plus the user and assistant messages, each assistant
message with its generation stats. ``save()`` writes atomically (temp file + rename) into
``<XDG data dir>/picochat/transcripts/``, so killing the process between turns loses nothing;
``latest()`` finds the most recently saved one for ``picochat chat --resume``. ``export()`` writes
a Markdown or JSON copy into ``<XDG data dir>/picochat/exports/``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from picochat.config import atomic_write_text, data_dir
from picochat.engine.protocol import ChatMessage, FinishReason, RequestTimings
from picochat.tui.format import duration

Role = Literal["user", "assistant"]
ExportFormat = Literal["markdown", "json"]


@dataclass
class ReplyStats:
    """How an assistant message was generated."""

    finish_reason: FinishReason
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    decode_tok_s: float | None = None

    @classmethod
    def from_timings(cls, reason: FinishReason, timings: RequestTimings | None) -> "ReplyStats":
        if timings is None:
            return cls(reason)
        return cls(reason, timings.prompt_tokens, timings.output_tokens, timings.ttft_s, timings.decode_tok_s)

    def summary(self) -> str:
        parts = [f"{self.output_tokens} tokens"]
        if self.ttft_s is not None:
            parts.append(f"TTFT {duration(self.ttft_s)}")
        if self.decode_tok_s is not None:
            parts.append(f"{self.decode_tok_s:.1f} tok/s")
        if self.finish_reason != "stop":
            parts.append(self.finish_reason)
        return " · ".join(parts)


@dataclass
class Message:
    role: Role
    content: str
    stats: ReplyStats | None = None


@dataclass
class Transcript:
    id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])
    model: str = ""
    system_prompt: str = ""
    messages: list[Message] = field(default_factory=list)

    def chat_messages(self) -> list[ChatMessage]:
        """The conversation as the engine takes it, system prompt first."""
        chat = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return chat + [{"role": m.role, "content": m.content} for m in self.messages]

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Transcript":
        data = json.loads(text)
        messages = [Message(m["role"], m["content"], ReplyStats(**m["stats"]) if m.get("stats") else None)
                    for m in data.pop("messages")]
        return cls(**data, messages=messages)

    def save(self) -> Path:
        path = transcripts_dir() / f"{self.id}.json"
        atomic_write_text(path, self.to_json())
        return path

    def to_markdown(self) -> str:
        lines = [f"# Chat {self.id}", "", f"Model: `{self.model}`", ""]
        if self.system_prompt:
            lines += ["## System", "", self.system_prompt, ""]
        for message in self.messages:
            lines += [f"## {message.role.capitalize()}", "", message.content, ""]
            if message.stats is not None:
                lines += [f"*{message.stats.summary()}*", ""]
        return "\n".join(lines)

    def export(self, fmt: ExportFormat) -> Path:
        suffix, text = ("md", self.to_markdown()) if fmt == "markdown" else ("json", self.to_json())
        path = data_dir() / "exports" / f"{self.id}.{suffix}"
        atomic_write_text(path, text)
        return path


def transcripts_dir() -> Path:
    return data_dir() / "transcripts"


def latest() -> Transcript | None:
    """The most recently saved transcript that still parses, or None."""
    paths = sorted(transcripts_dir().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in paths:
        try:
            return Transcript.from_json(path.read_text(encoding="utf-8"))
        except (ValueError, KeyError, TypeError):  # a file from elsewhere: skip it
            continue
    return None
