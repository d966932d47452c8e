"""The console's main screen: the conversation, the message editor, the metrics panel, the
request timeline and the status bar, and the turn logic that ties them to the engine.

A turn: the user message is appended to the transcript and saved; the conversation is checked
against the context limit; ``engine.submit`` returns a Stream that a worker thread reads
(:func:`picochat.tui.streaming.pump`), posting batched ReplyChunk messages that grow the reply's
Markdown; ReplyFinished stores the reply with its stats and saves the transcript again. The
engine's own loop runs on its thread, so keys stay live during generation. Metrics are polled
on another worker thread a few times a second.
"""

from __future__ import annotations

import time
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer
from textual.worker import get_current_worker

from picochat.config import SamplingParams
from picochat.engine.protocol import Engine
from picochat.errors import PicochatError
from picochat.tui.messages import MetricsUpdated, ReplyChunk, ReplyFinished
from picochat.tui.screens.system_prompt import SystemPromptScreen
from picochat.tui.streaming import pump
from picochat.tui.transcript import ExportFormat, Message, ReplyStats, Transcript
from picochat.tui.widgets.chat_log import ChatLog
from picochat.tui.widgets.message_view import MessageView
from picochat.tui.widgets.metrics_panel import MetricsPanel
from picochat.tui.widgets.prompt_input import PromptInput
from picochat.tui.widgets.request_timeline import RequestTimeline
from picochat.tui.widgets.status_bar import StatusBar

