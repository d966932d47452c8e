"""Pilot tests of the console on the fake engine: chatting, cancelling, the palette, export,
themes, resume and the loading screen."""

from __future__ import annotations

import dataclasses
import gc
import json
import threading

import pytest
from textual._compositor import Compositor
from textual.command import CommandPalette
from textual.widgets import OptionList

from conftest import FixedMetricsEngine, console, open_chat, send, wait_reply_done, wait_until
from fake_engine import DEFAULT_REPLY, FakeEngine
from picochat.config import load_user_config
from picochat.errors import ModelLoadError
from picochat.tui import transcript
from picochat.tui.app import make_app
from picochat.tui.messages import MetricsUpdated
from picochat.tui.screens.help import HelpScreen
from picochat.tui.screens.loading import LoadingScreen
from picochat.tui.screens.system_prompt import SystemPromptScreen
from picochat.tui.screens.value_dialog import ValueDialog
from picochat.tui.widgets.chat_log import ChatLog
from picochat.tui.widgets.message_view import GrowingParagraph, MessageView
from picochat.tui.widgets.metric_plot import MetricPlot
from picochat.tui.widgets.prompt_input import PromptInput
from picochat.tui.widgets.request_timeline import RequestTimeline
from picochat.tui.widgets.status_bar import StatusBar

pytestmark = pytest.mark.anyio


async def run_palette_command(pilot, query: str) -> None:
    """Open the palette, type ``query`` and run the best hit once the search shows it."""
    await pilot.press("ctrl+p", *query)

    def best_hit_matches() -> bool:
        palette = pilot.app.screen
        if not isinstance(palette, CommandPalette):
            return False
        hits = palette.query_one(OptionList)
        return hits.option_count > 0 and str(hits.get_option_at_index(0).prompt).startswith(query)

    await wait_until(pilot, best_hit_matches, f"the palette to find {query!r}")
    await pilot.press("enter")
    await pilot.pause()


async def test_message_streams_a_markdown_reply():
    engine = FakeEngine()
    app = console(engine)
    async with app.run_test() as pilot:
        screen = await open_chat(pilot)
        await send(pilot, "hello")
        await wait_reply_done(pilot, screen)
        views = list(screen.query(MessageView))
        assert [v.role for v in views] == ["user", "assistant"]
        assert views[1].text == DEFAULT_REPLY
        assert engine.submitted[0][0] == [{"role": "user", "content": "hello"}]
        code_blocks = screen.query("MarkdownFence")
        assert code_blocks and "print('hi')" in code_blocks.first().code
        saved = transcript.latest()
        assert saved is not None and [m.content for m in saved.messages] == ["hello", DEFAULT_REPLY]


async def test_a_streamed_paragraph_is_laid_out_when_it_wraps_not_at_every_chunk(monkeypatch):
    """Textual re-arranges the whole screen for a layout: a reply streamed word by word ends as
    tall as the same text shown at once, with far fewer layouts than chunks."""
    reply = " ".join(f"word{i}" for i in range(150))  # one paragraph of many lines
    counts = {"reflow": 0, "set_content": 0}
    reflow, set_content = Compositor.reflow, GrowingParagraph.set_content

    def counting_reflow(self, *args, **kwargs):
        counts["reflow"] += 1
        return reflow(self, *args, **kwargs)

    def counting_set_content(self, content):
        counts["set_content"] += 1
        return set_content(self, content)

    monkeypatch.setattr(Compositor, "reflow", counting_reflow)
    monkeypatch.setattr(GrowingParagraph, "set_content", counting_set_content)
    app = console(FakeEngine(reply=reply, token_delay_s=0.03))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_chat(pilot)
        await send(pilot, "go")
        await wait_until(pilot, lambda: screen._reply is not None and screen._reply.text, "the first chunk")
        counts["reflow"] = 0
        await wait_reply_done(pilot, screen)
        await pilot.pause()
        streamed = screen.query(MessageView).last().query_one(GrowingParagraph).content_size
        shown_at_once = await screen.query_one(ChatLog).add(MessageView("assistant", reply))
        await pilot.pause()
        assert streamed.height > 10
        assert shown_at_once.query_one(GrowingParagraph).content_size == streamed
        assert counts["set_content"] > 40 and counts["reflow"] < counts["set_content"] / 2


async def test_what_the_console_loaded_is_kept_out_of_the_collectors_way():
    gc.unfreeze()
    app = console(FakeEngine())
    async with app.run_test() as pilot:
        await open_chat(pilot)
        await wait_until(pilot, lambda: gc.get_freeze_count() > 0, "gc.freeze once the chat screen is up")


