"""A labelled time series: a title and the current value on one line, a sparkline under it.

The sparkline scales from 0 to ``ceiling`` (a fixed maximum such as 100 %) or, without one, to the
largest value in view, so a flat line at the top means "at the limit", not "constant". A value of
None (the engine cannot measure it) leaves the history alone and shows "n/a".
"""

from __future__ import annotations

from collections import deque

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

BARS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int, ceiling: float | None) -> str:
    """The last ``width`` values as bar characters scaled to [0, ceiling]."""
    shown = values[-width:] if width > 0 else []
    top = ceiling if ceiling is not None else max(shown, default=0.0)
    if top <= 0:
        return BARS[1] * len(shown)
    steps = len(BARS) - 1
    return "".join(BARS[max(1, min(steps, round(v / top * steps)))] if v > 0 else BARS[1] for v in shown)


class MetricPlot(Widget):
    COMPONENT_CLASSES = {"metric-plot--title", "metric-plot--value", "metric-plot--spark"}
    DEFAULT_CSS = """
    MetricPlot {
        height: 2;
    }
    MetricPlot > .metric-plot--title {
        color: $text-muted;
    }
    MetricPlot > .metric-plot--value {
        text-style: bold;
    }
    MetricPlot > .metric-plot--spark {
        color: $primary;
    }
    MetricPlot.-prefill > .metric-plot--spark {
        color: $prefill-color;
    }
    MetricPlot.-decode > .metric-plot--spark {
        color: $decode-color;
    }
    MetricPlot.-queue > .metric-plot--spark {
        color: $queue-color;
    }
    """

    def __init__(self, title: str, *, ceiling: float | None = None, history: int = 240,
                 id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.title = title
        self.ceiling = ceiling
        self.values: deque[float] = deque(maxlen=history)
        self.value_text = "n/a"
        self._theme_styles: tuple[object, tuple[Style, Style, Style]] | None = None  # (theme, styles)

    def push(self, value: float | None, text: str) -> None:
        """Record a sample (None: unavailable) and the text to show for it."""
        if value is not None:
            self.values.append(value)
        self.value_text = text
        self.refresh()

    def _part_styles(self) -> tuple[Style, Style, Style]:
        """Title, value and sparkline styles, built once per theme (building them took a third
        of the console's render time while a reply streamed)."""
        theme = self.app.theme
        if self._theme_styles is None or self._theme_styles[0] != theme:
            self._theme_styles = (theme, tuple(self.get_component_rich_style(f"metric-plot--{part}")
                                         for part in ("title", "value", "spark")))
        return self._theme_styles[1]

    def render(self) -> Text:
        width = self.size.width
        title_style, value_style, spark_style = self._part_styles()
        head = Text(self.title, style=title_style)
        value = Text(self.value_text, style=value_style)
        head.append(" " * max(1, width - len(head) - len(value)))
        head.append_text(value)
        spark = Text(sparkline(list(self.values), width, self.ceiling), style=spark_style)
        return Text("\n").join([head, spark])
