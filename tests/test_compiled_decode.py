"""The compiled decode step (torch.compile, built on a helper thread) on a tiny bf16 model with
int4 linears and an int8 lm_head: greedy tokens equal the eager step's at batch 1 and in a batch
of six, the compiled step really serves, and nothing recompiles on the engine thread."""

from __future__ import annotations

import copy
import dataclasses
import time

import pytest
import torch

from picochat.config import EngineConfig, QuantConfig, SamplingParams, SchedulerConfig
from picochat.engine.engine import LoadedModel, LocalEngine
from picochat.model.quantize import build_quantized_linears, swap_linears

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
PROMPTS = [[{"role": "user", "content": f"Tell me about {t}."}]
           for t in ("the sea", "a long road through the mountains", "cats", "why the sky is blue", "bread", "x")]


@pytest.fixture(scope="module")
def tiny_int4(tiny_loaded) -> LoadedModel:
    model = copy.deepcopy(tiny_loaded.model).to(torch.bfloat16)
    swap_linears(model, build_quantized_linears(model, QuantConfig(mode="int4")))
    return dataclasses.replace(tiny_loaded, model=model)


def run(loaded: LoadedModel, compile: bool) -> tuple[list[list[int]], list[int], LocalEngine]:
    engine = LocalEngine(EngineConfig(model="tiny", dtype="bfloat16", compile=compile,
                                      # prefill chunks stay under the rows where int4 linears
                                      # switch to a dequantized bf16 matmul (other rounding), so
                                      # both runs prefill alike however the six are batched
                                      scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=64)),
                         loaded=loaded)
    if compile:
        deadline = time.monotonic() + 900
        while engine.decode_step == "compiling":
            assert time.monotonic() < deadline, "compilation did not finish"
            time.sleep(0.5)
        assert engine.decode_step == "compiled", engine.metrics().activity
        assert engine.metrics().activity is None
    try:
        alone = engine.submit(PROMPTS[0], GREEDY).result().token_ids
        streams = [engine.submit(p, GREEDY) for p in PROMPTS]
        batch = [s.result().token_ids for s in streams]
    finally:
        engine.close()
    return batch, alone, engine


@pytest.mark.slow
def test_compiled_step_matches_eager_and_serves(tiny_int4):
    eager_batch, eager_alone, _ = run(tiny_int4, compile=False)
    batch, alone, engine = run(tiny_int4, compile=True)
    compiled = engine.runner.compiled
    assert compiled.ready and not compiled.failed  # never fell back (no recompilation)
    assert compiled.steps_served >= 2 * (GREEDY.max_tokens - 1)  # batch 1 and the batch of six
    assert alone == eager_alone
    assert batch == eager_batch


def test_failed_compilation_keeps_serving_eagerly(tiny_loaded, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", no_compiler)
    engine = LocalEngine(EngineConfig(model="tiny", compile=True), loaded=tiny_loaded)
    try:
        deadline = time.monotonic() + 30
        while engine.decode_step == "compiling":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert engine.decode_step == "eager (compilation failed)"
        assert "compilation failed" in engine.metrics().activity
        done = engine.submit(PROMPTS[0], GREEDY).result()
        assert done.error is None and len(done.token_ids) == GREEDY.max_tokens
    finally:
        engine.close()
