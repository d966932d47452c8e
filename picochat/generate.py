"""``picochat generate``: build the prompt from flags, stream the reply to stdout, or print one
JSON object with the text, token ids and timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from picochat.config import SamplingParams
from picochat.engine.protocol import ChatMessage, Engine, Prompt
from picochat.errors import ConfigError

ROLES = ("system", "user", "assistant")


def build_prompt(prompt: str | None, system: str | None, messages_file: Path | None, raw: bool) -> Prompt:
    """Chat messages (or raw text with ``raw``) from the command line."""
    if messages_file is not None:
        messages = _read_messages(messages_file)
        if prompt:
            messages.append({"role": "user", "content": prompt})
    elif prompt is None:
        raise ConfigError("give a PROMPT or --messages FILE.json")
    elif raw:
        return prompt
    else:
        messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages = [m for m in messages if m["role"] != "system"]
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _read_messages(path: Path) -> list[ChatMessage]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected a non-empty JSON list of {{role, content}} objects")
    for i, m in enumerate(data):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ConfigError(f"{path}: message {i} needs a role in {ROLES} and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in data]


def run_generate(engine: Engine, prompt: Prompt, params: SamplingParams, as_json: bool) -> int:
    """Stream (or collect) one reply; returns the process exit code."""
    stream = engine.submit(prompt, params)
    texts: list[str] = []
    ids: list[int] = []
    last = None
    try:
        for delta in stream:
            ids.extend(delta.token_ids)
            texts.append(delta.text)
            if not as_json and delta.text:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            last = delta
    except KeyboardInterrupt:
        stream.cancel()
        print(file=sys.stderr)
        return 130
    assert last is not None
    if last.finish_reason == "error":
        print(f"\nerror: {last.error}", file=sys.stderr)
        return 1
    t = last.timings
    if as_json:
        info = engine.info
        print(json.dumps({
            "text": "".join(texts), "token_ids": ids, "prompt_tokens": t.prompt_tokens if t else None,
            "completion_tokens": len(ids), "finish_reason": last.finish_reason,
            "ttft_s": t.ttft_s if t else None, "prefill_tok_s": t.prefill_tok_s if t else None,
            "decode_tok_s": t.decode_tok_s if t else None, "model": info.model, "dtype": info.dtype,
            "quant": info.quant, "spec": info.spec,
            "spec_acceptance_rate": t.spec_acceptance_rate if t else None,
            "spec_mean_accept_len": t.spec_mean_accept_len if t else None}))
    else:
        print()
    return 0
