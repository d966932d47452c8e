"""``picochat chat --plain``: a line REPL for dumb terminals and pipes, no Textual.

Each input line is a user message; the reply streams to stdout as it is generated. Ctrl+C stops
a reply (the partial text stays in the conversation) and, at the prompt, exits; so do EOF
(Ctrl+D, end of a pipe) and ``/exit``. ``/new`` starts a new conversation. Errors are one line on
stderr. The ``> `` prompt is shown only when stdin is a terminal, so piped output is just replies.
"""

from __future__ import annotations

import sys

from picochat.config import SamplingParams
from picochat.engine.protocol import ChatMessage, Engine
from picochat.errors import PicochatError


def run_plain(engine: Engine, *, system_prompt: str | None = None,
              params: SamplingParams | None = None) -> int:
    """Run the REPL until EOF or /exit; returns the process exit code."""
    params = params or SamplingParams()
    interactive = sys.stdin.isatty()
    base: list[ChatMessage] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages = list(base)
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/new":
            messages = list(base)
            continue
        messages.append({"role": "user", "content": text})
        try:
            reply = _stream_reply(engine, messages, params)
        except PicochatError as e:
            messages.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": reply})


def _stream_reply(engine: Engine, messages: list[ChatMessage], params: SamplingParams) -> str:
    """Print the reply as it streams; Ctrl+C cancels it. Returns the text generated."""
    stream = engine.submit(list(messages), params)
    parts: list[str] = []
    try:
        for delta in stream:
            parts.append(delta.text)
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            if delta.finish_reason == "error":
                raise PicochatError(delta.error or "generation failed")
    except KeyboardInterrupt:
        stream.cancel()
        for delta in stream:  # drain to the 'cancelled' end
            parts.append(delta.text)
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)
