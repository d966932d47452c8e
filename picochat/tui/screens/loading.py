"""The first screen: progress while the engine factory loads (or fetches) the model, or the
one-line reason it could not."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Center, Middle
from textual.screen import Screen
from textual.widgets import Label, ProgressBar


class LoadingScreen(Screen):
    BINDINGS = [Binding("q", "app.quit", "Quit")]
    DEFAULT_CSS = """
    LoadingScreen Label { width: auto; margin: 1 0; }
    LoadingScreen #title { text-style: bold; color: $primary; }
    LoadingScreen #error { color: $error; text-style: bold; }
    """

    def compose(self) -> ComposeResult:
        with Middle():
            with Center():
                yield Label("picochat", id="title")
            with Center():
                yield Label("starting…", id="description")
            with Center():
                yield ProgressBar(total=None, show_eta=False, id="progress")
            with Center():
                yield Label("", id="error")

    def set_progress(self, description: str, fraction: float | None) -> None:
        self.query_one("#description", Label).update(description)
        bar = self.query_one(ProgressBar)
        if fraction is None:
            bar.update(total=None)
        else:
            bar.update(total=1.0, progress=max(0.0, min(1.0, fraction)))

    def show_error(self, error: str) -> None:
        self.query_one(ProgressBar).display = False
        self.query_one("#error", Label).update(f"{error}\n\npress q to quit")
