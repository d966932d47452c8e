"""The system prompt editor: a TextArea in a dialog; Ctrl+S saves, Esc discards."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, TextArea


class SystemPromptScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Discard"), Binding("ctrl+s", "save", "Save")]
    DEFAULT_CSS = """
    SystemPromptScreen { align: center middle; }
    SystemPromptScreen > Vertical {
        width: 90%;
        height: 70%;
        border: round $primary;
        background: $surface;
        padding: 0 1;
    }
    SystemPromptScreen TextArea { height: 1fr; }
    SystemPromptScreen Label { color: $text-muted; }
    """

    def __init__(self, current: str) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("System prompt (applies to the next request) · Ctrl+S save · Esc discard")
            yield TextArea(self.current, soft_wrap=True, tab_behavior="focus")

    def action_save(self) -> None:
        self.dismiss(self.query_one(TextArea).text.strip())
