"""The fast decode steps on tiny models: greedy tokens equal the eager step's at batch 1 and in a
batch of six, and the fast step really serves, draft verifications included. On the CPU the
compiled step (torch.compile, built on a helper thread; bf16, int4 linears, int8 lm_head) never
recompiles on the engine thread; on a GPU the CUDA graphs (fp32) replay every decode step."""

from __future__ import annotations

import copy
import dataclasses
import time

import pytest
import torch

from picochat.config import EngineConfig, QuantConfig, SamplingParams, SchedulerConfig, SpecConfig
from picochat.engine.engine import LoadedModel, LocalEngine
from picochat.model.packed_linear import pack_linears
from picochat.model.quantize import build_quantized_linears, swap_linears
from tiny_models import submit_together

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
PROMPTS = [[{"role": "user", "content": f"Tell me about {t}."}]
           for t in ("the sea", "a long road through the mountains", "cats", "why the sky is blue", "bread", "x")]


def int4(loaded: LoadedModel) -> LoadedModel:
    model = copy.deepcopy(loaded.model).to(torch.bfloat16)
    swap_linears(model, build_quantized_linears(model, QuantConfig(mode="int4")))
    return dataclasses.replace(loaded, model=model)


@pytest.fixture(scope="module")
def tiny_int4(tiny_loaded) -> LoadedModel:
    return int4(tiny_loaded)


@pytest.fixture(scope="module")
def tiny_bf16_packed(tiny_loaded) -> LoadedModel:
    """bf16 linears packed for oneDNN as a CPU build packs them (where it does): the compiled
    step is then built with inductor's freezing."""
    model = copy.deepcopy(tiny_loaded.model).to(torch.bfloat16)
    pack_linears(model)
    return dataclasses.replace(tiny_loaded, model=model)


def start(loaded: LoadedModel, compile: bool, device: str = "cpu", dtype: str = "bfloat16",
          fast_step: str = "compiled", spec: SpecConfig = SpecConfig()) -> LocalEngine:
    engine = build(loaded, compile, device, dtype, spec)
    if compile:
        wait_for_fast_step(engine, fast_step)
    return engine


def build(loaded: LoadedModel, compile: bool, device: str, dtype: str, spec: SpecConfig = SpecConfig()) -> LocalEngine:
    return LocalEngine(EngineConfig(model="tiny", dtype=dtype, compile=compile, device=device, spec=spec,
                                    # prefill chunks stay under the rows where int4 linears
                                    # switch to a dequantized bf16 matmul (other rounding), so
                                    # both runs prefill alike however the six are batched
                                    scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=64)),
                       loaded=dataclasses.replace(loaded, model=copy.deepcopy(loaded.model)))


def wait_for_fast_step(engine: LocalEngine, fast_step: str) -> None:
    deadline = time.monotonic() + 900
    while engine.decode_step == "compiling":
        assert time.monotonic() < deadline, "compilation did not finish"
        time.sleep(0.5)
    assert engine.decode_step == fast_step, engine.metrics().activity
    assert engine.metrics().activity is None


def run(loaded: LoadedModel, compile: bool, device: str = "cpu", dtype: str = "bfloat16",
        fast_step: str = "compiled") -> tuple[list[list[int]], list[int], LocalEngine]:
    engine = start(loaded, compile, device, dtype, fast_step)
    try:
        alone = engine.submit(PROMPTS[0], GREEDY).result().token_ids
        batch = [s.result().token_ids for s in submit_together(engine, PROMPTS, GREEDY)]
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


@pytest.mark.slow
def test_frozen_compiled_step_matches_eager_logits(tiny_bf16_packed):
    """Packed bf16 linears: the step is built with freezing (inductor's own oneDNN-packed
    constants); its logits equal the eager step's within bf16 rounding (greedy tokens of a random
    tiny model split at its many near-ties either way, frozen or not)."""
    engine = start(tiny_bf16_packed, compile=True)
    try:
        compiled = engine.runner.compiled
        for batch in (1, 2):
            with torch.inference_mode():  # inference tensors, as the runner makes them
                example = compiled._example(batch)
            eager = engine.model(*example)
            torch.testing.assert_close(compiled(*example), eager, rtol=2e-2, atol=2e-2 * eager.abs().max().item())
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                           reason="needs a CUDA GPU")])])
def test_fast_step_verifies_drafts(looping_loaded, device):
    """With n-gram speculation, each verification runs through the fast step (compiled on the
    CPU, int4 bf16; CUDA graphs on a GPU, fp32) as k + 1 decode rows, and the greedy tokens stay
    those of the eager step without speculation."""
    if device == "cpu":
        model, dtype, fast_step = int4(looping_loaded), "bfloat16", "compiled"
    else:
        model, dtype, fast_step = looping_loaded, "float32", "cuda graphs"
    plain = start(model, compile=False, device=device, dtype=dtype)
    try:
        expected = plain.submit(PROMPTS[1], GREEDY).result().token_ids
    finally:
        plain.close()
    engine = start(model, compile=True, device=device, dtype=dtype, fast_step=fast_step,
                   spec=SpecConfig(mode="ngram", k=3, ngram_n=2))
    rows_per_step = []
    decode_rows = engine.runner._decode_rows

    def counted(sched):
        rows = decode_rows(sched)
        rows_per_step.append(len(rows[0]))
        return rows

    engine.runner._decode_rows = counted
    try:
        done = engine.submit(PROMPTS[1], GREEDY).result()
    finally:
        engine.close()
    assert done.token_ids == expected
    assert done.timings.spec_steps > 0 and done.accepted_draft_tokens > 0
    # one request alone: a step of more than one row is a verification, and the fast step served
    # every step after the prefill
    assert sum(rows > 1 for rows in rows_per_step) == done.timings.spec_steps
    fast = engine.runner.compiled
    assert fast.steps_served == len(rows_per_step)
    assert fast.ready and not fast.failed


