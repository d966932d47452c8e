"""Read a server's Prometheus text exposition into :class:`MetricsSnapshot` fields.

Knows picochat's names (``picochat:*``, see :mod:`picochat.server.prom`), vLLM's (``vllm:*``) and
llama.cpp's (``llamacpp:*``). A field that none of them provides stays None, so the console shows
it as unavailable, never as 0. Series of one name that differ by label (per model, per engine)
are summed; fractions are averaged. Throughput a server exposes only as counters is derived from
two scrapes.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from picochat.engine.protocol import DeviceStats, MetricsSnapshot
from picochat.server import prom

# other servers' names for the same MetricsSnapshot fields, tried after picochat's in this order
OTHER_NAMES: dict[str, tuple[str, ...]] = {
    "num_requests_running": ("vllm:num_requests_running", "llamacpp:requests_processing"),
    "num_requests_waiting": ("vllm:num_requests_waiting", "llamacpp:requests_deferred"),
    "kv_cache_usage_perc": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                            "llamacpp:kv_cache_usage_ratio"),
    "num_preemptions_total": ("vllm:num_preemptions_total",),
    "prompt_tokens_total": ("vllm:prompt_tokens_total", "llamacpp:prompt_tokens_total"),
    "generation_tokens_total": ("vllm:generation_tokens_total", "llamacpp:tokens_predicted_total"),
    "prefix_cache_queries_total": ("vllm:prefix_cache_queries_total",),
    "prefix_cache_hits_total": ("vllm:prefix_cache_hits_total",),
    "requests_finished_total": ("vllm:request_success_total",),
    "prefill_tok_s": ("llamacpp:prompt_tokens_seconds",),
    "decode_tok_s": ("llamacpp:predicted_tokens_seconds",),
    "spec_decode_num_drafts_total": ("vllm:spec_decode_num_drafts_total",),
    "spec_decode_num_draft_tokens_total": ("vllm:spec_decode_num_draft_tokens_total",),
    "spec_decode_num_accepted_tokens_total": ("vllm:spec_decode_num_accepted_tokens_total",),
}


def _picochat_names() -> dict[str, str]:
    names = {field: prom.PREFIX + name for field, (name, _) in prom.SNAPSHOT_GAUGES.items()}
    names |= {field: prom.PREFIX + name + "_total" for field, (name, _) in prom.SNAPSHOT_COUNTERS.items()}
    names["requests_finished_total"] = prom.PREFIX + prom.REQUEST_SUCCESS + "_total"
    return names


SOURCES: dict[str, tuple[str, ...]] = {
    field: (name, *OTHER_NAMES.get(field, ())) for field, name in _picochat_names().items()}
AVERAGED = {"kv_cache_usage_perc"}
INT_FIELDS = {f.name for f in dataclasses.fields(MetricsSnapshot) if str(f.type).startswith("int")}
ACCEPTED_PER_POS = ("picochat:spec_decode_num_accepted_tokens_per_pos_total",
                    "vllm:spec_decode_num_accepted_tokens_per_pos_total")

Samples = dict[str, list[tuple[dict[str, str], float]]]  # sample name → (labels, value) per series


def _samples(text: str) -> Samples:
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name].append((s.labels, s.value))
    return samples


def _value(samples: Samples, field: str) -> float | int | None:
    for name in SOURCES[field]:
        values = [v for _, v in samples.get(name, ())]
        if values:
            total = sum(values) / len(values) if field in AVERAGED else sum(values)
            return int(total) if field in INT_FIELDS else total
    return None


def _accepted_per_pos(samples: Samples) -> tuple[int, ...] | None:
    for name in ACCEPTED_PER_POS:
        by_pos: dict[int, float] = defaultdict(float)
        for labels, value in samples.get(name, ()):
            by_pos[int(labels.get("position", 0))] += value
        if by_pos:
            return tuple(int(by_pos.get(i, 0)) for i in range(max(by_pos) + 1))
    return None


def _memory(samples: Samples) -> tuple[DeviceStats, ...]:
    by_device: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for metric in (prom.MEMORY_USED, prom.MEMORY_TOTAL, prom.DEVICE_UTILIZATION, prom.PROCESS_RSS):
        for labels, value in samples.get(prom.PREFIX + metric, ()):
            by_device[(labels.get("device", "?"), labels.get("kind", "gpu"))][metric] = value

    def as_int(v: float | None) -> int | None:
        return None if v is None else int(v)

    return tuple(
        DeviceStats(name, "cpu" if kind == "cpu" else "gpu", as_int(v.get(prom.MEMORY_USED)),
                    as_int(v.get(prom.MEMORY_TOTAL)), v.get(prom.DEVICE_UTILIZATION),
                    as_int(v.get(prom.PROCESS_RSS)))
        for (name, kind), v in by_device.items())


def parse_exposition(text: str, time: float) -> MetricsSnapshot:
    """Prometheus text → snapshot (ValueError for text that is not an exposition)."""
    samples = _samples(text)
    values = {field: _value(samples, field) for field in SOURCES}
    return MetricsSnapshot(time=time, **values, spec_decode_accepted_per_pos=_accepted_per_pos(samples),
                           memory=_memory(samples))


def with_counter_rates(snap: MetricsSnapshot, previous: MetricsSnapshot | None) -> MetricsSnapshot:
    """Fill prefill / decode throughput the server does not report from the token counters'
    growth since the previous scrape (what vLLM's log line shows as average throughput)."""
    if previous is None or snap.time <= previous.time:
        return snap
    dt = snap.time - previous.time

    def rate(now: int | None, before: int | None) -> float | None:
        return None if now is None or before is None or now < before else (now - before) / dt

    changes = {}
    if snap.prefill_tok_s is None:
        changes["prefill_tok_s"] = rate(snap.prompt_tokens_total, previous.prompt_tokens_total)
    if snap.decode_tok_s is None:
        changes["decode_tok_s"] = rate(snap.generation_tokens_total, previous.generation_tokens_total)
    return dataclasses.replace(snap, **changes)
