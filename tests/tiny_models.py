"""Tiny random-weight Llama models with the real default tokenizer, for engine, bench and server
tests that need the engine's real behaviour in seconds."""

from __future__ import annotations

import threading
import time

import torch

from picochat.config import SamplingParams
from picochat.engine.engine import LoadedModel, LocalEngine
from picochat.model.config import ModelConfig
from picochat.model.tokenizer import Tokenizer
from picochat.model.transformer import Transformer


def tiny_model(tokenizer: Tokenizer, std: float, max_len: int = 512) -> LoadedModel:
    """Random weights: std 0.5 gives varied output, std 0.2 output that falls into loops
    (which n-gram drafts partly predict)."""
    cfg = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      max_position_embeddings=max_len, rope_theta=10000.0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return LoadedModel("tiny", model.eval(), tokenizer)


def wait_idle(engine: LocalEngine, timeout_s: float = 5.0) -> None:
    """Wait until the engine has no running or waiting request."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = engine.metrics()
        if m.num_requests_running == 0 and m.num_requests_waiting == 0:
            return
        time.sleep(0.01)
    raise AssertionError("engine did not go idle")


def submit_together(engine: LocalEngine, prompts: list, params: SamplingParams) -> list:
    """Submit while the engine thread is held in a no-op reconfigure, so it takes all of them in
    one drain and every run batches them alike, whatever the host's timing (in bf16 a request's
    tokens depend on which rows it shared its steps with)."""
    held, release = threading.Event(), threading.Event()
    apply = engine._apply_changes

    def hold(changes):
        held.set()
        release.wait(60)
        apply(changes)

    engine._apply_changes = hold
    try:
        engine.reconfigure(max_num_seqs=engine.config.scheduler.max_num_seqs)
        assert held.wait(60), "the engine did not take the reconfigure"
        return [engine.submit(p, params) for p in prompts]
    finally:
        release.set()
        engine._apply_changes = apply
