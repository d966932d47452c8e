"""The bottom status line: what is serving (model, dtype, quantization, device, attention
backend, speculation) and how the next request will sample. The sampling summary always shows in
full; on a narrow terminal the serving part gives way (ellipsised)."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from picochat.config import SamplingParams
from picochat.engine.protocol import EngineInfo


class StatusBar(Widget):
    COMPONENT_CLASSES = {"status-bar--model", "status-bar--sampling"}
    DEFAULT_CSS = """
    StatusBar {
        height: 1;
        background: $panel;
        color: $text;
        padding: 0 1;
    }
    StatusBar > .status-bar--model { text-style: bold; color: $primary; }
    StatusBar > .status-bar--sampling { color: $secondary; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.info: EngineInfo | None = None
        self.sampling = SamplingParams()

    def show(self, info: EngineInfo, sampling: SamplingParams) -> None:
        self.info, self.sampling = info, sampling
        self.refresh()

    def render(self) -> Text:
        if self.info is None:
            return Text("loading…")
        info = self.info
        serving = Text(info.model, style=self.get_component_rich_style("status-bar--model"))
        parts = [info.dtype, f"quant {info.quant}", info.device, f"attn {info.attention}"]
        if info.spec != "off":
            parts.append(f"spec {info.spec}")
        serving.append(" · " + " · ".join(parts))
        sampling = Text(" │ " + self.sampling.summary())
        sampling.stylize(self.get_component_rich_style("status-bar--sampling"), 3)
        room = self.size.width - sampling.cell_len
        if serving.cell_len > room:
            serving.truncate(max(room, 1), overflow="ellipsis")
        return serving + sampling
