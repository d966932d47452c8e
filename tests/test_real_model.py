"""The real default model (SmolLM2-135M-Instruct, GGUF Q4_1) in fp32: picochat's greedy tokens
equal HF transformers' greedy tokens on the same GGUF, for chat prompts with and without a system
prompt, single- and multi-turn, run one at a time and batched together."""

from __future__ import annotations

import pytest
import torch

from picochat.config import EngineConfig, SamplingParams
from picochat.engine.engine import LocalEngine

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

CHATS = [
    [{"role": "user", "content": "Explain in detail how a bicycle works, part by part."}],
    [{"role": "system", "content": "You are a pirate. Answer in long sentences."},
     {"role": "user", "content": "Describe your ship and your crew."}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "Tell me a long story about its history."}],
    [{"role": "system", "content": "You write Python."},
     {"role": "user", "content": "Write a function that sorts a list of numbers with merge sort."}],
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_model(default_gguf_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf_path.parent), gguf_file=default_gguf_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def engine(default_gguf_path):
    engine = LocalEngine(EngineConfig(model=str(default_gguf_path), dtype="float32"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_greedy(hf_model, engine):
    outputs = []
    for chat in CHATS:
        ids = engine.tokenizer.encode_chat(chat)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2, pad_token_id=2)
        outputs.append(out[0, len(ids):].tolist())
    return outputs


def test_greedy_tokens_equal_hf_one_at_a_time(engine, hf_greedy):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    for chat, expected in zip(CHATS, hf_greedy):
        got = engine.submit(chat, params).result()
        assert got.token_ids == expected, engine.tokenizer.decode(expected)
        assert len(expected) >= 32 or expected[-1] == 2


def test_greedy_tokens_equal_hf_batched(engine, hf_greedy):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    streams = [engine.submit(chat, params) for chat in CHATS]
    assert [s.result().token_ids for s in streams] == hf_greedy
