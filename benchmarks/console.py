"""What the console costs the engine, and how quickly it answers a key (issue 3), in a real
terminal: tmux runs the installed ``picochat`` console; ``picochat bench`` runs headless beside it.

- decode tokens/s: one greedy chat request of ``--tokens`` tokens (a prompt that runs past the
  limit; temperature and max tokens set through the command palette) streamed into the console,
  its figure read from the saved transcript (the engine's own timings, as the reply's stats line
  shows them); then the same lengths headless, ``picochat bench -c 1 --num-prompts 1
  --input-len P --output-len N``. The two alternate over ``--rounds`` pairs (the console sits
  idle, panels polling, while the headless run goes); medians and their ratio.
- keystroke-to-screen latency: ten characters are typed one at a time (``tmux send-keys``) into
  the prompt while each of ``--typing-rounds`` further replies streams (replies not counted
  above: polling the screen takes CPU), and once with the console idle, as the floor of the
  method. Each latency runs from the moment send-keys returns (tmux has written the key to the
  console's terminal; the start of the tmux client process is not the console's) to the end of
  the first ``capture-pane`` that shows it in the prompt, so it overstates by up to one capture
  (whose median duration is printed as the resolution) plus the 2 ms pause between captures,
  which leaves the console the CPU it needs on a small machine.

    python benchmarks/console.py                          # default model, bf16, 3 rounds
    python benchmarks/console.py --dtype float32 --tokens 128 --rounds 5 --json

Both sides serve eagerly (the console does unless started with --compile). Needs tmux and the
installed ``picochat``. The last stdout line is one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
TYPED = "zqxjkvbwpy"


class Terminal:
    """A detached tmux session running the console."""

    def __init__(self, command: list[str], env: dict[str, str], width: int = 120, height: int = 36):
        self.name = f"picochat-bench-{os.getpid()}"
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                        *[f"-e{k}={v}" for k, v in env.items()], " ".join(command)], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True,
                              text=True).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *(["-l"] if literal else []), *keys], check=True)

    def wait_for(self, pattern: str, what: str, timeout_s: float, poll_s: float = 0.05) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            screen = self.screen()
            if re.search(pattern, screen):
                return screen
            time.sleep(poll_s)
        raise SystemExit(f"timed out waiting for {what}; the screen:\n{self.screen()}")

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def replies(transcripts: Path) -> list[dict]:
    """Assistant messages of every saved transcript, oldest chat first."""
    out = []
    for path in sorted(transcripts.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            messages = json.loads(path.read_text())["messages"]
        except (ValueError, KeyError, OSError):  # being replaced just now
            continue
        out += [m for m in messages if m["role"] == "assistant"]
    return out


def console_request(term: Terminal, transcripts: Path, typed_latencies: list[float] | None) -> dict:
    """Send the prompt in a new chat; while it streams, optionally time keystrokes. Returns the
    reply's stats from the transcript."""
    before = len(replies(transcripts))
    term.keys("C-n")
    time.sleep(0.3)
    term.keys(PROMPT, literal=True)
    term.keys("Enter")
    term.wait_for(r"generating…", "the reply to start", timeout_s=60)
    if typed_latencies is not None:
        time.sleep(0.5)  # well into decoding
        typed_latencies += type_keys(term)
    deadline = time.monotonic() + 600
    while len(found := replies(transcripts)) <= before:
        if time.monotonic() > deadline:
            raise SystemExit("the console's reply never finished")
        time.sleep(0.2)
    if typed_latencies is not None:
        term.keys(*["BSpace"] * len(TYPED))
    return found[-1]["stats"]


def type_keys(term: Terminal) -> list[float]:
    """Type TYPED a character at a time; seconds from each key's hand-over to the screen showing it."""
    latencies = []
    for i, ch in enumerate(TYPED):
        term.keys(ch, literal=True)
        handed_over = time.perf_counter()
        # the whole content of the prompt box: a letter alone is also somewhere in the reply
        term.wait_for(rf"│\s*{re.escape(TYPED[:i + 1])}\s*│", f"typed {TYPED[:i + 1]!r}", timeout_s=10, poll_s=0.002)
        latencies.append(time.perf_counter() - handed_over)
        time.sleep(0.2)
    return latencies


