"""EngineProcess, the console's engine: a LocalEngine in a child process behind the same protocol.
Its tokens equal the in-process engine's, its errors arrive as the same one-line exceptions, and a
child that dies ends the open streams with one line instead of leaving them hanging."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from picochat.config import EngineConfig, SamplingParams
from picochat.engine.engine import LocalEngine
from picochat.engine.process import ENGINE_NICENESS, EngineProcess
from picochat.engine.protocol import Delta, Stream
from picochat.errors import ConfigError, EngineClosedError, ModelLoadError, PromptTooLongError

PROMPT = [{"role": "user", "content": "the cat sat"}]


@pytest.fixture
def config(tiny_hf_llama_dir, tmp_path, monkeypatch) -> EngineConfig:
    monkeypatch.setenv("PICOCHAT_CACHE_DIR", str(tmp_path / "cache"))  # the child's log goes there
    return EngineConfig(model=str(tiny_hf_llama_dir()), max_model_len=512, compile=False)


def engine_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "picochat.engine.process" in " ".join(p.cmdline())]


def test_a_redirected_stream_hands_over_queued_deltas_first():
    stream = Stream("r")
    stream._put(Delta("r", "a", (1,)))
    received: list[Delta] = []
    stream.redirect(received.append)
    stream._put(Delta("r", "b", (2,), finish_reason="stop"))
    assert [d.text for d in received] == ["a", "b"]
    assert stream.get(timeout=0) is None


def test_the_child_streams_what_the_in_process_engine_does(config, tmp_path):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    local = LocalEngine(config)
    try:
        expected, expected_count, expected_info = local.submit(PROMPT, params).result(), \
            local.count_prompt_tokens(PROMPT), local.info
    finally:
        local.close()
    engine = EngineProcess(config)
    try:
        assert engine.info == expected_info
        assert engine.count_prompt_tokens(PROMPT) == expected_count
        deltas = list(engine.submit(PROMPT, params))
        assert [t for d in deltas for t in d.token_ids] == expected.token_ids
        assert "".join(d.text for d in deltas) == expected.text
        assert deltas[-1].finish_reason == "length" and deltas[-1].timings.output_tokens == 12
        assert engine.metrics().generation_tokens_total == 12
        # a session of its own: the terminal's Ctrl+C reaches the console, not the engine
        assert os.getsid(engine._process.pid) != os.getsid(0)
        assert (tmp_path / "cache" / "engine.log").exists()  # its output, off the console's screen
    finally:
        engine.close()
    assert engine._process.poll() is not None and not engine_children()
    with pytest.raises(EngineClosedError, match="shut down"):
        engine.submit(PROMPT, params)


def test_errors_and_settings_cross_the_process_boundary(config):
    engine = EngineProcess(config)
    try:
        with pytest.raises(PromptTooLongError, match="the context holds 512"):
            engine.submit("the " * 600, SamplingParams())
        with pytest.raises(ConfigError, match="attention backend"):
            engine.reconfigure(attention="bogus")
        engine.reconfigure(max_num_seqs=3)  # applied by the engine thread between steps
        engine.submit(PROMPT, SamplingParams(max_tokens=2)).result()
        engine.metrics()
        assert engine.info.max_num_seqs == 3
        stream = engine.submit(PROMPT, SamplingParams(max_tokens=400, ignore_eos=True))
        assert stream.get(timeout=30) is not None
        engine.cancel(stream.request_id)
        assert stream.result().finish_reason == "cancelled"
    finally:
        engine.close()


def test_the_child_yields_the_cores_to_the_console(config, monkeypatch):
    monkeypatch.delenv("PICOCHAT_ENGINE_NICENESS", raising=False)
    engine = EngineProcess(config)
    try:
        assert psutil.Process(engine._process.pid).nice() == os.nice(0) + ENGINE_NICENESS > os.nice(0)
    finally:
        engine.close()


def test_a_child_that_dies_ends_open_streams_with_one_line(config):
    engine = EngineProcess(config)
    try:
        stream = engine.submit(PROMPT, SamplingParams(max_tokens=480, ignore_eos=True))
        assert stream.get(timeout=30) is not None
        os.kill(engine._process.pid, signal.SIGKILL)
        last = stream.result()
        assert last.finish_reason == "error" and "killed by signal 9" in last.error and "\n" not in last.error
        with pytest.raises(EngineClosedError, match="exited unexpectedly"):
            engine.metrics()
    finally:
        engine.close()


def test_a_model_that_cannot_load_is_one_line_and_leaves_no_process(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError) as failure:
        EngineProcess(EngineConfig(model=str(tmp_path / "missing.gguf")))
    assert "missing.gguf" in str(failure.value) and "\n" not in str(failure.value)
    assert not engine_children()
