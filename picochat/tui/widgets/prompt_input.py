"""The message editor: a multi-line TextArea where Enter sends and Ctrl+J inserts a newline.

Ctrl+J works in every terminal (it is a plain line feed); Ctrl+Enter and Shift+Enter also insert
a newline where the terminal reports them. Up on the first line and Down on the last line walk
through the messages sent before, like a shell history.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.message import Message
from textual.widgets import TextArea

NEWLINE_KEYS = ("ctrl+j", "ctrl+enter", "shift+enter")


class PromptInput(TextArea):
    DEFAULT_CSS = """
    PromptInput {
        height: auto;
        min-height: 3;
        max-height: 8;
        border: round $primary 50%;
    }
    PromptInput:focus {
        border: round $primary;
    }
    """

    @dataclass
    class Submitted(Message):
        """The user pressed Enter on a non-empty message."""

        prompt_input: "PromptInput"
        text: str

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, soft_wrap=True, show_line_numbers=False, tab_behavior="focus")
        self.sent: list[str] = []  # messages sent, oldest first (Up / Down recall them)
        self._history_index = 0  # == len(sent): editing a new message
        self._draft = ""

    def set_sent(self, messages: list[str]) -> None:
        """Start the Up / Down history from these messages (a resumed chat)."""
        self.sent = list(messages)
        self._history_index = len(self.sent)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self._submit()
        elif event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
        elif event.key == "up" and self.cursor_location[0] == 0 and self._history_index > 0:
            event.stop()
            event.prevent_default()
            self._recall(self._history_index - 1)
        elif (event.key == "down" and self.cursor_location[0] == self.document.line_count - 1
              and self._history_index < len(self.sent)):
            event.stop()
            event.prevent_default()
            self._recall(self._history_index + 1)
        else:
            await super()._on_key(event)

    def _submit(self) -> None:
        text = self.text.strip()
        if not text:
            return
        if not self.sent or self.sent[-1] != text:
            self.sent.append(text)
        self._history_index = len(self.sent)
        self._draft = ""
        self.clear()
        self.post_message(self.Submitted(self, text))

    def _recall(self, index: int) -> None:
        if self._history_index == len(self.sent):
            self._draft = self.text
        self._history_index = index
        self.text = self.sent[index] if index < len(self.sent) else self._draft
        self.move_cursor(self.document.end)
