"""picochat serve in front of a FakeEngine: the official openai client, raw HTTP, and serve()."""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import openai
import pytest
from fake_engine import DEFAULT_REPLY, FakeEngine, chat
from prometheus_client.parser import text_string_to_metric_families
from server_live import MODEL, live_server, open_request, wait_for

from picochat.config import SamplingParams
from picochat.engine.protocol import now
from picochat.errors import ModelLoadError, QueueFullError
from picochat.server.app import create_app, serve

REPLY_WORDS = DEFAULT_REPLY.split(" ")


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def sample(url: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


# ------------------------------------------------------------------------------------ chat
def test_chat_returns_the_reply_with_usage(url: str, engine: FakeEngine) -> None:
    r = client(url).chat.completions.create(model=MODEL, messages=chat("one two three"), max_tokens=100)
    assert r.choices[0].message.content == DEFAULT_REPLY
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.model == MODEL and r.object == "chat.completion"
    assert r.usage.prompt_tokens == engine.count_prompt_tokens(chat("one two three"))
    assert r.usage.completion_tokens == len(REPLY_WORDS)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_adds_up_to_the_reply_and_ends_with_usage(url: str, engine: FakeEngine) -> None:
    chunks = list(client(url).chat.completions.create(
        model=MODEL, messages=chat("hi"), max_tokens=100, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(REPLY_WORDS)
    assert chunks[-1].usage.prompt_tokens == engine.count_prompt_tokens(chat("hi"))


def test_stream_without_include_usage_sends_no_usage_chunk(url: str) -> None:
    chunks = list(client(url).chat.completions.create(model=MODEL, messages=chat("hi"), stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_sse_framing_ends_with_done(url: str) -> None:
    body = {"model": MODEL, "messages": chat("hi"), "stream": True, "max_tokens": 2}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_cuts_the_reply_with_finish_reason_length(url: str, stream: bool) -> None:
    r = client(url).chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=3, stream=stream,
                                            stream_options={"include_usage": True} if stream else None)
    if stream:
        chunks = list(r)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        usage = chunks[-1].usage
    else:
        text, finish, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    assert text == " ".join(REPLY_WORDS[:3])
    assert finish == "length"
    assert usage.completion_tokens == 3


def test_the_clock_starts_when_the_http_request_arrives(url: str, engine: FakeEngine) -> None:
    before = now()
    client(url).chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=2)
    arrival = engine.arrivals[-1]
    assert arrival is not None and before <= arrival <= now()


def test_sampling_parameters_reach_the_engine(url: str, engine: FakeEngine) -> None:
    client(url).chat.completions.create(
        model=MODEL, messages=chat("hi"), temperature=0.3, top_p=0.9, seed=7, stop=["x", "y"],
        presence_penalty=0.5, frequency_penalty=-0.5, max_tokens=10,
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "ignore_eos": True,
                    "stop_token_ids": [2]})
    assert engine.submitted[-1] == (chat("hi"), SamplingParams(
        temperature=0.3, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.2, presence_penalty=0.5,
        frequency_penalty=-0.5, seed=7, max_tokens=10, stop=("x", "y"), stop_token_ids=(2,), ignore_eos=True))


def test_chat_defaults_are_openais_and_max_tokens_fills_the_context(url: str, engine: FakeEngine) -> None:
    client(url).chat.completions.create(model=MODEL, messages=chat("a b"))
    params = engine.submitted[-1][1]
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.stop == ()
    assert params.max_tokens == engine.max_model_len - engine.count_prompt_tokens(chat("a b"))


def test_chat_content_parts_and_developer_role(url: str, engine: FakeEngine) -> None:
    messages = [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]}]
    client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert engine.submitted[-1][0] == [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "one two"}]


def test_max_completion_tokens_is_max_tokens(url: str, engine: FakeEngine) -> None:
    client(url).chat.completions.create(model=MODEL, messages=chat("hi"), max_completion_tokens=4)
    assert engine.submitted[-1][1].max_tokens == 4


