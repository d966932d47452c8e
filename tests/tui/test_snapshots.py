"""Snapshot tests of the console: main screen (each theme), command palette and help.

Deterministic by construction: the conversation is a saved transcript (resumed, so reply stats
are fixed), metrics come from FixedMetricsEngine and are pushed by hand (no polling thread), and
the cursor does not blink. Update with ``pytest tests/tui/test_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

import pytest
from textual.command import CommandPalette
from textual.widgets import OptionList

from conftest import FixedMetricsEngine, open_chat, wait_until
from picochat.tui.app import make_app
from picochat.tui.messages import MetricsUpdated
from picochat.tui.transcript import Message, ReplyStats, Transcript
from picochat.tui.widgets.prompt_input import PromptInput

REPLY = """A **KV cache** keeps each layer's keys and values, so decoding a token costs one row:

```python
cache.append(k, v)
```

- prefill: the whole prompt at once
- decode: one token per step"""


@pytest.fixture
def resumable_chat():
    Transcript(id="snapshot", model="fake-model", system_prompt="Be brief.", messages=[
        Message("user", "What does a KV cache do?"),
        Message("assistant", REPLY, ReplyStats("stop", 32, 48, 0.12, 41.5)),
    ]).save()


def console_app(theme: str = "dark"):
    app = make_app(lambda progress: FixedMetricsEngine(), resume=True, metrics_interval=None)
    app.theme = theme
    return app


async def show_chat(pilot) -> None:
    screen = await open_chat(pilot)
    screen.query_one(PromptInput).cursor_blink = False
    engine = screen.engine
    for _ in range(4):
        screen.post_message(MetricsUpdated(engine.metrics()))
    await pilot.pause()
    await pilot.pause()


@pytest.mark.parametrize("theme,size", [("dark", (80, 24)), ("dark", (120, 34)), ("light", (120, 34)),
                                        ("high-contrast", (120, 34))])
def test_main_screen(snap_compare, resumable_chat, theme, size):
    assert snap_compare(console_app(theme), terminal_size=size, run_before=show_chat)


def test_palette(snap_compare, resumable_chat):
    async def open_palette(pilot):
        await show_chat(pilot)
        await pilot.press("ctrl+p", *"sampling")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, CommandPalette)
                         and pilot.app.screen.query_one(OptionList).option_count >= 9, "palette hits")
        pilot.app.screen.query_one("CommandInput").cursor_blink = False
        await pilot.pause()

    assert snap_compare(console_app(), terminal_size=(100, 30), run_before=open_palette)


def test_help(snap_compare, resumable_chat):
    async def open_help(pilot):
        await show_chat(pilot)
        await pilot.press("f1")
        await pilot.pause()

    assert snap_compare(console_app(), terminal_size=(100, 30), run_before=open_help)
