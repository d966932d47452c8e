"""The key reference (F1 or ?): every action of the console and the key that runs it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

KEYS = """\
# picochat keys

| key | action |
|---|---|
| Enter | send the message |
| Ctrl+J (Ctrl+Enter, Shift+Enter where the terminal sends them) | new line in the message |
| Up / Down | previous / next sent message (on the first / last line) |
| Esc | stop the reply (the partial text is kept) |
| Ctrl+R | regenerate the last reply |
| Ctrl+N | new chat (the current one stays saved) |
| F2 | edit the system prompt |
| F3 | show / hide the metrics panel |
| Ctrl+P | command palette: sampling, quant, batch, spec, attention, model, theme, export, load |
| Tab / Shift+Tab | move focus (chat log scrolls with PgUp / PgDn) |
| F1 or ? | this help (? outside the message box) |
| Ctrl+Q | quit |

Transcripts are saved after every turn; `picochat chat --resume` reopens the last one.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q,question_mark", "dismiss", "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90%;
        max-width: 100;
        height: 90%;
        border: round $primary;
        background: $surface;
        padding: 0 1;
    }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(KEYS)