def percentile(values: list[float], pct: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


def capture_duration(term: Terminal) -> float:
    """Median seconds one ``capture-pane`` takes: the resolution of the keystroke latencies."""
    durations = []
    for _ in range(20):
        start = time.perf_counter()
        term.screen()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def headless_decode(args: argparse.Namespace, prompt_tokens: int, output_tokens: int) -> float:
    cmd = ["picochat", "bench", "-c", "1", "--num-prompts", "1", "--input-len", str(prompt_tokens),
           "--output-len", str(output_tokens), "--json", *engine_flags(args), "--no-compile"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["median_decode_tok_s"]


def engine_flags(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--dtype", args.dtype, "--quant", args.quant]


def set_sampling(term: Terminal, command: str, hint: str, value: str, shown: str, attempts: int = 3) -> None:
    """Run ``sampling: <command>`` from the command palette, as a user would, and wait for
    ``shown`` in the status bar. The palette filters as it is typed, so Enter can land on the
    entry highlighted a moment earlier, and keys can reach the dialog before its input has focus:
    a wrong or empty dialog is closed and the command typed again."""
    for _ in range(attempts):
        term.keys("C-p")
        term.wait_for(r"🔎|Search", "the command palette", timeout_s=30)
        term.keys(f"sampling: {command}", literal=True)
        term.wait_for(re.escape(f"sampling: {command}…"), f"the {command} command", timeout_s=30)
        time.sleep(0.5)
        term.keys("Enter")
        try:
            term.wait_for(re.escape(hint), f"the {command} dialog", timeout_s=10)
            time.sleep(0.3)  # the dialog's input takes focus
            term.keys("C-u")
            term.keys(value, literal=True)
            # keys typed before the input had focus are lost: then the dialog is closed and retried
            term.wait_for(rf"▊\s+{re.escape(value)}\s", f"{value} in the dialog", timeout_s=10)
        except SystemExit:
            term.keys("Escape")
            time.sleep(0.5)
            continue
        term.keys("Enter")
        term.wait_for(re.escape(shown), f"{shown} in the status bar", timeout_s=30)
        return
    raise SystemExit(f"could not set {command} through the palette")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quant", default="none")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--typing-rounds", type=int, default=3, help="replies to type ten keys into")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("tmux") is None or shutil.which("picochat") is None:
        raise SystemExit("benchmarks/console.py needs tmux and the installed picochat")

    home = Path(tempfile.mkdtemp(prefix="picochat-console-bench-"))
    env = {"XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config"),
           "TERM": "xterm-256color", "HOME": os.environ["HOME"], "PATH": os.environ["PATH"]}
    transcripts = home / "data" / "picochat" / "transcripts"
    term = Terminal(["picochat", *engine_flags(args)], env)
    console_tok_s, headless_tok_s, latencies = [], [], []
    try:
        term.wait_for(r"context \d+ / [\d,]+", "the chat screen", timeout_s=600)
        # greedy, as the headless run decodes: the comparison is of the console, not of sampling
        set_sampling(term, "temperature", "0 = greedy", "0", "greedy · max")
        set_sampling(term, "max tokens", "longest reply in tokens", str(args.tokens), f"max {args.tokens}")
        console_request(term, transcripts, None)  # warm-up, not counted
        idle_latencies = type_keys(term)
        term.keys(*["BSpace"] * len(TYPED))
        resolution = capture_duration(term)
        # keys typed during replies whose speed is not counted: polling the screen takes CPU
        for _ in range(args.typing_rounds):
            console_request(term, transcripts, latencies)
        for r in range(args.rounds):
            stats = console_request(term, transcripts, None)
            if stats["output_tokens"] != args.tokens:
                print(f"round {r + 1}: the reply stopped at {stats['output_tokens']} tokens", file=sys.stderr)
            console_tok_s.append(stats["decode_tok_s"])
            headless_tok_s.append(headless_decode(args, stats["prompt_tokens"], stats["output_tokens"]))
            print(f"round {r + 1}: console {console_tok_s[-1]:.1f} tok/s, headless {headless_tok_s[-1]:.1f} "
                  f"tok/s ({stats['output_tokens']} tokens)", file=sys.stderr)
        term.keys("C-q")
    finally:
        term.kill()
        shutil.rmtree(home, ignore_errors=True)

    console, headless = statistics.median(console_tok_s), statistics.median(headless_tok_s)
    ms, idle_ms = [x * 1e3 for x in latencies], [x * 1e3 for x in idle_latencies]
    result = {"model": args.model, "dtype": args.dtype, "quant": args.quant, "tokens": args.tokens,
              "rounds": args.rounds, "console_decode_tok_s": console_tok_s,
              "headless_decode_tok_s": headless_tok_s, "console_over_headless": console / headless,
              "keystroke_ms": ms, "keystroke_ms_median": statistics.median(ms),
              "keystroke_ms_p90": percentile(ms, 90), "keystroke_ms_max": max(ms),
              "idle_keystroke_ms": idle_ms, "capture_ms": resolution * 1e3}
    print(f"decode tok/s, medians of {args.rounds}: console {console:.1f}, headless {headless:.1f} -> "
          f"console / headless {console / headless:.2f}")
    print(f"keystroke to screen during generation ({len(ms)} keys): median {statistics.median(ms):.0f} ms, "
          f"90th percentile {percentile(ms, 90):.0f} ms, max {max(ms):.0f} ms; idle: median "
          f"{statistics.median(idle_ms):.0f} ms, max {max(idle_ms):.0f} ms; resolution (one capture) "
          f"{resolution * 1e3:.0f} ms")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
