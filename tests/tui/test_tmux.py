"""End to end in a real terminal: tmux runs the installed ``picochat`` on the default model, keys
are sent, and ``capture-pane`` must show the reply, the panels' labels and values, and the
status bar. Slow (the model loads in the console) and needs tmux and the installed CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.tmux,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
              pytest.mark.skipif(shutil.which("picochat") is None, reason="picochat is not installed")]


class Terminal:
    """A detached tmux session running one command."""

    def __init__(self, command: str, env: dict[str, str], width: int = 100, height: int = 30):
        self.name = f"picochat-test-{uuid.uuid4().hex[:8]}"
        exports = " ".join(f"{key}={value}" for key, value in env.items())
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                        f"env {exports} {command}"], check=True)

    def screen(self) -> str:
        result = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True)
        return result.stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *(["-l"] if literal else []), *keys], check=True)

    def wait_for(self, pattern: str, what: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            screen = self.screen()
            if re.search(pattern, screen):
                return screen
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}; the screen shows:\n{self.screen()}")

    def alive(self) -> bool:
        return subprocess.run(["tmux", "has-session", "-t", self.name], capture_output=True).returncode == 0

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def test_console_in_a_real_terminal(tmp_path, default_gguf_path):
    env = {"XDG_DATA_HOME": tmp_path / "data", "XDG_CONFIG_HOME": tmp_path / "config", "TERM": "xterm-256color",
           "HOME": os.environ["HOME"]}
    term = Terminal("picochat", {k: str(v) for k, v in env.items()})
    try:
        term.wait_for(r"context \d+ / [\d,]+", "the chat screen", timeout_s=300)
        term.keys("C-p")
        term.wait_for(r"🔎|Search", "the command palette", timeout_s=30)
        term.keys("sampling: max tokens", literal=True)
        term.wait_for(r"sampling: max tokens…", "the max tokens command", timeout_s=30)
        term.keys("Enter")
        term.wait_for(r"longest reply in tokens", "the value dialog", timeout_s=30)
        term.keys("6", literal=True)
        term.keys("Enter")
        term.wait_for(r"max 6", "max tokens 6 in the status bar", timeout_s=30)
        term.keys("What is 2+2?", literal=True)
        term.keys("Enter")
        screen = term.wait_for(r"\d+ tokens · TTFT \d+", "the reply's stats", timeout_s=240)
        assert "What is 2+2?" in screen and "Assistant" in screen
        reply_lines = screen.split("Assistant", 1)[1].split("tokens · TTFT", 1)[0]
        assert re.search(r"\w", reply_lines), "the reply text is on screen"
        screen = term.wait_for(r"req-\d+ .*tok ·", "the request in the timeline", timeout_s=30)
        for label in ("TTFT / request", "prefill", "decode", "KV cache", "waiting", "running", "RAM"):
            assert label in screen
        assert re.search(r"KV cache\s+\d+/\d+ \d+%", screen)
        assert re.search(r"decode\s+[\d.,]+ tok/s", screen)
        assert "smollm2-135m-instruct" in screen and "max 6" in screen
        term.keys("C-q")
        deadline = time.monotonic() + 30
        while term.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not term.alive(), "Ctrl+Q quits"
        assert list((tmp_path / "data" / "picochat" / "transcripts").glob("*.json"))
    finally:
        term.kill()
