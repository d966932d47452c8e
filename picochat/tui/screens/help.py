"""The key reference (F1 or ?): every action of the console and the key that runs it."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = (
    ("Enter", "send the message"),
    ("Ctrl+J", "new line in the message (also Ctrl+Enter / Shift+Enter where the terminal sends them)"),
    ("Up / Down", "previous / next sent message (on the first / last line of the message)"),
    ("Esc", "stop the reply; the text so far is kept"),
    ("Ctrl+R", "regenerate the last reply"),
    ("Ctrl+N", "new chat (the current one stays saved)"),
    ("F2", "edit the system prompt"),
    ("F3", "show / hide the metrics panel"),
    ("F4", "highlight tokens from accepted speculative drafts"),
    ("Ctrl+P", "command palette: sampling, quant, batch, spec, attention, model, theme, export, load"),
    ("Tab", "move focus; PgUp / PgDn scroll the focused chat log"),
    ("F1 or ?", "this help (? outside the message box)"),
    ("Ctrl+Q", "quit"),
)
FOOTNOTE = "Chats are saved after every turn; picochat chat --resume reopens the last one."


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q,question_mark", "dismiss", "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90%;
        max-width: 96;
        height: auto;
        max-height: 90%;
        border: round $primary;
        border-title-style: bold;
        background: $surface;
        padding: 0 1;
    }
    HelpScreen Static { height: auto; }
    HelpScreen #footnote { color: $text-muted; margin-top: 1; }
    """

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=False, padding=(0, 2, 0, 0), expand=True)
        table.add_column(style="bold", no_wrap=True)
        table.add_column(ratio=1)
        for key, action in KEYS:
            table.add_row(key, action)
        with VerticalScroll() as scroll:
            scroll.border_title = "picochat keys · Esc closes"
            yield Static(table)
            yield Static(FOOTNOTE, id="footnote")
