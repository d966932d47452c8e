"""Quantization inside the engine on the real default model: int4 straight from the GGUF's Q4_1
blocks, and a live switch under load — the old weights keep serving while the new ones are
prepared, requests running during the swap complete, none is lost."""

from __future__ import annotations

import time

import pytest

from picochat.config import EngineConfig, QuantConfig, SamplingParams
from picochat.engine.engine import LocalEngine
from picochat.model.quant_linear import Int4Linear, Int8Linear

pytestmark = pytest.mark.slow
PARAMS = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
CHAT = [{"role": "user", "content": "Describe a lighthouse at night."}]


def test_int4_from_gguf_blocks_serves(default_gguf_path):
    engine = LocalEngine(EngineConfig(model=str(default_gguf_path), dtype="bfloat16", quant=QuantConfig("int4")))
    try:
        linears = [m for m in engine.model.modules() if isinstance(m, Int4Linear)]
        assert len(linears) == 4 * 30 and all(m.group == 32 for m in linears)
        out = engine.submit(CHAT, PARAMS).result()
        assert len(out.token_ids) == 48 and out.text.strip()
        assert engine.metrics().quant == "int4" and engine.info.quant == "int4"
    finally:
        engine.close()


def test_live_switch_under_load_loses_nothing(default_gguf_path):
    engine = LocalEngine(EngineConfig(model=str(default_gguf_path), dtype="bfloat16"))
    try:
        float_bytes = engine.metrics().weight_bytes
        streams = [engine.submit(CHAT, PARAMS) for _ in range(3)]
        engine.reconfigure(quant=QuantConfig("int8"))
        more = [engine.submit(CHAT, PARAMS) for _ in range(2)]
        results = [s.result() for s in streams + more]
        assert all(r.finish_reason == "length" and len(r.token_ids) == 48 for r in results)
        deadline = time.monotonic() + 300
        while engine.info.quant != "int8":
            assert time.monotonic() < deadline, engine.metrics().activity
            assert "failed" not in (engine.metrics().activity or "")
            time.sleep(0.2)
        assert any(isinstance(m, Int8Linear) for m in engine.model.modules())
        assert engine.metrics().weight_bytes < 0.7 * float_bytes
        after = engine.submit(CHAT, PARAMS).result()
        assert after.finish_reason == "length" and after.text.strip()
    finally:
        engine.close()
