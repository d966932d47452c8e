"""RemoteEngine against picochat serve (FakeEngine behind it) and against stubs that speak like
llama.cpp's and vLLM's servers."""

from __future__ import annotations

import json
from contextlib import closing
from typing import Iterator

import httpx
import pytest
from fake_engine import DEFAULT_REPLY, FakeEngine, chat
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from metrics_samples import LLAMACPP_TEXT, VLLM_TEXT
from prometheus_client.parser import text_string_to_metric_families
from server_live import MODEL, live_server, wait_for

from picochat.config import SamplingParams
from picochat.errors import ConfigError, EngineClosedError, ModelLoadError
from picochat.remote import RemoteEngine
from picochat.server.app import create_app

WORDS = DEFAULT_REPLY.split(" ")


@pytest.fixture
def remote(url: str) -> Iterator[RemoteEngine]:
    with closing(RemoteEngine(url)) as remote_engine:
        yield remote_engine


def cancelled_on_server(url: str) -> float | None:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == "picochat:request_success_total" and s.labels["finished_reason"] == "cancelled":
                return s.value
    return None


# ------------------------------------------------------------------- against picochat serve
def test_chat_streams_deltas_with_client_measured_timings(remote: RemoteEngine, engine: FakeEngine) -> None:
    deltas = list(remote.submit(chat("one two"), SamplingParams(max_tokens=100)))
    assert "".join(d.text for d in deltas) == DEFAULT_REPLY
    assert [i for d in deltas for i in d.token_ids] == list(range(len(WORDS)))  # return_token_ids
    last = deltas[-1]
    assert last.finish_reason == "stop" and last.error is None
    t = last.timings
    assert t.prompt_tokens == engine.count_prompt_tokens(chat("one two"))
    assert t.output_tokens == len(WORDS)
    assert t.arrival <= t.first_token <= t.finished
    assert len(t.itl) == len(WORDS) - 1
    assert t.scheduled is None  # the client cannot see the server's queue: unavailable, not 0


def test_sampling_params_arrive_unchanged(remote: RemoteEngine, engine: FakeEngine) -> None:
    params = SamplingParams(temperature=0.2, top_p=0.8, top_k=7, min_p=0.05, repetition_penalty=1.1,
                            presence_penalty=0.3, frequency_penalty=0.4, seed=11, max_tokens=9,
                            stop=("END",), stop_token_ids=(3,), ignore_eos=True)
    remote.submit(chat("hi"), params).result()
    assert engine.submitted[-1] == (chat("hi"), params)


def test_text_and_token_id_prompts_use_completions(remote: RemoteEngine, engine: FakeEngine) -> None:
    done = remote.submit("a b c", SamplingParams(max_tokens=2)).result()
    assert done.text == " ".join(WORDS[:2]) and done.finish_reason == "length"
    assert engine.submitted[-1][0] == "a b c"
    remote.submit([4, 5, 6], SamplingParams(max_tokens=2)).result()
    assert engine.submitted[-1][0] == [4, 5, 6]


def test_info_comes_from_the_model_card(remote: RemoteEngine, engine: FakeEngine) -> None:
    info = remote.info
    assert info.remote and info.model == MODEL and info.max_model_len == engine.max_model_len
    assert (info.dtype, info.quant, info.attention) == ("float32", "none", "sdpa")
    assert set(info.unsupported) >= {"quant", "spec", "batch", "attention", "model"}
    with pytest.raises(ConfigError):
        remote.reconfigure(attention="sdpa")


def test_count_prompt_tokens_asks_the_server(remote: RemoteEngine, engine: FakeEngine) -> None:
    assert remote.count_prompt_tokens(chat("a b c d")) == engine.count_prompt_tokens(chat("a b c d"))
    assert remote.count_prompt_tokens([1, 2, 3]) == 3


def test_cancel_closes_the_connection_and_the_server_drops_the_request() -> None:
    engine = FakeEngine(reply=" ".join(["word"] * 2000), token_delay_s=0.005)
    with live_server(create_app(lambda: engine, model_name=MODEL)) as long_url, \
            closing(RemoteEngine(long_url)) as remote:
        stream = remote.submit(chat("hi"), SamplingParams(max_tokens=2000))
        assert stream.get(timeout=20).text == "word"
        stream.cancel()
        rest = list(stream)
        assert rest[-1].finish_reason == "cancelled"
        wait_for(lambda: cancelled_on_server(long_url) == 1, "the server to drop the request")
        assert engine.metrics().num_requests_running == 0


def test_a_refused_request_ends_with_an_error_delta(remote: RemoteEngine) -> None:
    done = remote.submit(chat("hi"), SamplingParams(max_tokens=5000)).result()
    assert done.finish_reason == "error"
    assert done.error.startswith("server answered 400: This model's maximum context length is 2048")


def test_metrics_merge_the_servers_scrape_with_client_timings(remote: RemoteEngine, engine: FakeEngine) -> None:
    remote.submit(chat("hi"), SamplingParams(max_tokens=3)).result()
    wait_for(lambda: remote.metrics().requests_finished_total == 1, "a scrape after the request")
    snap = remote.metrics()
    assert snap.kv_cache_usage_perc == engine.metrics().kv_cache_usage_perc
    assert snap.memory == engine.metrics().memory
    assert snap.quant == "none"
    assert [r.output_tokens for r in snap.recent_requests] == [3]
    assert snap.spec_decode_num_drafts_total is None  # the fake engine has no speculation


