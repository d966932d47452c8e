"""Triton paged attention against the fp32 reference: mixed prefill / chunked / decode batches,
GQA ratios, head dims, block sizes, split-K decode, sliding windows and non-contiguous strides."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import DEVICE, DTYPES, assert_close, gpu
from picochat.kernels import triton_attention
from picochat.kernels.reference import AttentionMetadata, paged_attention_reference


def make_step(seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int,
              block_size: int, dtype: torch.dtype, seed: int = 0, cache_heads: int | None = None):
    """q and paged caches for sequences given as (query_len, seq_len), blocks shuffled.

    With ``cache_heads`` > kv_heads the caches are head slices of a wider tensor (non-contiguous).
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for _, s in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay random garbage, never read
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(seqs), max(blocks_per_seq) + 1, dtype=torch.int32)  # padded with 0
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = torch.tensor(order[used:used + n], dtype=torch.int32)
        used += n
    wide = cache_heads or kv_heads
    shape = (num_blocks, block_size, wide, head_dim)
    # sliced on the device: moving a strided view would copy it into a contiguous tensor
    k_cache = torch.randn(shape, generator=gen).to(DEVICE, dtype)[:, :, :kv_heads]
    v_cache = torch.randn(shape, generator=gen).to(DEVICE, dtype)[:, :, :kv_heads]
    q_lens = [ql for ql, _ in seqs]
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype)
    starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    seq_lens = [s for _, s in seqs]
    meta = AttentionMetadata(
        query_start_loc=starts.to(DEVICE), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE), slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64, device=DEVICE),
        query_lens_cpu=q_lens, seq_lens_cpu=seq_lens, block_size=block_size)
    return q.to(DEVICE), k_cache, v_cache, meta


def fp32_reference(q, k_cache, v_cache, meta, scale, sliding_window=None) -> torch.Tensor:
    return paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), meta, scale, sliding_window)


# (query_len, seq_len): full prefill, chunked prefill / prefix hit, decode rows, speculative verify
MIXED = [(7, 7), (1, 19), (5, 33), (1, 1), (4, 4), (3, 12)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_mixed_batch_matches_reference(dtype, heads, kv_heads):
    q, kc, vc, meta = make_step(MIXED, heads, kv_heads, 64, 16, dtype)
    out = triton_attention.paged_attention(q, kc, vc, meta, 0.125)
    assert out.dtype == dtype
    assert_close(out, fp32_reference(q, kc, vc, meta, 0.125), dtype, f"GQA {heads}/{kv_heads}")


@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (64, 5), (64, 1), (80, 8), (8, 16)])
def test_head_dims_and_block_sizes(head_dim, block_size):
    q, kc, vc, meta = make_step([(9, 30), (1, 23), (17, 17)], 4, 2, head_dim, block_size, torch.float16)
    scale = head_dim ** -0.5
    out = triton_attention.paged_attention(q, kc, vc, meta, scale)
    assert_close(out, fp32_reference(q, kc, vc, meta, scale), torch.float16, f"D={head_dim} bs={block_size}")


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_split_k_decode(num_splits):
    """Decode rows only, keys cut into splits (some empty for the shorter sequences)."""
    q, kc, vc, meta = make_step([(1, 150), (1, 3), (1, 70)], 6, 2, 64, 16, torch.float32)
    out = torch.full_like(q, float("nan"))
    triton_attention.paged_decode_attention(q, kc, vc, meta, 0.125, None, out, num_splits)
    assert_close(out, fp32_reference(q, kc, vc, meta, 0.125), torch.float32, f"{num_splits} splits")


def test_prefill_kernel_leaves_decode_rows_alone():
    q, kc, vc, meta = make_step([(1, 10), (6, 10)], 2, 1, 64, 16, torch.float32)
    out = torch.zeros_like(q)
    triton_attention.paged_prefill_attention(q, kc, vc, meta, 0.125, None, out)
    assert out[0].abs().max() == 0
    assert_close(out[1:], fp32_reference(q, kc, vc, meta, 0.125)[1:], torch.float32, "prefill rows")


@pytest.mark.parametrize("num_splits", [1, 3])
def test_sliding_window(num_splits):
    q, kc, vc, meta = make_step([(40, 90), (1, 90), (1, 5), (12, 12)], 4, 2, 64, 16, torch.float16)
    out = triton_attention.paged_attention(q, kc, vc, meta, 0.125, sliding_window=20)
    ref = fp32_reference(q, kc, vc, meta, 0.125, sliding_window=20)
    triton_attention.paged_decode_attention(q, kc, vc, meta, 0.125, 20, out, num_splits)
    assert_close(out, ref, torch.float16, "sliding window 20")


def test_non_contiguous_q_and_caches():
    """q sliced out of a fused QKV projection, caches sliced out of wider head dimensions."""
    heads, kv_heads, d = 4, 2, 64
    _, kc, vc, meta = make_step([(5, 21), (1, 40)], heads, kv_heads, d, 16, torch.float32, cache_heads=3)
    qkv = torch.randn(6, heads + 2 * kv_heads, d, device=DEVICE)
    q = qkv[:, :heads]
    assert not q.is_contiguous() and not kc.is_contiguous()
    out = triton_attention.paged_attention(q, kc, vc, meta, 0.125)
    assert_close(out, fp32_reference(q, kc, vc, meta, 0.125), torch.float32, "strided inputs")


def test_shape_mismatch_is_rejected():
    q, kc, vc, meta = make_step([(3, 3)], 4, 2, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="disagree"):
        triton_attention.paged_attention(q[..., :32], kc, vc, meta, 0.125)
    with pytest.raises(ValueError, match="rows"):
        triton_attention.paged_attention(q[:2], kc, vc, meta, 0.125)


def test_decode_splits_fill_the_gpu_but_keep_splits_long():
    # 33 splits would give two programs an SM; 8192 keys allow 32 of 256
    assert triton_attention.decode_splits(1, 8, 8192, 132) == 32
    assert triton_attention.decode_splits(1, 8, 300, 132) == 2  # short context: 256+ keys a split
    assert triton_attention.decode_splits(64, 8, 8192, 132) == 1  # a big batch fills the GPU alone


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_context_on_gpu(dtype):
    """Realistic sizes: 2k-token prefill chunks over 6k of cached context, 8k-token decode rows."""
    q, kc, vc, meta = make_step([(2048, 8192), (1, 8192), (1, 3000), (512, 512)], 32, 8, 128, 16, dtype)
    out = triton_attention.paged_attention(q, kc, vc, meta, 128 ** -0.5)
    assert_close(out, fp32_reference(q, kc, vc, meta, 128 ** -0.5), dtype, "long context")