async def test_escape_cancels_and_keeps_the_partial_reply():
    engine = FakeEngine(reply=" ".join(f"w{i}" for i in range(400)), token_delay_s=0.01)
    app = console(engine)
    async with app.run_test() as pilot:
        screen = await open_chat(pilot)
        await send(pilot, "count")
        await wait_until(pilot, lambda: screen._reply is not None and len(screen._reply.text) > 10, "some text")
        await pilot.press("escape")
        await wait_reply_done(pilot, screen)
        reply = screen.transcript.messages[-1]
        assert reply.stats.finish_reason == "cancelled"
        assert reply.content.startswith("w0 w1") and len(reply.content.split()) < 400
        assert screen.query(MessageView).last().text == reply.content


async def test_keys_stay_live_while_streaming():
    engine = FakeEngine(reply=" ".join(f"w{i}" for i in range(600)), token_delay_s=0.05)  # ~25 s
    app = console(engine)
    async with app.run_test() as pilot:
        screen = await open_chat(pilot)
        await send(pilot, "go")
        await pilot.press(*"next question")
        assert screen.streaming
        assert screen.query_one(PromptInput).text == "next question"
        await pilot.press("escape")
        await wait_reply_done(pilot, screen)


async def test_palette_temperature_applies_to_the_next_request():
    engine = FakeEngine()
    app = console(engine)
    async with app.run_test() as pilot:
        screen = await open_chat(pilot)
        await run_palette_command(pilot, "sampling: temperature")
        assert isinstance(app.screen, ValueDialog)
        await pilot.press(*"0.25", "enter")  # the current value is selected: typing replaces it
        await wait_until(pilot, lambda: app.screen is screen, "the dialog to close")
        assert screen.sampling.temperature == 0.25
        assert "T=0.25" in str(screen.query_one(StatusBar).render())
        await send(pilot, "hi")
        await wait_reply_done(pilot, screen)
        assert engine.submitted[-1][1].temperature == 0.25


async def test_status_bar_keeps_the_sampling_summary_on_an_80_column_terminal():
    engine = FakeEngine()
    engine._info = dataclasses.replace(engine.info, model="smollm2-135m-instruct", device="cuda",
                                       attention="triton", spec="ngram k=4")
    app = console(engine)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_chat(pilot)
        await run_palette_command(pilot, "sampling: max tokens")
        await pilot.press(*"6", "enter")
        await wait_until(pilot, lambda: app.screen is screen, "the dialog to close")
        bar = screen.query_one(StatusBar)
        shown = "".join(segment.text for segment in bar.render_line(0))
        assert shown.rstrip().endswith("│ T=0.7 · max 6") and "smollm2-135m-instruct" in shown
        assert "…" in shown  # the serving part gave way


async def test_invalid_palette_input_shows_an_error_and_keeps_the_old_value():
    app = console(FakeEngine())
    async with app.run_test() as pilot:
        screen = await open_chat(pilot)
        await run_palette_command(pilot, "sampling: top-p")
        dialog = app.screen
        assert isinstance(dialog, ValueDialog)
        for bad, message in (("1.5", "top_p must be in (0, 1]"), ("abc", "not a valid number")):
            dialog.query_one("Input").value = bad
            await pilot.press("enter")
            await pilot.pause()
            assert app.screen is dialog
            assert message in str(dialog.query_one("#error").render())
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is screen, "the dialog to close")
        assert screen.sampling.top_p == 1.0


async def test_unsupported_setting_is_listed_disabled_with_the_reason():
    engine = FakeEngine()
    app = console(engine)
    async with app.run_test() as pilot:
        await open_chat(pilot)
        await run_palette_command(pilot, "spec: n-gram")
        await pilot.pause()
        assert engine.reconfigured == []
        assert any("not available in the fake engine" in str(n.message) for n in app._notifications)


async def test_engine_setting_goes_through_reconfigure():
    engine = FakeEngine()
    app = console(engine)
    async with app.run_test() as pilot:
        await open_chat(pilot)
        await run_palette_command(pilot, "quant: int8")
        await app.workers.wait_for_complete()
        assert engine.reconfigured[-1]["quant"].mode == "int8"


async def test_export_writes_the_turn(xdg_dirs):
    app = console(FakeEngine())
    async with app.run_test() as pilot:
        screen = await open_chat(pilot)
        await send(pilot, "export me")
        await wait_reply_done(pilot, screen)
        await run_palette_command(pilot, "export: transcript as Markdown")
        await run_palette_command(pilot, "export: transcript as JSON")
    exports = xdg_dirs / "data" / "picochat" / "exports"
    markdown = next(exports.glob("*.md")).read_text()
    assert "export me" in markdown and "print('hi')" in markdown
    data = json.loads(next(exports.glob("*.json")).read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]


async def test_prompt_that_does_not_fit_is_refused_with_a_message():
    engine = FakeEngine(max_model_len=16)
    app = console(engine)
    async with app.run_test() as pilot:
        screen = await open_chat(pilot)
        long_text = " ".join(["word"] * 40)
        await send(pilot, long_text)
        await pilot.pause()
        assert engine.submitted == [] and screen.transcript.messages == []
        assert screen.query_one(PromptInput).text == long_text  # nothing typed is lost
        assert any("context holds 16" in str(n.message) for n in app._notifications)