def test_return_token_ids(url: str) -> None:
    body = {"model": MODEL, "messages": chat("hi"), "max_tokens": 4, "return_token_ids": True}
    choice = httpx.post(url + "/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["token_ids"] == [0, 1, 2, 3]


# ------------------------------------------------------------------------------ completions
def test_completions_with_text_and_token_ids(url: str, engine: FakeEngine) -> None:
    r = client(url).completions.create(model=MODEL, prompt="a b c", max_tokens=2)
    assert r.choices[0].text == " ".join(REPLY_WORDS[:2])
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 2)
    r = client(url).completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=100)
    assert engine.submitted[-1][0] == [5, 6, 7, 8]
    assert r.usage.prompt_tokens == 4 and r.choices[0].text == DEFAULT_REPLY


def test_completions_default_to_16_tokens_and_stream(url: str, engine: FakeEngine) -> None:
    chunks = list(client(url).completions.create(model=MODEL, prompt=["a b c"], stream=True))
    assert engine.submitted[-1] == ("a b c", SamplingParams(temperature=1.0, max_tokens=16))
    assert "".join(c.choices[0].text for c in chunks) == DEFAULT_REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_lists_the_served_name(url: str, engine: FakeEngine) -> None:
    (card,) = client(url).models.list().data
    assert card.id == MODEL and card.owned_by == "picochat"
    assert card.model_extra["max_model_len"] == engine.max_model_len


def test_tokenize_counts_like_the_engine(url: str, engine: FakeEngine) -> None:
    r = httpx.post(url + "/tokenize", json={"messages": chat("a b c")}).json()
    assert r == {"count": engine.count_prompt_tokens(chat("a b c")), "max_model_len": engine.max_model_len}
    assert httpx.post(url + "/tokenize", json={"prompt": "a b"}).json()["count"] == 2


# ------------------------------------------------------------------------- client mistakes
HI = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    ("/v1/chat/completions", b'{"messages": [', None),
    ("/v1/chat/completions", b"[1, 2]", None),
    ("/v1/chat/completions", b"\xff\xfe", None),
    ("/v1/chat/completions", json.dumps({"model": "gpt-9", "messages": HI}).encode(), "model"),
    ("/v1/chat/completions", json.dumps({"messages": HI, "max_tokens": 0}).encode(), "max_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": HI, "max_tokens": -5}).encode(), "max_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": HI, "max_tokens": 2048}).encode(), "max_tokens"),
    ("/v1/chat/completions", json.dumps({"messages": HI, "temperature": -0.1}).encode(), "temperature"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     "temperature"),
    ("/v1/chat/completions", json.dumps({"messages": HI, "top_p": 0}).encode(), "top_p"),
    ("/v1/chat/completions", json.dumps({"messages": HI, "seed": -1}).encode(), "seed"),
    ("/v1/chat/completions", json.dumps({"messages": HI, "n": 2}).encode(), "n"),
    ("/v1/chat/completions", json.dumps({"messages": HI, "logprobs": True}).encode(), "logprobs"),
    ("/v1/chat/completions", json.dumps({"messages": []}).encode(), "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),
     "messages.0.role"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}).encode(), "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "word " * 3000}]}).encode(),
     "messages"),
    ("/v1/chat/completions", b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', None),
    ("/v1/completions", json.dumps({"prompt": ""}).encode(), "prompt"),
    ("/v1/completions", json.dumps({"prompt": ["a", "b"]}).encode(), "prompt"),
    ("/v1/completions", json.dumps({"prompt": [-1]}).encode(), "prompt.0"),
    ("/v1/completions", json.dumps({"prompt": "a", "echo": True}).encode(), "echo"),
    ("/v1/completions", json.dumps({}).encode(), "prompt"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS)
def test_client_mistakes_are_400_with_an_openai_error_body(url: str, path: str, body: bytes,
                                                          param: str | None) -> None:
    r = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == 400 and error["message"] and "\n" not in error["message"]
    assert error["type"] in ("invalid_request_error", "model_not_found")
    if param is not None:
        assert error["param"] == param


def test_openai_client_sees_bad_request_for_an_unknown_model(url: str) -> None:
    with pytest.raises(openai.BadRequestError, match="gpt-9"):
        client(url).chat.completions.create(model="gpt-9", messages=chat("hi"))


def test_unknown_route_is_404_with_an_openai_error_body(url: str) -> None:
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_api_key_guards_the_api_but_not_health_or_metrics(engine: FakeEngine) -> None:
    with live_server(create_app(lambda: engine, model_name=MODEL, api_key="sekret")) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert httpx.post(url + "/v1/chat/completions", json={"messages": HI}).status_code == 401
        r = client(url, "sekret").chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=1)
        assert r.choices[0].message.content == REPLY_WORDS[0]
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 200


