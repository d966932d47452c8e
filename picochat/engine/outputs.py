"""Turns sampled token ids into the text a request streams: incremental detokenization, stop
token ids and stop strings (text held back while it may still turn into a stop string, and the
stop string itself never emitted), as vLLM defines them."""

from __future__ import annotations

from picochat.engine.request import Request


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def on_token(self, req: Request, token: int) -> tuple[str, str | None]:
        """Text to emit for ``token`` (already appended) and a finish reason, if it ends the request."""
        if token in req.stop_token_ids:
            return "", "stop"
        if req.detokenizer is None:
            from picochat.model.detokenizer import IncrementalDetokenizer
            req.detokenizer = IncrementalDetokenizer(self.tokenizer)
        new = req.detokenizer.add([token])
        stops = req.params.stop
        if not stops:
            return new, None
        text = req.held_text + new
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            req.held_text, req.detokenizer = "", None  # what follows a stop string is dropped
            return text[:min(hits)], "stop"
        keep = max(len(s) for s in stops) - 1
        cut = max(len(text) - keep, 0)
        req.held_text = text[cut:]
        return text[:cut], None

    def flush(self, req: Request) -> str:
        """Text still held when the request ends."""
        tail = req.detokenizer.flush() if req.detokenizer is not None else ""
        text, req.held_text = req.held_text + tail, ""
        return text
