"""picochat's transformer equals HF transformers on tiny random Llama and Qwen2 models (fp32):
logits within 1e-4 for a full prefill, and for prefill chunks and decode steps over the paged
cache with several block sizes."""

from __future__ import annotations

import pytest
import torch

from picochat.engine.kv_cache import KVCacheManager
from picochat.engine.request import Request
from picochat.engine.runner import ModelRunner
from picochat.engine.scheduler import ScheduledChunk, SchedulerOutput
from picochat.model.config import ModelConfig
from picochat.model.transformer import Transformer

transformers = pytest.importorskip("transformers")


def tiny_hf_model(arch: str, tie: bool):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # make Qwen2's q/k/v biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval()


def to_picochat(hf_model) -> Transformer:
    cfg = ModelConfig.from_hf_config(hf_model.config.to_dict())
    return Transformer.from_hf_tensors(cfg, dict(hf_model.state_dict()), torch.float32)


def run_steps(model: Transformer, tokens: list[int], chunk_sizes: list[int], block_size: int) -> torch.Tensor:
    """Feed ``tokens`` in chunks through the paged cache; return logits of every position."""
    kv = KVCacheManager(num_blocks=64, block_size=block_size, enable_prefix_caching=False)
    runner = ModelRunner(model, kv, torch.float32, torch.device("cpu"))
    req = Request("r", list(tokens), len(tokens), None, len(tokens), None, None, frozenset())  # type: ignore[arg-type]
    out = []
    for n in chunk_sizes:
        assert kv.allocate_slots("r", req.num_computed_tokens + n)
        # logits at every position of the chunk: present all but its first token as drafts
        saved = req.token_ids
        req.token_ids = saved[:req.num_computed_tokens + 1]
        req.spec_token_ids = saved[req.num_computed_tokens + 1:req.num_computed_tokens + n]
        logits, rows = runner.execute(SchedulerOutput([ScheduledChunk(req, n)]))
        assert rows == [n]
        req.token_ids, req.spec_token_ids = saved, []
        out.append(logits)
        req.num_computed_tokens += n
    return torch.cat(out)


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_logits_match_hf(arch, tie):
    hf = tiny_hf_model(arch, tie)
    model = to_picochat(hf)
    tokens = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    for chunks, block_size in (([37], 16), ([20, 17], 16), ([5, 1, 1, 30], 4), ([1] * 37, 8)):
        got = run_steps(model, tokens, chunks, block_size)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_32_tokens_match_hf(arch):
    hf = tiny_hf_model(arch, tie=False)
    model = to_picochat(hf)
    prompt = [5, 17, 99, 3, 250, 42, 7]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                          min_new_tokens=32, pad_token_id=0)[0, len(prompt):].tolist()
    kv = KVCacheManager(num_blocks=16, block_size=8, enable_prefix_caching=False)
    runner = ModelRunner(model, kv, torch.float32, torch.device("cpu"))
    req = Request("r", list(prompt), len(prompt), None, 64, None, None, frozenset())  # type: ignore[arg-type]
    got = []
    for _ in range(32):
        n = req.num_tokens - req.num_computed_tokens
        assert kv.allocate_slots("r", req.num_tokens)
        logits, _ = runner.execute(SchedulerOutput([ScheduledChunk(req, n)]))
        req.num_computed_tokens += n
        token = int(logits[-1].argmax())
        req.token_ids.append(token)
        got.append(token)
    assert got == ref
