"""One chat message: a role label over Markdown, with a stats line under assistant replies.

An assistant reply grows while it streams: :meth:`MessageView.append` feeds text through
Textual's MarkdownStream, which coalesces fragments that arrive while a repaint is running, so
only the last Markdown block is re-parsed and nothing flickers.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown
from textual.widgets.markdown import MarkdownStream

from picochat.tui.transcript import Message, Role


class MessageView(Vertical):
    DEFAULT_CSS = """
    MessageView {
        height: auto;
        margin: 0 0 1 0;
    }
    MessageView > .role {
        text-style: bold;
        color: $secondary;
    }
    MessageView.-assistant > .role {
        color: $primary;
    }
    MessageView > Markdown {
        margin: 0;
        padding: 0 0 0 1;
        background: transparent;
    }
    MessageView > .stats {
        color: $text-muted;
        padding: 0 0 0 1;
    }
    MessageView.-streaming > .stats {
        color: $accent;
    }
    """

    def __init__(self, role: Role, text: str = "", stats: str = "") -> None:
        super().__init__(classes=f"-{role}")
        self.role = role
        self._text = text
        self._stats = stats
        self._stream: MarkdownStream | None = None

    @classmethod
    def of(cls, message: Message) -> "MessageView":
        return cls(message.role, message.content, message.stats.summary() if message.stats else "")

    def compose(self) -> ComposeResult:
        yield Label("You" if self.role == "user" else "Assistant", classes="role")
        yield Markdown(self._text)
        stats = Label(self._stats, classes="stats")
        stats.display = bool(self._stats)
        yield stats

    @property
    def text(self) -> str:
        return self._text

    async def append(self, fragment: str) -> None:
        """Add streamed text to the reply."""
        self._text += fragment
        if self._stream is None:
            self.add_class("-streaming")
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        await self._stream.write(fragment)

    async def finish(self, stats: str) -> None:
        """The reply is complete: flush the stream and show how it was generated."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.remove_class("-streaming")
        self.set_stats(stats)

    def set_stats(self, stats: str) -> None:
        self._stats = stats
        label = self.query_one(".stats", Label)
        label.update(stats)
        label.display = bool(stats)
