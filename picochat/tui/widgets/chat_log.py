"""The scrolling conversation: one MessageView per message, kept scrolled to the newest."""

from __future__ import annotations

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

    async def show(self, messages: list[Message]) -> None:
        """Replace the log with these messages."""
        await self.remove_children()
        await self.mount_all([MessageView.of(m) for m in messages])
        self.anchor()

    async def add(self, view: MessageView) -> MessageView:
        await self.mount(view)
        self.anchor()
        return view

    @property
    def last(self) -> MessageView | None:
        views = self.query(MessageView)
        return views.last() if views else None
