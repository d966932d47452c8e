"""Streaming token ids → text for one request, a few tokens at a time.

Decoding one token alone is wrong in two ways: a character can span tokens (byte-level BPE
splits an emoji's UTF-8 bytes, SentencePiece falls back to ``<0xF0>``-style byte tokens), and
decoders drop or add a leading space depending on what precedes a token. So, as vLLM and HF TGI
do, we decode a small window twice: the *prefix* (tokens already shown, kept for context) and
the prefix plus the unread tokens; the new text is the difference. Text is held back while it
ends in U+FFFD (an incomplete character), and the window slides forward after each emission,
so each call costs O(window), not O(output).
"""

from __future__ import annotations

from collections.abc import Sequence

from picochat.model.tokenizer import Tokenizer

# Text is held only while no complete character ends it, which real output resolves within a few
# tokens; a longer run can only be invalid bytes, and is emitted (as U+FFFD) to keep the window small.
_MAX_HELD_TOKENS = 32


class IncrementalDetokenizer:
    """Feed token ids with `add` as they are sampled; call `flush` once when the request ends."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # prefix tokens, then unread tokens
        self._read = 0  # window[:_read] is the prefix, already emitted

    def add(self, token_ids: Sequence[int]) -> str:
        """The text the new tokens complete; "" while a character is still unfinished."""
        if not token_ids:
            return ""  # sliding now would drop the prefix the next token needs for context
        self._window.extend(token_ids)
        text = self._decode(self._window)
        if text.endswith("\ufffd") and len(self._window) - self._read <= _MAX_HELD_TOKENS:
            return ""
        prefix_text = self._decode(self._window[: self._read])
        # The unread tokens become the next prefix.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes to U+FFFD)."""
        prefix_text = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        self._window, self._read = [], 0
        return text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""