def test_failed_compilation_keeps_serving_eagerly(tiny_loaded, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", no_compiler)
    engine = LocalEngine(EngineConfig(model="tiny", compile=True, device="cpu"), loaded=tiny_loaded)
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager_and_serve(tiny_loaded):
    eager_batch, eager_alone, _ = run(tiny_loaded, compile=False, device="cuda", dtype="float32")
    batch, alone, engine = run(tiny_loaded, compile=True, device="cuda", dtype="float32", fast_step="cuda graphs")
    graphs = engine.runner.compiled
    assert graphs.ready and not graphs.failed and sorted(graphs._graphs) == [1, 2, 4, 6]
    assert graphs.steps_served >= 2 * (GREEDY.max_tokens - 1)  # batch 1 and the batch of six
    assert alone == eager_alone
    assert batch == eager_batch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engines_built_together_both_capture_their_graphs(tiny_loaded):
    """Two engines of one process built at once (a benchmark's pair) both replay CUDA graphs:
    entering a capture synchronizes the device, which fails while the other engine captures."""
    engines = [build(tiny_loaded, compile=True, device="cuda", dtype="float32") for _ in range(2)]
    try:
        for engine in engines:
            wait_for_fast_step(engine, "cuda graphs")
        for engine in engines:
            done = engine.submit(PROMPTS[0], GREEDY).result()
            assert done.error is None and len(done.token_ids) == GREEDY.max_tokens
            assert engine.runner.compiled.steps_served == GREEDY.max_tokens - 1
    finally:
        for engine in engines:
            engine.close()


def test_compile_left_unset_builds_no_cpu_step(tiny_loaded):
    """The console's default (``compile=None``): CUDA graphs on a GPU, no torch.compile on a CPU."""
    from picochat.engine.engine import IDLE_BEFORE_COMPILE_S

    engine = LocalEngine(EngineConfig(model="tiny", compile=None, device="cpu"), loaded=tiny_loaded)
    try:
        time.sleep(IDLE_BEFORE_COMPILE_S + 1.0)  # idle long enough for a build to have started
        assert engine.decode_step == "eager" and engine.runner.compiled is None
        assert engine.submit(PROMPTS[0], GREEDY).result().error is None
    finally:
        engine.close()


@pytest.mark.slow
def test_compiled_int4_step_keeps_the_default_models_greedy_tokens(default_gguf_path):
    """The default model, int4: the compiled step's greedy tokens equal the eager step's, one
    request at a time and five together. (Every reduction of the step is one of picochat's ops,
    shared by both paths: with inductor's own RMSNorm sums the tokens parted after 16-154.)"""
    prompts = [[{"role": "user", "content": text}] for text in (
        "Write a short story about a robot learning to paint.", "Explain how a CPU cache works.",
        "List ten fruits and describe each in one sentence.", "What is the capital of France? Tell me its history.",
        "Write a Python function that checks whether a number is prime, and explain it.")]
    params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    outputs = []
    for compile in (False, True):
        engine = LocalEngine(EngineConfig(model=str(default_gguf_path), dtype="bfloat16", quant=QuantConfig("int4"),
                                          compile=compile, scheduler=SchedulerConfig(enable_prefix_caching=False)))
        try:
            if compile:
                wait_for_fast_step(engine, "compiled")
            alone = [engine.submit(p, params).result().token_ids for p in prompts]
            together = [s.result().token_ids for s in submit_together(engine, prompts, params)]
            outputs.append((alone, together))
            if compile:
                assert engine.runner.compiled.steps_served >= 2 * (params.max_tokens - 1)
        finally:
            engine.close()
    assert outputs[1] == outputs[0]
