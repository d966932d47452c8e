"""A one-field dialog that validates before closing: the palette's way to set a number.

``parse`` turns the text into a value or raises PicochatError (ConfigError, or ValueError for
text that is not a number); the error is shown under the field and the dialog stays open, so an
invalid entry never replaces the current value. Esc closes it without a value.
"""

from __future__ import annotations

from typing import Any, Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label

from picochat.errors import PicochatError


class ValueDialog(ModalScreen[Any]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]
    DEFAULT_CSS = """
    ValueDialog { align: center middle; }
    ValueDialog > Vertical {
        width: 60;
        max-width: 95%;
        height: auto;
        border: round $primary;
        background: $surface;
        padding: 0 1;
    }
    ValueDialog #error { color: $error; }
    ValueDialog #hint { color: $text-muted; }
    """

    def __init__(self, title: str, current: str, parse: Callable[[str], Any], hint: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.current = current
        self.parse = parse
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text)
            yield Input(self.current, select_on_focus=True)
            yield Label(self.hint or "Enter to apply · Esc to cancel", id="hint")
            yield Label("", id="error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        try:
            value = self.parse(event.value.strip())
        except (PicochatError, ValueError) as e:
            self.query_one("#error", Label).update(str(e))
            return
        self.dismiss(value)
