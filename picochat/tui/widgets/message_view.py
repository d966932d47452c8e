"""One chat message: a role label over Markdown, with a stats line under assistant replies.

With speculative decoding, the reply can instead be shown as plain text with the tokens that came
from accepted draft proposals highlighted (:meth:`show_drafts`, toggled from the chat screen).

An assistant reply grows while it streams: :meth:`MessageView.append` feeds text through
Textual's MarkdownStream, which coalesces fragments that arrive while a repaint is running, so
only the last Markdown block is re-parsed and nothing flickers.
"""

from __future__ import annotations

from markdown_it import MarkdownIt
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from picochat.tui.transcript import Message, Role


class GrowingParagraph(Markdown.BLOCKS["paragraph_open"]):  # Textual's paragraph, not exported
    """A Markdown paragraph that asks for a layout only when new text changes its height.

    Textual re-arranges every widget on the screen for each layout, at ~70 µs a widget (15 ms a
    repaint with 20 messages in the log), and a streamed reply's last paragraph grows several
    times a second but wraps onto a new line only every dozen tokens or so."""

    def set_content(self, content: Content) -> None:
        self._content = content
        # from the size of the last layout (``content_size`` would look the region up in a map
        # of the whole screen, which each layout rebuilds)
        size = self.outer_size - self.styles.gutter.totals
        self.update(content, layout=False)
        if size.width <= 0 or self.get_content_height(size, size, size.width) != size.height:
            self.refresh(layout=True)


class ReplyMarkdown(Markdown):
    BLOCKS = {**Markdown.BLOCKS, "paragraph_open": GrowingParagraph}


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
    MessageView > .drafts {
        padding: 0 0 0 1;
        display: none;
    }
    MessageView.-drafts > .drafts {
        display: block;
    }
    MessageView.-drafts > Markdown {
        display: none;
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
        self._segments: list[tuple[str, bool]] = [(text, False)] if text else []

    @classmethod
    def of(cls, message: Message) -> "MessageView":
        return cls(message.role, message.content, message.stats.summary() if message.stats else "")

    def compose(self) -> ComposeResult:
        yield Label("You" if self.role == "user" else "Assistant", classes="role")
        # one parser for the reply's life: Markdown.append builds a new one (0.4 ms) per chunk otherwise
        parser = MarkdownIt("gfm-like")
        yield ReplyMarkdown(self._text, parser_factory=lambda: parser)
        yield Static(classes="drafts")
        stats = Label(self._stats, classes="stats")
        stats.display = bool(self._stats)
        yield stats

    @property
    def text(self) -> str:
        return self._text

    def show_drafts(self, on: bool) -> None:
        """Show the reply as text with accepted draft tokens highlighted, or as Markdown."""
        self.set_class(on, "-drafts")
        if on:
            self._render_drafts()

    def _render_drafts(self) -> None:
        text = Text()
        for fragment, drafted in self._segments:
            text.append(fragment, style="reverse" if drafted else "")
        self.query_one(".drafts", Static).update(text)

    async def append(self, fragment: str, segments: tuple[tuple[str, bool], ...] = ()) -> None:
        """Add streamed text to the reply (``segments``: the same text split by draft origin)."""
        self._text += fragment
        self._segments.extend(segments or ((fragment, False),))
        if self.has_class("-drafts"):
            self._render_drafts()
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
