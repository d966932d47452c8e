"""Prometheus exposition of engine metrics under vLLM's names with a ``picochat:`` prefix.

Gauges and counters are read from ``engine.metrics()`` when /metrics is scraped; the request
histograms (TTFT, inter-token latency, end-to-end, queue, prefill, decode, tokens per request) are
observed from each finished request's :class:`RequestTimings`. The name tables here are also what
:mod:`picochat.remote_metrics` reads back, so a remote console sees what a local one sees.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from picochat.engine.protocol import Engine, MetricsSnapshot, RequestTimings

PREFIX = "picochat:"

# MetricsSnapshot field → (metric name, help). Counter names go without "_total": the client adds it.
SNAPSHOT_GAUGES = {
    "num_requests_running": ("num_requests_running", "Requests in the running batch."),
    "num_requests_waiting": ("num_requests_waiting", "Requests waiting to be scheduled."),
    "kv_cache_usage_perc": ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1)."),
    "kv_blocks_used": ("kv_blocks_used", "KV-cache blocks in use."),
    "kv_blocks_total": ("kv_blocks_total", "KV-cache blocks in the pool."),
    "prefill_tok_s": ("prefill_tokens_per_second", "Recent prefill throughput over all requests."),
    "decode_tok_s": ("decode_tokens_per_second", "Recent decode throughput over all requests."),
    "tokens_per_step": ("tokens_per_step", "Tokens computed in the last engine step."),
    "weight_bytes": ("model_weight_bytes", "Bytes of model weights in memory."),
}
SNAPSHOT_COUNTERS = {
    "num_preemptions_total": ("num_preemptions", "Requests preempted to free KV blocks."),
    "prompt_tokens_total": ("prompt_tokens", "Prefill tokens processed."),
    "generation_tokens_total": ("generation_tokens", "Generation tokens produced."),
    "prefix_cache_queries_total": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits_total": ("prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    "spec_decode_num_drafts_total": ("spec_decode_num_drafts", "Speculative draft proposals."),
    "spec_decode_num_draft_tokens_total": ("spec_decode_num_draft_tokens", "Draft tokens proposed."),
    "spec_decode_num_accepted_tokens_total": ("spec_decode_num_accepted_tokens", "Draft tokens accepted."),
}
ACCEPTED_PER_POS = "spec_decode_num_accepted_tokens_per_pos"
MEMORY_USED, MEMORY_TOTAL = "memory_used_bytes", "memory_total_bytes"
DEVICE_UTILIZATION, PROCESS_RSS = "device_utilization_perc", "process_rss_bytes"
REQUEST_SUCCESS = "request_success"

# vLLM's bucket boundaries
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def _present(value: float | None) -> list[float]:
    return [] if value is None else [value]


def _e2e(t: RequestTimings) -> float | None:
    return None if t.finished is None else t.finished - t.arrival


# histogram name → (help, buckets, the request's observations)
REQUEST_HISTOGRAMS: dict[str, tuple[str, tuple[float, ...], Callable[[RequestTimings], list[float]]]] = {
    "time_to_first_token_seconds": ("Time to first token.", TTFT_BUCKETS, lambda t: _present(t.ttft_s)),
    "inter_token_latency_seconds": ("Gap between successive output tokens.", ITL_BUCKETS, lambda t: t.itl),
    "e2e_request_latency_seconds": ("Arrival to last token.", LATENCY_BUCKETS, lambda t: _present(_e2e(t))),
    "request_queue_time_seconds": ("Time waiting before first scheduled.", LATENCY_BUCKETS,
                                   lambda t: _present(t.queue_s)),
    "request_prefill_time_seconds": ("First scheduled to first token.", LATENCY_BUCKETS,
                                     lambda t: _present(t.prefill_s)),
    "request_decode_time_seconds": ("First token to last token.", LATENCY_BUCKETS,
                                    lambda t: _present(t.decode_s)),
    "request_prompt_tokens": ("Prompt tokens per request.", TOKEN_BUCKETS, lambda t: [t.prompt_tokens]),
    "request_generation_tokens": ("Output tokens per request.", TOKEN_BUCKETS, lambda t: [t.output_tokens]),
}


class _SnapshotCollector(Collector):
    """Turns one ``engine.metrics()`` call per scrape into gauge and counter families."""

    def __init__(self, engine: Callable[[], Engine | None], model_name: str):
        self._engine = engine
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None:  # still loading
            return
        snap = engine.metrics()
        for field, (name, doc) in SNAPSHOT_GAUGES.items():
            yield from self._family(GaugeMetricFamily, name, doc, getattr(snap, field))
        for field, (name, doc) in SNAPSHOT_COUNTERS.items():
            yield from self._family(CounterMetricFamily, name, doc, getattr(snap, field))
        yield from self._accepted_per_pos(snap)
        yield from self._memory(snap)

    def _family(self, kind, name: str, doc: str, value: float | None) -> Iterator[Metric]:
        if value is not None:
            family = kind(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self._model_name], value)
            yield family

    def _accepted_per_pos(self, snap: MetricsSnapshot) -> Iterator[Metric]:
        if snap.spec_decode_accepted_per_pos is not None:
            family = CounterMetricFamily(PREFIX + ACCEPTED_PER_POS, "Draft tokens accepted, per position.",
                                         labels=["model_name", "position"])
            for pos, count in enumerate(snap.spec_decode_accepted_per_pos):
                family.add_metric([self._model_name, str(pos)], count)
            yield family

    def _memory(self, snap: MetricsSnapshot) -> Iterator[Metric]:
        if not snap.memory:
            return
        docs = {MEMORY_USED: "Device memory in use.", MEMORY_TOTAL: "Device memory in all.",
                DEVICE_UTILIZATION: "GPU utilisation, or this process's CPU use (percent).",
                PROCESS_RSS: "Resident memory of the server process."}
        families = {name: GaugeMetricFamily(PREFIX + name, doc, labels=["device", "kind"])
                    for name, doc in docs.items()}
        for dev in snap.memory:
            values = {MEMORY_USED: dev.memory_used_bytes, MEMORY_TOTAL: dev.memory_total_bytes,
                      DEVICE_UTILIZATION: dev.utilization_pct, PROCESS_RSS: dev.process_rss_bytes}
            for name, value in values.items():
                if value is not None:
                    families[name].add_metric([dev.name, dev.kind], value)
        yield from (f for f in families.values() if f.samples)


class ServerMetrics:
    """The server's registry: engine snapshot at scrape time plus per-request histograms."""

    def __init__(self, model_name: str, engine: Callable[[], Engine | None]):
        self.registry = CollectorRegistry()
        self._histograms = {
            name: Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets,
                            registry=self.registry).labels(model_name)
            for name, (doc, buckets, _) in REQUEST_HISTOGRAMS.items()}
        self._success = Counter(PREFIX + REQUEST_SUCCESS, "Finished requests, by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name
        self.registry.register(_SnapshotCollector(engine, model_name))

    def observe(self, timings: RequestTimings) -> None:
        """Record one finished request."""
        for name, (_, _, values) in REQUEST_HISTOGRAMS.items():
            for value in values(timings):
                self._histograms[name].observe(value)
        self._success.labels(self._model_name, timings.finish_reason or "stop").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
