"""The side panel: the engine's inner life over time, one MetricPlot per quantity.

TTFT is plotted per finished request; prefill and decode throughput, KV-cache occupancy, queue
depth and memory are sampled each time a MetricsSnapshot arrives. Memory shows each GPU (memory
and utilisation, from NVML) or, without one, host RAM with the RSS and CPU % of the engine's
process (the console runs it in a process of its own).
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll

from picochat.engine.protocol import DeviceStats, MetricsSnapshot
from picochat.tui import format as fmt
from picochat.tui.widgets.metric_plot import MetricPlot


class MetricsPanel(VerticalScroll):
    DEFAULT_CSS = """
    MetricsPanel {
        width: 32;
        padding: 0 1;
        border-left: tall $panel;
        scrollbar-size-vertical: 1;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._seen_requests: set[str] = set()
        self._devices: list[tuple[MetricPlot, MetricPlot]] = []
        self._spec_counts: tuple[int, int] | None = None  # (draft tokens, accepted) at the last update

    def compose(self) -> ComposeResult:
        yield MetricPlot("TTFT / request", id="ttft")
        yield MetricPlot("prefill", id="prefill", classes="-prefill")
        yield MetricPlot("decode", id="decode", classes="-decode")
        yield MetricPlot("KV cache", ceiling=1.0, id="kv")
        yield MetricPlot("waiting", id="waiting", classes="-queue")
        yield MetricPlot("running", id="running")
        yield MetricPlot("spec acceptance", ceiling=1.0, id="spec")

    def _plot(self, plot_id: str) -> MetricPlot:
        return self.query_one(f"#{plot_id}", MetricPlot)

    def update_metrics(self, snap: MetricsSnapshot) -> None:
        finished = [t for t in snap.recent_requests if t.request_id not in self._seen_requests]
        self._seen_requests = {t.request_id for t in snap.recent_requests}
        for timings in finished:
            if timings.ttft_s is not None:
                self._plot("ttft").push(timings.ttft_s, fmt.duration(timings.ttft_s))
        self._plot("prefill").push(snap.prefill_tok_s, fmt.rate(snap.prefill_tok_s))
        self._plot("decode").push(snap.decode_tok_s, fmt.rate(snap.decode_tok_s))
        kv_text = fmt.percent(snap.kv_cache_usage_perc)
        if snap.kv_blocks_used is not None and snap.kv_blocks_total is not None:
            kv_text = f"{snap.kv_blocks_used}/{snap.kv_blocks_total} {kv_text}"
        self._plot("kv").push(snap.kv_cache_usage_perc, kv_text)
        for plot_id, value in (("waiting", snap.num_requests_waiting), ("running", snap.num_requests_running)):
            self._plot(plot_id).push(value, fmt.UNAVAILABLE if value is None else str(value))
        self._update_spec(snap)
        self._update_memory(snap.memory)

    def _update_spec(self, snap: MetricsSnapshot) -> None:
        """Acceptance rate of the drafts verified since the last update (vLLM's counters)."""
        drafted, accepted = snap.spec_decode_num_draft_tokens_total, snap.spec_decode_num_accepted_tokens_total
        if drafted is None or accepted is None:
            self._plot("spec").push(None, fmt.UNAVAILABLE)
            return
        before = self._spec_counts or (drafted, accepted)
        self._spec_counts = (drafted, accepted)
        new_drafted = drafted - before[0]
        if new_drafted > 0:
            rate = (accepted - before[1]) / new_drafted
            self._plot("spec").push(rate, fmt.percent(rate))
        else:
            total = snap.spec_acceptance_rate
            self._plot("spec").push(None, "idle" if total is None else f"{fmt.percent(total)} overall")

    def _update_memory(self, devices: tuple[DeviceStats, ...]) -> None:
        while len(self._devices) < len(devices):
            device = devices[len(self._devices)]
            gpu = device.name.split(" ", 1)[0]  # "GPU0 NVIDIA H100 80GB HBM3" → "GPU0"
            plots = (MetricPlot(f"VRAM {gpu}" if device.kind == "gpu" else "RAM", ceiling=device.memory_total_bytes),
                     MetricPlot(f"{gpu} util" if device.kind == "gpu" else "CPU (engine)",
                                ceiling=100.0 if device.kind == "gpu" else None))
            self.mount_all(plots)
            self._devices.append(plots)
        for device, (memory, load) in zip(devices, self._devices):
            memory.push(device.memory_used_bytes,
                        f"{fmt.gib(device.memory_used_bytes)}/{fmt.gib(device.memory_total_bytes)} GiB")
            util = fmt.UNAVAILABLE if device.utilization_pct is None else f"{device.utilization_pct:.0f}%"
            if device.process_rss_bytes is not None:
                util = f"RSS {fmt.gib(device.process_rss_bytes)} GiB {util}"
            load.push(device.utilization_pct, util)