def test_api_key_is_sent(engine: FakeEngine) -> None:
    with live_server(create_app(lambda: engine, model_name=MODEL, api_key="k")) as url:
        with pytest.raises(ModelLoadError, match="401"):
            RemoteEngine(url, api_key="wrong")
        with closing(RemoteEngine(url, api_key="k")) as remote:
            assert remote.submit(chat("hi"), SamplingParams(max_tokens=1)).result().text == WORDS[0]


def test_attach_errors_are_one_line(url: str) -> None:
    with pytest.raises(ModelLoadError, match="does not serve 'other'.*fake"):
        RemoteEngine(url, model="other")
    with pytest.raises(ModelLoadError, match="cannot reach"):
        RemoteEngine("http://127.0.0.1:9")


def test_submit_after_close_is_refused(url: str) -> None:
    remote = RemoteEngine(url + "/v1")  # the /v1 suffix is accepted
    remote.close()
    with pytest.raises(EngineClosedError):
        remote.submit(chat("hi"), SamplingParams())


# ------------------------------------------------------------------- other servers' dialects
def stub_server(owned_by: str, card_extra: dict, metrics_text: str | None, chunks: list[dict]) -> FastAPI:
    """An OpenAI-compatible server that streams ``chunks`` and serves ``metrics_text``."""
    app = FastAPI()
    app.state.bodies, app.state.scrapes = [], 0

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": owned_by, **card_extra}]}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        app.state.scrapes += 1
        return PlainTextResponse(metrics_text or "not found", 200 if metrics_text else 404)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> StreamingResponse:
        app.state.bodies.append(await request.json())

        async def events():
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def chunk(content: str | None = None, finish: str | None = None, **extra) -> dict:
    delta = {} if content is None else {"content": content}
    return {"id": "c", "object": "chat.completion.chunk", "model": "stub",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


LLAMACPP_CHUNKS = [chunk("Hel"), chunk("lo"), chunk("!"),
                   chunk(finish="stop", usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
                         timings={"prompt_n": 9, "predicted_n": 3})]
VLLM_CHUNKS = [{**chunk(""), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
               chunk("Hel"), chunk("lo", finish="length"),
               {"id": "c", "object": "chat.completion.chunk", "model": "stub", "choices": [],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                          "prompt_tokens_details": {"cached_tokens": 4}}}]


def test_llamacpp_dialect() -> None:
    app = stub_server("llamacpp", {"meta": {"n_ctx_train": 4096}}, LLAMACPP_TEXT, LLAMACPP_CHUNKS)
    with live_server(app) as url, closing(RemoteEngine(url)) as remote:
        done = remote.submit(chat("hi"), SamplingParams(max_tokens=8)).result()
        assert (done.text, done.finish_reason) == ("Hello!", "stop")
        assert (done.timings.prompt_tokens, done.timings.output_tokens) == (9, 3)
        body = app.state.bodies[-1]
        assert "return_token_ids" not in body and "top_k" not in body  # plain OpenAI for a strict server
        assert body["stream_options"] == {"include_usage": True}
        assert remote.info.max_model_len == 4096 and remote.info.dtype == "unknown"
        wait_for(lambda: remote.metrics().num_requests_running is not None, "a scrape")
        snap = remote.metrics()
    assert (snap.num_requests_running, snap.kv_cache_usage_perc, snap.decode_tok_s) == (1, 0.125, 0.978764)
    assert snap.prefix_cache_hits_total is None and snap.kv_blocks_total is None and snap.quant is None
    assert snap.recent_requests[-1].output_tokens == 3


def test_vllm_dialect() -> None:
    app = stub_server("vllm", {"max_model_len": 8192}, VLLM_TEXT, VLLM_CHUNKS)
    with live_server(app) as url, closing(RemoteEngine(url)) as remote:
        done = remote.submit(chat("hi"), SamplingParams(max_tokens=2, top_k=5)).result()
        assert (done.text, done.finish_reason) == ("Hello", "length")
        assert (done.timings.prompt_tokens, done.timings.cached_tokens, done.timings.output_tokens) == (5, 4, 2)
        body = app.state.bodies[-1]
        assert body["return_token_ids"] is True and body["top_k"] == 5 and body["model"] == "stub"
        assert remote.info.max_model_len == 8192
        wait_for(lambda: remote.metrics().num_requests_running is not None, "a scrape")
        snap = remote.metrics()
    assert (snap.num_requests_running, snap.prefix_cache_hits_total, snap.spec_decode_accepted_per_pos) == (
        5, 250, (35, 30))


def test_a_server_without_metrics_shows_only_client_measurements() -> None:
    app = stub_server("someone", {}, None, LLAMACPP_CHUNKS)
    with live_server(app) as url, closing(RemoteEngine(url)) as remote:
        remote.submit(chat("hi"), SamplingParams(max_tokens=8)).result()
        wait_for(lambda: app.state.scrapes >= 2, "two scrape attempts")
        snap = remote.metrics()
        assert remote.count_prompt_tokens(chat("hello world")) == 3 + 4  # no /tokenize: ~4 chars a token
    assert snap.num_requests_running is None and snap.kv_cache_usage_perc is None
    assert snap.prompt_tokens_total is None and snap.decode_tok_s is None
    assert len(snap.recent_requests) == 1 and snap.recent_requests[0].ttft_s is not None
