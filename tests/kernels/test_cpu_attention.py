"""The CPU attention paths (SDPA per sequence, the batched decode step in torch and in picochat's
C++ kernel) against the fp32 reference, with every slot past a sequence's context NaN, as an
uninitialised pool can hold."""

from __future__ import annotations

import pytest
import torch

from picochat.kernels import cpu_vnni, dispatch, reference
from picochat.kernels.reference import DecodeMetadata, paged_attention_sdpa
from test_attention import fp32_reference, make_step

needs_kernels = pytest.mark.skipif(not cpu_vnni.available(), reason="needs an AVX-512 VNNI CPU and a C++ compiler")
DECODE_ATTENTION = [pytest.param(reference.decode_attention, id="torch"),
                    pytest.param(cpu_vnni.decode_attention, id="cpu_kernel", marks=needs_kernels)]


def poison_unwritten(k_cache, v_cache, meta):
    """NaN in every slot past each sequence's context (spare and padding blocks too)."""
    seen = torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool)
    bs = meta.block_size
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        for p in range(seq_len):
            seen[int(meta.block_tables[i, p // bs]) * bs + p % bs] = True
    for cache in (k_cache, v_cache):
        cache.view(-1, *cache.shape[2:])[~seen] = float("nan")


@pytest.mark.parametrize("decode_attention", DECODE_ATTENTION)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("head_dim", [16, 8])  # the C++ kernel takes multiples of 16, torch the rest
def test_decode_step_matches_reference(decode_attention, dtype, sliding_window, head_dim):
    seqs = [(1, 1), (1, 19), (1, 33), (1, 16), (1, 4)]
    q, k_cache, v_cache, meta = make_step(seqs, 6, 2, head_dim, 4, dtype, seed=3)
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


@pytest.mark.parametrize("decode_attention", DECODE_ATTENTION)
def test_decode_step_rows_do_not_depend_on_the_rows_beside_them(decode_attention):
    """A row's output is bit-identical alone and inside a batch (speculation verifies k + 1 rows
    of a request; continuous batching adds other requests' rows): no layout- or batch-dependent
    kernel path."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block_size, num_blocks = 9, 3, 64, 16, 64
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).bfloat16() for _ in range(2))
    null_slot = num_blocks * block_size - 1
    for cache in (k_cache, v_cache):
        cache.view(-1, kv_heads, dim)[null_slot] = 0
    for seq_len in (1, 40, 200, 333):
        q = torch.randn(5, heads, dim, generator=gen).bfloat16()
        tables = torch.arange(seq_len // block_size + 2).repeat(5, 1)
        seq_lens = torch.arange(seq_len, seq_len + 5)  # k + 1 verification rows of one request

        def meta(rows: slice) -> DecodeMetadata:
            return DecodeMetadata.build(torch.zeros(5, dtype=torch.int64)[rows], tables[rows], seq_lens[rows],
                                        block_size, null_slot)

        batch = decode_attention(q, k_cache, v_cache, meta(slice(None)), dim ** -0.5)
        for i in range(5):
            alone = decode_attention(q[i:i + 1], k_cache, v_cache, meta(slice(i, i + 1)), dim ** -0.5)
            assert torch.equal(alone, batch[i:i + 1]), (seq_len, i)


needs_bf16_kernel = pytest.mark.skipif(not cpu_vnni.bf16_attention_available(),
                                       reason="needs an AVX512-BF16 CPU and a C++ compiler")


@needs_bf16_kernel
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_bf16_prefill_kernel_matches_reference(head_dim):
    """picochat's flash-attention prefill kernel inside the sdpa path: chunks shorter and longer
    than its 8-query tiles and 64-key steps, a chunk after a cached prefix, decode rows beside."""
    seqs = [(130, 130), (1, 19), (70, 200), (9, 9), (3, 67), (64, 64)]
    q, k_cache, v_cache, meta = make_step(seqs, 6, 2, head_dim, 16, torch.bfloat16, seed=5)
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    poison_unwritten(k_cache, v_cache, meta)
    taken = []

    def kernel(*args):
        taken.append(cpu_vnni.prefill_attention(*args))
        return taken[-1]

    got = paged_attention_sdpa(q, k_cache, v_cache, meta, head_dim ** -0.5, chunk_kernel=kernel)
    assert len(taken) == 5 and all(out is not None for out in taken)  # every chunk but the decode row
    expected = fp32_reference(q, k_cache, v_cache, meta, head_dim ** -0.5).bfloat16()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-2)


@needs_bf16_kernel
def test_bf16_prefill_kernel_declines_what_it_does_not_take():
    q, k = torch.randn(4, 2, 16).bfloat16(), torch.randn(4, 1, 16).bfloat16()
    assert cpu_vnni.prefill_attention(q, k, k, 0.25) is None  # head dim 16
    assert cpu_vnni.prefill_attention(q.float().repeat(1, 1, 2), k.float().repeat(1, 1, 2), k.float().repeat(1, 1, 2),
                                      0.25) is None  # fp32
    dispatched = dispatch.attention_fn("sdpa", torch.device("cpu"))
    assert dispatched.keywords["chunk_kernel"] is cpu_vnni.prefill_attention