class FullEngine(FakeEngine):
    def submit(self, prompt, params, request_id=None, arrival=None):
        raise QueueFullError("1024 requests are queued; try again later")


def test_a_full_queue_is_429_with_retry_after() -> None:
    with live_server(create_app(FullEngine, model_name=MODEL)) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": HI})
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["message"] == "1024 requests are queued; try again later"


# ------------------------------------------------------------------------- loading, serve()
def test_health_is_503_while_the_model_loads_then_200() -> None:
    may_load = threading.Event()

    def factory() -> FakeEngine:
        may_load.wait()
        return FakeEngine()

    with live_server(create_app(factory, model_name=MODEL), wait_ready=False) as url:
        health = httpx.get(url + "/health")
        assert (health.status_code, health.json()["status"]) == (503, "loading")
        r = httpx.post(url + "/v1/chat/completions", json={"messages": HI})
        assert r.status_code == 503 and "retry-after" in r.headers
        may_load.set()
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, "the model to load")
        assert httpx.post(url + "/v1/chat/completions", json={"messages": HI}).status_code == 200


def failing_factory() -> FakeEngine:
    raise ModelLoadError("no model named 'nope'")


def test_health_reports_a_failed_load() -> None:
    with live_server(create_app(failing_factory, model_name=MODEL), wait_ready=False) as url:
        wait_for(lambda: httpx.get(url + "/health").json()["status"] == "error", "the load to fail")
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["message"] == "no model named 'nope'"


def test_serve_raises_the_load_error_and_returns() -> None:
    with pytest.raises(ModelLoadError, match="no model named 'nope'"):
        serve(failing_factory, host="127.0.0.1", port=0, api_key=None, model_name=MODEL)


def test_serve_stops_on_ctrl_c_and_closes_the_engine() -> None:
    closed = threading.Event()

    class ClosingEngine(FakeEngine):
        def close(self) -> None:
            closed.set()

    def factory() -> FakeEngine:
        threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT)).start()
        return ClosingEngine()

    serve(factory, host="127.0.0.1", port=0, api_key=None, model_name=MODEL)  # returns, no KeyboardInterrupt
    assert closed.wait(timeout=20)


# ---------------------------------------------------------------- long prefills, disconnects
def test_health_and_metrics_answer_during_a_long_prefill() -> None:
    gate = threading.Event()
    engine = FakeEngine(first_token_gate=gate)
    with live_server(create_app(lambda: engine, model_name=MODEL)) as url:
        result: list[str] = []
        worker = threading.Thread(target=lambda: result.append(client(url).chat.completions.create(
            model=MODEL, messages=chat("hi"), max_tokens=100).choices[0].message.content))
        worker.start()
        wait_for(lambda: engine.metrics().num_requests_running == 1, "the request to start")
        assert httpx.get(url + "/health").status_code == 200
        assert sample(url, "picochat:num_requests_running") == 1
        gate.set()
        worker.join()
    assert result == [DEFAULT_REPLY]


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_cancels_its_request(stream: bool) -> None:
    engine = FakeEngine(reply=" ".join(["word"] * 2000), token_delay_s=0.005)
    with live_server(create_app(lambda: engine, model_name=MODEL)) as url:
        sock = open_request(url, {"messages": HI, "stream": stream, "max_tokens": 2000})
        if stream:
            received = b""
            while b"word" not in received:
                data = sock.recv(4096)
                assert data, received.decode()
                received += data
        else:
            wait_for(lambda: engine.metrics().num_requests_running == 1, "the request to start")
        sock.close()
        wait_for(lambda: sample(url, "picochat:request_success_total", finished_reason="cancelled") == 1,
                 "the request to be cancelled")
        assert engine.metrics().num_requests_running == 0
        assert sample(url, "picochat:request_success_total", finished_reason="length") is None
