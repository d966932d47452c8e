"""The last requests as horizontal bars split into queue wait | prefill | decode.

Bars share one time scale (the longest request shown fills the width), so the cost of prefill
against decode is visible at a glance; each row ends with the prompt → output token counts and
the three durations (or the total, where the row is narrow).
"""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from picochat.engine.protocol import RequestTimings
from picochat.tui import format as fmt

SEGMENTS = ("queue", "prefill", "decode")


class RequestTimeline(Widget):
    COMPONENT_CLASSES = {"timeline--title", "timeline--queue", "timeline--prefill", "timeline--decode",
                         "timeline--text"}
    DEFAULT_CSS = """
    RequestTimeline {
        height: auto;
        max-height: 7;
        padding: 0 1;
        border-top: hkey $panel;
    }
    RequestTimeline > .timeline--title { text-style: bold; }
    RequestTimeline > .timeline--queue { color: $queue-color; }
    RequestTimeline > .timeline--prefill { color: $prefill-color; }
    RequestTimeline > .timeline--decode { color: $decode-color; }
    RequestTimeline > .timeline--text { color: $text-muted; }
    """

    def __init__(self, rows: int = 5, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.rows = rows
        self.requests: tuple[RequestTimings, ...] = ()

    def update_requests(self, requests: tuple[RequestTimings, ...]) -> None:
        shown = requests[-self.rows:]
        if [t.request_id for t in shown] != [t.request_id for t in self.requests]:
            self.requests = shown
            self.refresh(layout=True)

    def get_content_height(self, container, viewport, width: int) -> int:
        return 1 + max(1, len(self.requests))

    def render(self) -> Text:
        lines = [self._legend()]
        if not self.requests:
            lines.append(Text("no finished requests yet", style=self.get_component_rich_style("timeline--text")))
        shown = list(reversed(self.requests))  # newest on top
        details = [_detail(t, full=True) for t in shown]
        detail_width = max((len(d) for d in details), default=0)
        if self.size.width - 8 - detail_width < 12:  # narrow: totals only
            details = [_detail(t, full=False) for t in shown]
            detail_width = max((len(d) for d in details), default=0)
        bar_width = max(4, self.size.width - 8 - detail_width)
        longest = max((_total(t) for t in shown), default=0.0)
        for timings, detail in zip(shown, details):
            lines.append(self._row(timings, detail.rjust(detail_width), bar_width, longest))
        return Text("\n").join(lines)

    def _legend(self) -> Text:
        legend = Text("Requests ", style=self.get_component_rich_style("timeline--title"))
        for name in SEGMENTS:
            legend.append(" ■ ", style=self.get_component_rich_style(f"timeline--{name}"))
            legend.append(name)
        return legend

    def _row(self, t: RequestTimings, detail: str, bar_width: int, longest: float) -> Text:
        row = Text(f"{t.request_id[-6:]:>6} ", style=self.get_component_rich_style("timeline--text"))
        used = 0
        for name, seconds in zip(SEGMENTS, _durations(t)):
            cells = min(round(seconds / longest * bar_width) if longest > 0 else 0, bar_width - used)
            row.append("█" * cells, style=self.get_component_rich_style(f"timeline--{name}"))
            used += cells
        row.append(" " * (bar_width - used) + " ")
        row.append(detail, style=self.get_component_rich_style("timeline--text"))
        return row


def _durations(t: RequestTimings) -> tuple[float, float, float]:
    return (t.queue_s or 0.0, t.prefill_s or 0.0, t.decode_s or 0.0)


def _detail(t: RequestTimings, *, full: bool) -> str:
    """Token counts and durations: queue + prefill + decode, or only the total."""
    tokens = f"{t.prompt_tokens}→{t.output_tokens} tok"
    if full:
        return f"{tokens} · {' + '.join(fmt.duration(d) for d in _durations(t))}"
    return f"{tokens} · {fmt.duration(_total(t))}"


def _total(t: RequestTimings) -> float:
    return sum(_durations(t))
