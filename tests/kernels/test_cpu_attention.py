"""The CPU attention paths (SDPA per sequence, the batched decode step) against the fp32 reference,
with every slot past a sequence's context NaN, as an uninitialised pool can hold."""

from __future__ import annotations

import pytest
import torch

from picochat.kernels.reference import DecodeMetadata, decode_attention, paged_attention_sdpa
from test_attention import fp32_reference, make_step


def poison_unwritten(k_cache, v_cache, meta):
    """NaN in every slot past each sequence's context (spare and padding blocks too)."""
    seen = torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool)
    bs = meta.block_size
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        for p in range(seq_len):
            seen[int(meta.block_tables[i, p // bs]) * bs + p % bs] = True
    for cache in (k_cache, v_cache):
        cache.view(-1, *cache.shape[2:])[~seen] = float("nan")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_decode_step_matches_reference(dtype, sliding_window):
    seqs = [(1, 1), (1, 19), (1, 33), (1, 16), (1, 4)]
    q, k_cache, v_cache, meta = make_step(seqs, 6, 2, 16, 4, dtype, seed=3)
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    poison_unwritten(k_cache, v_cache, meta)
    # a zero block at the end of the pool holds the null slot, as the runner's does
    k_cache, v_cache = (torch.cat([c, torch.zeros_like(c[:1])]) for c in (k_cache, v_cache))
    null_slot = (k_cache.shape[0] - 1) * meta.block_size
    decode_meta = DecodeMetadata.build(meta.slot_mapping, meta.block_tables.long(), meta.seq_lens.long(),
                                       meta.block_size, null_slot, sliding_window)
    got = decode_attention(q, k_cache, v_cache, decode_meta, 0.25)
    expected = fp32_reference(q, k_cache, v_cache, meta, 0.25, sliding_window).to(dtype)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


def test_sdpa_mixed_batch_matches_reference():
    seqs = [(7, 7), (1, 19), (5, 33), (1, 1), (4, 4), (3, 12)]
    q, k_cache, v_cache, meta = make_step(seqs, 6, 2, 16, 4, torch.float32, seed=4)
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    poison_unwritten(k_cache, v_cache, meta)
    got = paged_attention_sdpa(q, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(got, fp32_reference(q, k_cache, v_cache, meta, 0.25), atol=1e-5, rtol=1e-5)
