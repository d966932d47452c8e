"""The console app: opens at once on a loading screen while ``engine_factory(progress)`` runs on
a worker thread, then switches to the chat screen. A PicochatError from the factory is shown as
one line. Themes come from ``picochat.themes``; the chosen one is saved in the user config.
"""

from __future__ import annotations

import gc
from typing import Callable

from textual import work
from textual.app import App
from textual.binding import Binding

from picochat.config import load_user_config, save_user_config
from picochat.engine.protocol import Engine
from picochat.errors import PicochatError
from picochat.themes import DEFAULT_THEME, VARIABLE_DEFAULTS, console_css, load_themes
from picochat.tui import transcript
from picochat.tui.commands import ConsoleCommands
from picochat.tui.messages import EngineFailed, EngineReady, LoadProgress
from picochat.tui.screens.chat import ChatScreen
from picochat.tui.screens.help import HelpScreen
from picochat.tui.screens.loading import LoadingScreen
from picochat.progress import ProgressFn

EngineFactory = Callable[[ProgressFn], Engine]
METRICS_INTERVAL_S = 0.5  # panels sample twice a second (as nvitop does); each sample repaints them
class PicochatApp(App):
    TITLE = "picochat"
    CSS = console_css()
    COMMANDS = App.COMMANDS | {ConsoleCommands}
    BINDINGS = [Binding("f1", "help", "Help"), Binding("question_mark", "help", "Help", show=False)]

    def __init__(self, engine_factory: EngineFactory, *, resume: bool = False,
                 metrics_interval: float | None = METRICS_INTERVAL_S) -> None:
        super().__init__()
        self.engine_factory = engine_factory
        self.resume = resume
        self.metrics_interval = metrics_interval
        self.engine: Engine | None = None
        themes = load_themes()
        self.console_themes = [theme.name for theme in themes]
        for theme in themes:
            self.register_theme(theme)
        self.theme = self._configured_theme()

    def _configured_theme(self) -> str:
        try:
            name = load_user_config().get("theme", DEFAULT_THEME)
        except PicochatError:
            return DEFAULT_THEME
        return name if name in self.available_themes else DEFAULT_THEME

    def get_theme_variable_defaults(self) -> dict[str, str]:
        return VARIABLE_DEFAULTS

    def set_theme(self, name: str) -> None:
        """Switch theme and remember it for the next start."""
        self.theme = name
        try:
            save_user_config({**load_user_config(), "theme": name})
        except PicochatError as e:
            self.notify(str(e), title="Theme not saved", severity="warning")

    def on_mount(self) -> None:
        self.push_screen(LoadingScreen())
        self._load_engine()

    @work(thread=True, group="engine", exit_on_error=False)
    def _load_engine(self) -> None:
        try:
            engine = self.engine_factory(lambda text, fraction: self.post_message(LoadProgress(text, fraction)))
        except PicochatError as e:
            self.post_message(EngineFailed(str(e)))
        else:
            self.post_message(EngineReady(engine))

    def on_load_progress(self, message: LoadProgress) -> None:
        if isinstance(self.screen, LoadingScreen):
            self.screen.set_progress(message.description, message.fraction)

    def on_engine_failed(self, message: EngineFailed) -> None:
        if isinstance(self.screen, LoadingScreen):
            self.screen.show_error(message.error)

    def on_engine_ready(self, message: EngineReady) -> None:
        self.engine = message.engine
        resumed = transcript.latest() if self.resume else None
        if self.resume and resumed is None:
            self.notify("No saved chat to resume: starting a new one.")
        chat = resumed or transcript.Transcript(model=self.engine.info.model)
        self.switch_screen(ChatScreen(self.engine, chat, self.metrics_interval))
        # what is loaded by now lives as long as the app: out of the collector's way, a full
        # collection while a reply streams stalled the UI for 58-65 ms (26 ms at most after this)
        self.call_after_refresh(gc.freeze)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def close_engine(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def make_app(engine_factory: EngineFactory, *, resume: bool = False,
             metrics_interval: float | None = METRICS_INTERVAL_S) -> PicochatApp:
    """The console, for the CLI and for tests (``metrics_interval=None``: no polling thread)."""
    return PicochatApp(engine_factory, resume=resume, metrics_interval=metrics_interval)


def run(engine_factory: EngineFactory, *, resume: bool = False) -> None:
    """Open the console; returns when the user quits. The engine is closed on the way out."""
    app = make_app(engine_factory, resume=resume)
    try:
        app.run()
    finally:
        app.close_engine()
