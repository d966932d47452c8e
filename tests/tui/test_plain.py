"""``chat --plain``: a line REPL that streams replies to stdout, for pipes and dumb terminals."""

from __future__ import annotations

import io

from fake_engine import FakeEngine
from picochat.tui.plain import run_plain


def run(monkeypatch, capsys, engine, lines: str, **kwargs):
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code = run_plain(engine, **kwargs)
    return code, capsys.readouterr()


def test_each_line_is_a_turn_with_history(monkeypatch, capsys):
    engine = FakeEngine(reply="pong pong")
    code, out = run(monkeypatch, capsys, engine, "ping\nagain\n/new\nfresh\n", system_prompt="terse")
    assert code == 0
    assert out.out == "pong pong\n" * 3
    second, third = engine.submitted[1][0], engine.submitted[2][0]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert third == [{"role": "system", "content": "terse"}, {"role": "user", "content": "fresh"}]


def test_errors_are_one_line_and_the_repl_goes_on(monkeypatch, capsys):
    engine = FakeEngine(reply="ok", max_model_len=8)
    code, out = run(monkeypatch, capsys, engine, "far too many words for this context\nhi\n/exit\nnever\n")
    assert code == 0
    assert out.err.startswith("error: prompt is") and out.err.count("\n") == 1
    assert out.out == "ok\n"
