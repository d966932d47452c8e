"""picochat serve in front of a real LocalEngine: a tiny random-weight Llama with the default
model's real tokenizer, so usage counts, stop strings, batching and KV accounting are the
engine's own, in seconds on a CPU."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Iterator

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from request_bodies import bodies, paths, post_expecting_no_500
from server_live import MODEL, live_server, open_request, wait_for

from picochat.config import EngineConfig, SamplingParams
from tiny_models import tiny_model

from picochat.engine.engine import LocalEngine
from picochat.remote import RemoteEngine
from picochat.server.app import create_app

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
TOPICS = ["the sea", "a long road through the mountains", "cats", "why the sky is blue", "bread",
          "trains", "the moon", "a small village by a river"]


@pytest.fixture(scope="module")
def local(tokenizer) -> LocalEngine:
    # a long context, so a stream can run long enough to be hung up on mid-way
    loaded = dataclasses.replace(tiny_model(tokenizer, 0.5, max_len=8192), name=MODEL)
    return LocalEngine(EngineConfig(model=MODEL), loaded=loaded)


@pytest.fixture(scope="module")
def url(local: LocalEngine) -> Iterator[str]:
    with live_server(create_app(lambda: local, model_name=MODEL)) as base:  # closes the engine after
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def ask(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Tell me about {topic}."}]


def streamed_text(client: openai.OpenAI, messages: list[dict], max_tokens: int) -> str:
    chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                            stream=True, **GREEDY)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def counter(url: str, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"{name} is not exposed")


def test_usage_counts_are_the_tokenizers(client: openai.OpenAI, local: LocalEngine) -> None:
    messages = ask(TOPICS[0])
    extra = {"extra_body": {"ignore_eos": True, "return_token_ids": True}, "temperature": 0.0}
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, **extra)
    assert whole.usage.prompt_tokens == local.count_prompt_tokens(messages)
    assert whole.usage.completion_tokens == 7 == len(whole.choices[0].model_extra["token_ids"])
    assert whole.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, stream=True,
                                                 stream_options={"include_usage": True}, **extra))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage


def test_stop_strings_are_honoured(client: openai.OpenAI) -> None:
    messages = ask(TOPICS[1])
    text = streamed_text(client, messages, 16)
    stop = text[len(text) // 2:][:3]  # a piece from the second half
    assert stop.strip(), text
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(stop)]


def test_64_concurrent_streams_match_their_sequential_outputs(client: openai.OpenAI) -> None:
    sequential = {topic: streamed_text(client, ask(topic), 8) for topic in TOPICS}
    jobs = [TOPICS[i % len(TOPICS)] for i in range(64)]
    with ThreadPoolExecutor(max_workers=64) as pool:
        concurrent = list(pool.map(lambda topic: streamed_text(client, ask(topic), 8), jobs))
    assert concurrent == [sequential[topic] for topic in jobs]


def test_counters_move_by_the_requests_tokens(url: str, client: openai.OpenAI) -> None:
    before = (counter(url, "picochat:prompt_tokens_total"), counter(url, "picochat:generation_tokens_total"))
    r = client.chat.completions.create(model=MODEL, messages=ask(TOPICS[2]), max_tokens=5, **GREEDY)
    wait_for(lambda: counter(url, "picochat:generation_tokens_total") >= before[1] + 5, "the counters")
    after = (counter(url, "picochat:prompt_tokens_total"), counter(url, "picochat:generation_tokens_total"))
    assert after[1] - before[1] == r.usage.completion_tokens
    # the prefix cache may serve part of the prompt, but the prompt is counted once
    assert after[0] - before[0] == r.usage.prompt_tokens


def open_stream_and_read_its_first_content(url: str):
    sock = open_request(url, {"messages": ask(TOPICS[3]), "stream": True, "max_tokens": 8000,
                              "temperature": 0.0, "ignore_eos": True})
    received = b""
    while b'"content":' not in received.split(b'"role"', 1)[-1]:
        data = sock.recv(4096)
        assert data, received.decode()
        received += data
    return sock


def test_hanging_up_mid_stream_frees_the_kv_blocks(url: str, local: LocalEngine) -> None:
    for _ in range(3):  # on a starved host the first chunk can arrive after the tiny model's last token
        sock = open_stream_and_read_its_first_content(url)
        if local.metrics().num_requests_running == 1:
            break
        sock.close()
    assert local.metrics().kv_cache_usage_perc > 0
    sock.close()
    wait_for(lambda: local.metrics().num_requests_running == 0, "the request to be dropped")
    assert local.metrics().kv_cache_usage_perc == 0
    assert local.metrics().recent_requests[-1].finish_reason == "cancelled"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=paths, body=bodies)
def test_request_bodies_never_cause_a_500(url: str, path: str, body: dict) -> None:
    with httpx.Client(base_url=url) as http:
        post_expecting_no_500(http, path, json.dumps(body).encode())


def test_remote_engine_matches_the_local_engine(url: str, local: LocalEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    messages = ask(TOPICS[4])
    expected = local.submit(messages, params).result()
    with closing(RemoteEngine(url)) as remote:
        got = remote.submit(messages, params).result()
        assert remote.count_prompt_tokens(messages) == local.count_prompt_tokens(messages)
    assert (got.text, got.token_ids, got.finish_reason) == (expected.text, expected.token_ids, "length")
    assert got.timings.prompt_tokens == expected.timings.prompt_tokens
