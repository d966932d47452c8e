"""The scrolling conversation: one MessageView per message, following the newest text unless
the user has scrolled up to read something older (scrolling back to the bottom follows again).

Following is done here rather than with ``Widget.anchor()``, which scrolls to a negative offset
when the conversation is shorter than the window (Textual 8.2).
"""

from __future__ import annotations

from textual import events
from textual.containers import VerticalScroll

from picochat.tui.transcript import Message
from picochat.tui.widgets.message_view import MessageView


class ChatLog(VerticalScroll):
    DEFAULT_CSS = """
    ChatLog {
        padding: 0 1;
        scrollbar-size-vertical: 1;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.following = True  # keep the newest text in view

    async def show(self, messages: list[Message]) -> None:
        """Replace the log with these messages."""
        await self.remove_children()
        await self.mount_all([MessageView.of(m) for m in messages])
        self.following = True

    async def add(self, view: MessageView) -> MessageView:
        await self.mount(view)
        self.following = True
        return view

    def on_resize(self, event: events.Resize) -> None:
        if self.following:  # the content grew (or the window changed): stay at the bottom
            self.scroll_end(animate=False, immediate=True)

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        self.following = new_value >= self.max_scroll_y - 1

    @property
    def last(self) -> MessageView | None:
        views = self.query(MessageView)
        return views.last() if views else None
