"""/metrics in Prometheus text format, and reading picochat / vLLM / llama.cpp expositions back."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import openai
from fake_engine import DEFAULT_REPLY, FakeEngine, chat
from metrics_samples import LLAMACPP_TEXT, VLLM_TEXT
from prometheus_client.parser import text_string_to_metric_families
from server_live import MODEL

from picochat.engine.protocol import Delta, DeviceStats, MetricsSnapshot, RequestTimings, Stream, now
from picochat.remote_metrics import parse_exposition, with_counter_rates
from picochat.server.app import _observed
from picochat.server.prom import ServerMetrics

N_WORDS = len(DEFAULT_REPLY.split(" "))


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels without model_name) → value, parsed by prometheus-client."""
    response = httpx.get(url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def test_metrics_use_vllm_names_under_the_picochat_prefix(url: str) -> None:
    names = {name for name, _ in scrape(url)}
    assert all(name.startswith("picochat:") for name in names)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "num_preemptions_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "time_to_first_token_seconds_count",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                 "request_queue_time_seconds_count", "request_prefill_time_seconds_count",
                 "request_decode_time_seconds_count", "memory_used_bytes", "memory_total_bytes"):
        assert f"picochat:{name}" in names, name


def test_gauges_and_counters_come_from_the_engine_snapshot(url: str, engine: FakeEngine) -> None:
    m, snap = scrape(url), engine.metrics()
    assert m[("picochat:kv_cache_usage_perc", ())] == snap.kv_cache_usage_perc
    assert m[("picochat:prompt_tokens_total", ())] == snap.prompt_tokens_total
    assert m[("picochat:prefix_cache_hits_total", ())] == snap.prefix_cache_hits_total
    dev = snap.memory[0]
    assert m[("picochat:memory_total_bytes", (("device", dev.name), ("kind", dev.kind)))] == dev.memory_total_bytes


def test_request_histograms_move_as_requests_finish(url: str) -> None:
    before = scrape(url)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=100)
    list(client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=2, stream=True))
    after = scrape(url)

    def moved(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert moved(f"picochat:{name}_count") == 2, name
    assert moved("picochat:inter_token_latency_seconds_count") == 0  # the fake engine records no gaps
    assert moved("picochat:request_generation_tokens_sum") == N_WORDS + 2
    assert moved("picochat:request_success_total", (("finished_reason", "stop"),)) == 1
    assert moved("picochat:request_success_total", (("finished_reason", "length"),)) == 1


def test_served_ttft_runs_to_the_first_token_leaving_the_server() -> None:
    """The engine produced its first token 1 s after arrival, but the token reached the server's
    loop 10 s after it: the histogram holds the 10 s the client waited, not the engine's 1 s."""
    metrics = ServerMetrics(MODEL, lambda: None)
    stream = Stream("r")
    arrival = now() - 10.0
    timings = RequestTimings("r", arrival=arrival, scheduled=arrival, first_token=arrival + 1.0,
                             finished=arrival + 1.0, output_tokens=1, finish_reason="length")
    stream._put(Delta("r", "hi", (1,)))
    stream._put(Delta("r", "", (), finish_reason="length", timings=timings))

    async def read() -> None:
        async for _ in _observed(stream, metrics):
            pass

    asyncio.run(read())
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    ttft = {s.name: s.value for s in families["picochat:time_to_first_token_seconds"].samples}
    assert ttft["picochat:time_to_first_token_seconds_count"] == 1
    assert ttft["picochat:time_to_first_token_seconds_sum"] >= 10.0
    decode = {s.name: s.value for s in families["picochat:request_decode_time_seconds"].samples}
    assert 0.0 <= decode["picochat:request_decode_time_seconds_sum"] < 1.0  # served first token to served end


# ------------------------------------------------------------------------ reading them back
def test_picochat_exposition_round_trips_into_a_snapshot(url: str, engine: FakeEngine) -> None:
    parsed, snap = parse_exposition(httpx.get(url + "/metrics").text, time=1.0), engine.metrics()
    same = ("num_requests_running", "num_requests_waiting", "num_preemptions_total", "kv_cache_usage_perc",
            "kv_blocks_used", "kv_blocks_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
            "prompt_tokens_total", "generation_tokens_total", "prefill_tok_s", "decode_tok_s",
            "tokens_per_step", "weight_bytes", "memory", "spec_decode_num_drafts_total")
    for field in same:
        assert getattr(parsed, field) == getattr(snap, field), field
    assert parsed.requests_finished_total is None  # no request has finished on this server yet


def test_vllm_exposition_sums_engines_and_averages_fractions() -> None:
    snap = parse_exposition(VLLM_TEXT, time=1.0)
    assert (snap.num_requests_running, snap.num_requests_waiting) == (5, 1)
    assert snap.kv_cache_usage_perc == 0.375
    assert (snap.prefix_cache_queries_total, snap.prefix_cache_hits_total) == (1000, 250)
    assert (snap.prompt_tokens_total, snap.generation_tokens_total, snap.num_preemptions_total) == (5000, 700, 2)
    assert snap.requests_finished_total == 12
    assert snap.spec_mean_accept_len == 1 + 100 / 40
    assert snap.spec_decode_accepted_per_pos == (35, 30)
    # vLLM has no such gauges or no such numbers: unavailable, not 0
    assert snap.prefill_tok_s is None and snap.decode_tok_s is None
    assert snap.kv_blocks_used is None and snap.weight_bytes is None and snap.memory == ()


def test_llamacpp_exposition_maps_onto_the_same_fields() -> None:
    snap = parse_exposition(LLAMACPP_TEXT, time=1.0)
    assert (snap.num_requests_running, snap.num_requests_waiting) == (1, 0)
    assert snap.kv_cache_usage_perc == 0.125
    assert (snap.prompt_tokens_total, snap.generation_tokens_total) == (6886, 3469)
    assert (snap.prefill_tok_s, snap.decode_tok_s) == (2.37151, 0.978764)
    assert snap.prefix_cache_hits_total is None and snap.num_preemptions_total is None
    assert snap.spec_decode_num_drafts_total is None and snap.requests_finished_total is None


def test_an_unknown_exposition_leaves_everything_unavailable() -> None:
    snap = parse_exposition("# TYPE other_metric gauge\nother_metric 1\n", time=1.0)
    assert snap == MetricsSnapshot(time=1.0)


def test_throughput_is_derived_from_counters_between_scrapes_when_missing() -> None:
    first = parse_exposition(VLLM_TEXT, time=10.0)
    second = dataclasses.replace(first, time=12.0, prompt_tokens_total=6000, generation_tokens_total=900)
    rated = with_counter_rates(second, first)
    assert (rated.prefill_tok_s, rated.decode_tok_s) == (500.0, 100.0)
    assert with_counter_rates(second, None).decode_tok_s is None
    given = dataclasses.replace(second, decode_tok_s=42.0)
    assert with_counter_rates(given, first).decode_tok_s == 42.0  # the server's own gauge wins


def test_memory_gauges_become_device_stats() -> None:
    text = ('picochat:memory_used_bytes{device="NVIDIA H100",kind="gpu"} 1024\n'
            'picochat:memory_total_bytes{device="NVIDIA H100",kind="gpu"} 4096\n')
    assert parse_exposition(text, time=0.0).memory == (DeviceStats("NVIDIA H100", "gpu", 1024, 4096, None, None),)