async def test_regenerate_and_new_chat():
    engine = FakeEngine(reply="one two")
    app = console(engine)
    async with app.run_test() as pilot:
        screen = await open_chat(pilot)
        await send(pilot, "q")
        await wait_reply_done(pilot, screen)
        first_id = screen.transcript.id
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: len(engine.submitted) == 2, "the second request")
        await wait_reply_done(pilot, screen)
        assert [m.role for m in screen.transcript.messages] == ["user", "assistant"]
        assert len(screen.query(MessageView)) == 2
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert screen.transcript.messages == [] and screen.transcript.id != first_id
        assert len(screen.query(MessageView)) == 0


async def test_input_history_and_newline_key():
    app = console(FakeEngine(reply="ok"))
    async with app.run_test() as pilot:
        screen = await open_chat(pilot)
        await send(pilot, "first")
        await wait_reply_done(pilot, screen)
        prompt = screen.query_one(PromptInput)
        await pilot.press(*"ab", "ctrl+j", *"cd")
        assert prompt.text == "ab\ncd"
        prompt.clear()
        await pilot.press("up")
        assert prompt.text == "first"
        await pilot.press("down")
        assert prompt.text == ""


async def test_resume_reopens_the_last_chat():
    engine = FakeEngine(reply="remembered")
    async with console(engine).run_test() as pilot:
        screen = await open_chat(pilot)
        await send(pilot, "keep this")
        await wait_reply_done(pilot, screen)
    app = console(engine, resume=True)
    async with app.run_test() as pilot:
        screen = await open_chat(pilot)
        assert [v.text for v in screen.query(MessageView)] == ["keep this", "remembered"]
        await pilot.press("up")
        assert screen.query_one(PromptInput).text == "keep this"


async def test_theme_is_persisted():
    app = console(FakeEngine())
    async with app.run_test() as pilot:
        await open_chat(pilot)
        await run_palette_command(pilot, "theme: light")
        assert app.theme == "light"
    assert load_user_config()["theme"] == "light"
    assert console(FakeEngine()).theme == "light"


async def test_loading_screen_shows_progress_then_a_one_line_error():
    release = threading.Event()

    def factory(progress):
        progress("fetching smollm2", 0.5)
        release.wait(10)
        raise ModelLoadError("model file is truncated")

    app = make_app(factory, metrics_interval=None)
    async with app.run_test() as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, LoadingScreen)
                         and "fetching" in str(app.screen.query_one("#description").render()), "progress")
        release.set()
        await wait_until(pilot, lambda: "truncated" in str(app.screen.query_one("#error").render()), "the error")
        assert "Traceback" not in str(app.screen.query_one("#error").render())


async def test_help_and_metrics_panels():
    engine = FixedMetricsEngine()
    app = console(engine)
    async with app.run_test(size=(100, 32)) as pilot:
        screen = await open_chat(pilot)
        screen.post_message(MetricsUpdated(engine.metrics()))
        await pilot.pause()
        assert screen.query_one("#kv", MetricPlot).value_text == "16/64 25%"
        assert screen.query_one("#waiting", MetricPlot).value_text == "2"
        assert [t.request_id for t in screen.query_one(RequestTimeline).requests] == ["req-1", "req-2", "req-3"]
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert app.screen is screen
        await pilot.press("?")  # in the message box, ? is text
        assert screen.query_one(PromptInput).text == "?" and app.screen is screen
        screen.query_one("ChatLog").focus()
        await pilot.press("?")
        assert isinstance(app.screen, HelpScreen)


async def test_load_fires_concurrent_requests():
    engine = FakeEngine(reply="x y z")
    app = console(engine)
    async with app.run_test() as pilot:
        await open_chat(pilot)
        await run_palette_command(pilot, "load: fire N")
        assert isinstance(app.screen, ValueDialog)
        await pilot.press("5", "enter")
        await app.workers.wait_for_complete()
        assert len(engine.submitted) == 5


async def test_system_prompt_editor_applies_to_the_next_request():
    engine = FakeEngine(reply="ok")
    app = console(engine)
    async with app.run_test() as pilot:
        screen = await open_chat(pilot)
        await pilot.press("f2")
        assert isinstance(app.screen, SystemPromptScreen)
        await pilot.press(*"Answer in French.", "ctrl+s")
        await wait_until(pilot, lambda: app.screen is screen, "the editor to close")
        assert screen.transcript.system_prompt == "Answer in French."
        await send(pilot, "hello")
        await wait_reply_done(pilot, screen)
        assert engine.submitted[-1][0][0] == {"role": "system", "content": "Answer in French."}
