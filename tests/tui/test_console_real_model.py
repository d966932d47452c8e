"""The console on the real default model (SmolLM2-135M; on the GPU where there is one): a reply
streams in, the panels show the engine's own metrics. Slow: loading the model takes tens of seconds."""

from __future__ import annotations

import pytest
import torch

from conftest import open_chat, send, wait_reply_done
from picochat.config import EngineConfig
from picochat.tui.app import make_app
from picochat.tui.messages import MetricsUpdated
from picochat.tui.widgets.message_view import MessageView
from picochat.tui.widgets.metric_plot import MetricPlot
from picochat.tui.widgets.request_timeline import RequestTimeline

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


def local_engine(progress):
    from picochat.engine.engine import LocalEngine

    return LocalEngine(EngineConfig(), progress=progress)


async def test_real_model_reply_streams_and_panels_fill(default_gguf_path):
    app = make_app(local_engine, metrics_interval=None)
    try:
        async with app.run_test(size=(120, 36)) as pilot:
            screen = await open_chat(pilot, timeout_s=240)
            screen.sampling = screen.sampling.replace(temperature=0.0, max_tokens=8)
            await send(pilot, "Say hello.")
            await wait_reply_done(pilot, screen, timeout_s=240)
            reply = screen.transcript.messages[-1]
            assert reply.content.strip() and reply.stats.finish_reason in ("stop", "length")
            assert 0 < reply.stats.output_tokens <= 8
            assert screen.query(MessageView).last().text == reply.content
            screen.post_message(MetricsUpdated(screen.engine.metrics()))
            await pilot.pause()
            kv = screen.query_one("#kv", MetricPlot).value_text
            assert kv.split("/")[1].split()[0] == str(screen.engine.metrics().kv_blocks_total)
            (timings,) = screen.query_one(RequestTimeline).requests
            assert timings.output_tokens == reply.stats.output_tokens and timings.prefill_s > 0
            assert "smollm2" in str(screen.query_one("StatusBar").render())
            # memory: the GPU's VRAM and utilisation from NVML on a CUDA box, host RAM elsewhere
            titles = [plot.title for plot in screen.query(MetricPlot)]
            on_gpu = torch.cuda.is_available()
            assert [device.kind for device in screen.engine.metrics().memory][:1] == ["gpu" if on_gpu else "cpu"]
            assert ("VRAM GPU0" in titles and "GPU0 util" in titles) if on_gpu else "RAM" in titles
    finally:
        app.close_engine()