LOAD_PROMPTS = ("Write a haiku about the sea.", "List three prime numbers.", "What is a KV cache?",
                "Name a colour of the rainbow.", "Count from one to ten.", "Say hello in French.")


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "cancel", "Stop"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("f2", "edit_system_prompt", "System"),
        Binding("f3", "toggle_panel", "Metrics"),
        Binding("f4", "toggle_drafts", "Drafts"),
    ]

    sampling: reactive[SamplingParams] = reactive(SamplingParams, init=False)
    """Sampling settings of the next request (palette: ``sampling:``)."""

    def __init__(self, engine: Engine, transcript: Transcript, metrics_interval: float | None) -> None:
        super().__init__()
        self.engine = engine
        self.transcript = transcript
        self.metrics_interval = metrics_interval
        self.request_id: str | None = None  # the reply streaming now
        self._reply: MessageView | None = None
        self.show_drafts = False  # highlight accepted speculative draft tokens (F4)

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="conversation"):
                yield ChatLog(id="chat-log")
                yield RequestTimeline(id="timeline")
                yield PromptInput(id="prompt")
            yield MetricsPanel(id="metrics")
        yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        await self.query_one(ChatLog).show(self.transcript.messages)
        prompt = self.query_one(PromptInput)
        prompt.border_title = "Enter send · Ctrl+J new line"
        prompt.set_sent([m.content for m in self.transcript.messages if m.role == "user"])
        prompt.focus()
        self.refresh_status()
        self.update_context()
        if self.metrics_interval is not None:
            self._poll_metrics(self.metrics_interval)

    # ------------------------------------------------------------------ status and context
    def watch_sampling(self) -> None:
        self.refresh_status()

    def refresh_status(self) -> None:
        self.query_one(StatusBar).show(self.engine.info, self.sampling)

    def update_context(self, used: int | None = None) -> None:
        """Show how much of the context window the conversation (``used`` tokens) fills."""
        if used is None:
            chat = self.transcript.chat_messages()
            used = self.engine.count_prompt_tokens(chat) if chat else 0
        limit = self.engine.info.max_model_len  # 0: a remote server that does not say
        self.query_one(PromptInput).border_subtitle = (
            f"context {used:,} / {limit:,} ({used / limit:.0%})" if limit else f"context {used:,} / unknown")

    # ------------------------------------------------------------------ turns
    @property
    def streaming(self) -> bool:
        return self.request_id is not None

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        if self.streaming:
            event.prompt_input.text = event.text
            self.notify("A reply is still streaming: Esc stops it.", severity="warning")
            return
        self.transcript.messages.append(Message("user", event.text))
        view = await self.query_one(ChatLog).add(MessageView("user", event.text))
        if not await self._start_reply():
            self.transcript.messages.pop()
            await view.remove()
            event.prompt_input.text = event.text

    async def _start_reply(self) -> bool:
        """Submit the conversation; False (with the reason shown) when it cannot run."""
        prompt = self.transcript.chat_messages()
        needed, limit = self.engine.count_prompt_tokens(prompt), self.engine.info.max_model_len
        if limit and needed + 1 > limit:
            self.notify(f"This turn needs {needed:,} tokens but the context holds {limit:,}: "
                        "shorten it or start a new chat (Ctrl+N).", title="Does not fit", severity="error")
            return False
        try:
            stream = self.engine.submit(prompt, self.sampling)
        except PicochatError as e:
            self.notify(str(e), title="Not sent", severity="error")
            return False
        self.request_id = stream.request_id
        self.update_context(needed)
        self._reply = await self.query_one(ChatLog).add(MessageView("assistant", stats="generating…"))
        self._reply.show_drafts(self.show_drafts)
        self.transcript.save()
        self._read_stream(stream)
        return True

    @work(thread=True, group="reply", exit_on_error=False)
    def _read_stream(self, stream) -> None:
        pump(stream, self.post_message)

    async def on_reply_chunk(self, message: ReplyChunk) -> None:
        if message.request_id == self.request_id and self._reply is not None:
            await self._reply.append(message.text, message.segments)

    async def on_reply_finished(self, message: ReplyFinished) -> None:
        if message.request_id != self.request_id or self._reply is None:
            return
        reply, self._reply, self.request_id = self._reply, None, None
        stats = ReplyStats.from_timings(message.finish_reason, message.timings)
        if message.finish_reason == "error":
            self.notify(message.error or "generation failed", title="Engine error", severity="error")
        if not reply.text and message.finish_reason == "error":
            await reply.remove()
            return
        await reply.finish(stats.summary())
        self.transcript.messages.append(Message("assistant", reply.text, stats))
        self.transcript.save()
        self.update_context()

    def action_cancel(self) -> None:
        """Stop the streaming reply; what was generated so far is kept."""
        if self.request_id is not None:
            self.engine.cancel(self.request_id)

    async def action_regenerate(self) -> None:
        if self.streaming or not self.transcript.messages:
            return
        if self.transcript.messages[-1].role == "assistant":
            self.transcript.messages.pop()
            last = self.query_one(ChatLog).last
            if last is not None:
                await last.remove()
        await self._start_reply()

    async def action_new_chat(self) -> None:
        if self.streaming:
            self.notify("Stop the reply first (Esc).", severity="warning")
            return
        self.transcript = Transcript(model=self.engine.info.model, system_prompt=self.transcript.system_prompt)
        await self.query_one(ChatLog).show([])
        self.update_context()

    def action_edit_system_prompt(self) -> None:
        def apply(text: str | None) -> None:
            if text is None:
                return
            self.transcript.system_prompt = text
            if self.transcript.messages:
                self.transcript.save()
            self.update_context()
            self.notify("System prompt set for the next request.")

        self.app.push_screen(SystemPromptScreen(self.transcript.system_prompt), apply)

    def action_toggle_panel(self) -> None:
        self.toggle_class("-no-panel")

    def action_toggle_drafts(self) -> None:
        """Highlight the reply tokens that came from accepted speculative drafts (or stop)."""
        self.show_drafts = not self.show_drafts
        for view in self.query(MessageView):
            view.show_drafts(self.show_drafts)
        self.notify("Accepted draft tokens highlighted." if self.show_drafts else "Replies shown as Markdown.")

    # ------------------------------------------------------------------ palette actions
    def export(self, fmt: ExportFormat) -> None:
        path = self.transcript.export(fmt)
        self.notify(f"Saved {path}", title="Exported")

    @work(thread=True, group="reconfigure", exit_on_error=False)
    def reconfigure(self, label: str, **changes: Any) -> None:
        """Apply an engine setting off the UI thread (a model switch or quantization takes time)."""
        self.app.call_from_thread(self.notify, f"Applying {label}…")
        try:
            self.engine.reconfigure(**changes)
        except PicochatError as e:
            self.app.call_from_thread(self.notify, str(e), title=label, severity="error")
            return
        self.app.call_from_thread(self.refresh_status)
        self.app.call_from_thread(self.notify, f"{label} applies to the next request.", title="Applied")

    @work(thread=True, group="load", exit_on_error=False)
    def fire_load(self, n: int) -> None:
        """Submit ``n`` synthetic requests at once, to watch them queue and batch in the panels."""
        params = SamplingParams(temperature=0.8, max_tokens=64)
        start = time.perf_counter()
        try:
            streams = [self.engine.submit([{"role": "user", "content": LOAD_PROMPTS[i % len(LOAD_PROMPTS)]}],
                                          params) for i in range(n)]
        except PicochatError as e:
            self.app.call_from_thread(self.notify, str(e), title="load", severity="error")
            return
        tokens = sum(len(stream.result().token_ids) for stream in streams)
        elapsed = time.perf_counter() - start
        self.app.call_from_thread(self.notify, f"{n} requests, {tokens} tokens in {elapsed:.1f} s "
                                  f"({tokens / elapsed:.0f} tok/s)", title="load")

    # ------------------------------------------------------------------ metrics
    @work(thread=True, group="metrics", exit_on_error=False)
    def _poll_metrics(self, interval: float) -> None:
        worker = get_current_worker()
        while not worker.is_cancelled:
            try:
                self.post_message(MetricsUpdated(self.engine.metrics()))
            except PicochatError:  # e.g. a remote engine that is unreachable for a moment
                pass
            time.sleep(interval)

    def on_metrics_updated(self, message: MetricsUpdated) -> None:
        if self.engine.info != self.query_one(StatusBar).info:  # a reconfigure took effect
            self.refresh_status()
        self.query_one(MetricsPanel).update_metrics(message.snapshot)
        self.query_one(RequestTimeline).update_requests(message.snapshot.recent_requests)
