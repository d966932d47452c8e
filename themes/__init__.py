"""Console themes: one TOML file per Textual ``Theme`` and the console stylesheet.

Each ``*.toml`` holds the keyword arguments of :class:`textual.theme.Theme` (``name``, colours,
``dark``, a ``[variables]`` table). ``console.tcss`` styles the app using the theme's
``$variables``; the timeline and plot colours are the custom variables ``$queue-color``,
``$prefill-color`` and ``$decode-color``, defaulted by :data:`VARIABLE_DEFAULTS` for themes that
do not set them. Read through importlib.resources so it works from an installed wheel.
"""

from __future__ import annotations

import tomllib
from importlib import resources

from textual.theme import Theme

DEFAULT_THEME = "dark"
VARIABLE_DEFAULTS = {"queue-color": "#d7af00", "prefill-color": "#d75f5f", "decode-color": "#5f87d7"}


def load_themes() -> list[Theme]:
    """Every theme shipped in this package, sorted by name."""
    folder = resources.files(__name__)
    themes = []
    for entry in folder.iterdir():
        if entry.name.endswith(".toml"):
            themes.append(Theme(**tomllib.loads(entry.read_text(encoding="utf-8"))))
    return sorted(themes, key=lambda theme: theme.name)


def console_css() -> str:
    """The console's stylesheet."""
    return resources.files(__name__).joinpath("console.tcss").read_text(encoding="utf-8")
