"""OpenAI response bodies: whole responses and SSE chunks for chat and legacy completions.

``data: {json}\\n\\n`` per chunk, a usage-only chunk (empty ``choices``) when the client asked
``stream_options.include_usage``, then ``data: [DONE]``. vLLM's ``return_token_ids`` adds
``token_ids`` to each choice.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from picochat.engine.protocol import FinishReason

DONE = b"data: [DONE]\n\n"
# the engine's reasons → OpenAI's (vLLM reports a cancelled request as "abort")
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


@dataclass(frozen=True)
class ResponseShape:
    """What one request's response looks like: chat or legacy completion, with ids or not."""

    chat: bool
    model: str
    return_token_ids: bool = False
    id: str = ""
    created: int = 0

    @classmethod
    def new(cls, chat: bool, model: str, return_token_ids: bool) -> "ResponseShape":
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(chat, model, return_token_ids, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    def _envelope(self, chunk: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, text: str, token_ids: list[int] | tuple[int, ...], finish: FinishReason | None,
                chunk: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if not self.chat:
            choice["text"] = text
        elif chunk:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = None
        choice["finish_reason"] = None if finish is None else FINISH_REASONS[finish]
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return choice

    def role_chunk(self) -> bytes:
        """The first chat chunk: the assistant role and no content yet."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return sse(self._envelope(True, [choice]))

    def chunk(self, text: str, token_ids: tuple[int, ...], finish: FinishReason | None = None) -> bytes:
        return sse(self._envelope(True, [self._choice(text, token_ids, finish, chunk=True)]))

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return sse({**self._envelope(True, []), "usage": usage(prompt_tokens, completion_tokens)})

    def full(self, text: str, token_ids: list[int], finish: FinishReason, prompt_tokens: int) -> dict[str, Any]:
        body = self._envelope(False, [self._choice(text, token_ids, finish, chunk=False)])
        return {**body, "usage": usage(prompt_tokens, len(token_ids))}


def error_event(message: str) -> bytes:
    """An error in the middle of a stream (the status line has already gone out)."""
    return sse({"error": {"message": message, "type": "internal_error", "param": None, "code": 500}})
