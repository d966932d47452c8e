"""The `picochat` command line: generate --json on the real model, and one-line errors (exit 2)
for bad input — never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def picochat(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "picochat.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_generate_json_on_the_default_model(default_gguf_path):
    out = picochat("generate", "Name a colour.", "--max-tokens", "8", "--json", "--spec", "ngram")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["text"] and 1 <= len(result["token_ids"]) <= 8
    assert result["prompt_tokens"] > 5 and result["finish_reason"] in ("stop", "length")
    assert result["ttft_s"] > 0 and result["prefill_tok_s"] > 0
    assert "spec_acceptance_rate" in result


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--model", "/nonexistent/model.gguf"], "no such file"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "hi", "--top-k", "-2"], "top_k must be -1"),
    (["generate", "hi", "--quant", "int3"], "quant must be none, int8 or int4"),
    (["generate", "hi", "--spec", "draft"], "needs a draft model"),
    (["generate", "--messages", "/nonexistent.json"], "no such file"),
    (["bench", "--input-len", "9:3"], "MIN <= MAX"),
    (["models", "fetch", "no-such-model"], "no-such-model"),
    (["generate", "hi", "--kv-cache-mb", "100000000", "--no-compile"], "does not fit the"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = picochat(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_corrupt_model_file_is_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    out = picochat("generate", "hi", "--model", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and str(bad) in out.stderr


def test_prompt_longer_than_context_is_one_line(default_gguf_path):
    out = picochat("generate", "word " * 400, "--max-model-len", "128", "--model", str(default_gguf_path))
    assert out.returncode == 2 and "context holds 128" in out.stderr and "Traceback" not in out.stderr
