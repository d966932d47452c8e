"""oneDNN-packed float linears: the same bits as ``nn.Linear``, and a traced forward that reads
the dense weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from picochat.config import QuantConfig
from picochat.kernels.reference import AttentionMetadata
from picochat.model.build import build_transformer
from picochat.model.packed_linear import PackedLinear, packs
from picochat.model.quantize import swap_linears
from picochat.model.transformer import KVCache, Transformer

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not packs(torch.bfloat16, CPU), reason="this CPU's oneDNN has no native bf16")


def dense(linear: PackedLinear) -> nn.Linear:
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    out.weight, out.bias = linear.weight, linear.bias
    return out


def prefill_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Every position's logits of one sequence, prefilled into a fresh paged cache."""
    cfg, n, block_size = model.config, len(ids), 16
    blocks = -(-n // block_size)
    shape = (blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    caches = [KVCache(torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
              for _ in range(cfg.num_layers)]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None], slot_mapping=torch.arange(n),
        query_lens_cpu=[n], seq_lens_cpu=[n], block_size=block_size)
    return model(ids, torch.arange(n), meta, caches)


def test_bf16_models_pack_their_linears_and_keep_their_logits(tiny_hf_qwen2_dir):
    """A bf16 Qwen2 (q|k|v biases, untied lm_head) on a CPU: every linear packed; a prefill's
    logits bit-identical to the same weights through ``nn.Linear``; fp32 left unpacked."""
    path = tiny_hf_qwen2_dir()
    model, _ = build_transformer(path, torch.bfloat16, QuantConfig(), CPU)
    packed = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert len(packed) == 4 * model.config.num_layers + 1
    assert not any(type(m) is nn.Linear for m in model.modules())
    ids = torch.randint(0, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    with_packed = prefill_logits(model, ids)
    swap_linears(model, {name: dense(m) for name, m in packed.items()})
    assert torch.equal(with_packed, prefill_logits(model, ids))
    fp32, _ = build_transformer(path, torch.float32, QuantConfig(), CPU)
    assert not any(isinstance(m, PackedLinear) for m in fp32.modules())


def test_a_traced_forward_reads_the_dense_weight():
    """torch.compile cannot take oneDNN's opaque tensor: under tracing the dense weight serves."""
    linear = PackedLinear(nn.Linear(64, 96, dtype=torch.bfloat16))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    traced = torch.compile(linear, backend="eager", fullgraph=True)
    with torch.inference_mode():
        assert torch.equal(traced(x), F.linear(x, linear.weight, linear.bias))
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
