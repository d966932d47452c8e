"""Throughput of picochat's Triton kernels on a CUDA GPU, each against its torch baseline (and
flash-attn where installed): TFLOP/s for the compute-bound cases, GB/s for the memory-bound ones.

    python benchmarks/kernels.py            # prints a table; the last line is JSON

Shapes are those of an 8B Llama (32 heads, 8 KV heads, head dim 128, hidden 4096) in bf16. On a
box without CUDA it prints one line saying so and exits with status 1.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Case:
    name: str
    flops: float  # useful floating-point operations of one call
    bytes: float  # bytes one call must move at least
    providers: dict[str, Callable[[], object]] = field(default_factory=dict)  # "triton" first


# ----------------------------------------------------------------------------------- attention

def attention_cases(device: str, seqs: int = 4, prefill_len: int = 2048, decode_seqs: int = 32,
                    decode_len: int = 4096, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                    block_size: int = 16) -> list[Case]:
    from picochat.kernels import triton_attention
    from picochat.kernels.reference import AttentionMetadata

    dtype, scale = torch.bfloat16, head_dim ** -0.5

    def paged(q_lens: list[int], seq_lens: list[int]):
        blocks = [-(-s // block_size) for s in seq_lens]
        tables = torch.arange(sum(blocks), dtype=torch.int32, device=device).split(blocks)
        table = torch.nn.utils.rnn.pad_sequence(list(tables), batch_first=True)
        cache = (sum(blocks), block_size, kv_heads, head_dim)
        k_cache = torch.randn(cache, dtype=dtype, device=device)
        v_cache = torch.randn(cache, dtype=dtype, device=device)
        starts = torch.tensor([0] + q_lens, device=device).cumsum(0).to(torch.int32)
        meta = AttentionMetadata(starts, torch.tensor(seq_lens, dtype=torch.int32, device=device), table,
                                 torch.zeros(sum(q_lens), dtype=torch.int64, device=device),
                                 q_lens, seq_lens, block_size)
        q = torch.randn(sum(q_lens), heads, head_dim, dtype=dtype, device=device)
        return q, k_cache, v_cache, meta

    # prefill: equal-length causal sequences, so dense SDPA is the same work
    q, kc, vc, meta = paged([prefill_len] * seqs, [prefill_len] * seqs)
    qd = q.view(seqs, prefill_len, heads, head_dim).transpose(1, 2)
    kd = kc.view(seqs, prefill_len, kv_heads, head_dim).transpose(1, 2)
    vd = vc.view(seqs, prefill_len, kv_heads, head_dim).transpose(1, 2)
    prefill = Case(f"prefill attention {seqs}x{prefill_len}",
                   flops=4 * seqs * heads * head_dim * prefill_len * prefill_len / 2,
                   bytes=(q.numel() * 2 + kc.numel() * 2) * 2)
    prefill.providers["triton"] = lambda: triton_attention.paged_attention(q, kc, vc, meta, scale)
    prefill.providers["sdpa"] = lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale,
                                                                       enable_gqa=True)

    # decode: one query per sequence over a long context
    dq, dkc, dvc, dmeta = paged([1] * decode_seqs, [decode_len] * decode_seqs)
    dqd = dq.view(decode_seqs, 1, heads, head_dim).transpose(1, 2)
    dkd = dkc.view(decode_seqs, decode_len, kv_heads, head_dim).transpose(1, 2)
    dvd = dvc.view(decode_seqs, decode_len, kv_heads, head_dim).transpose(1, 2)
    decode = Case(f"decode attention {decode_seqs}x{decode_len}",
                  flops=4 * decode_seqs * heads * head_dim * decode_len,
                  bytes=dkc.numel() * 2 * 2)
    decode.providers["triton"] = lambda: triton_attention.paged_attention(dq, dkc, dvc, dmeta, scale)
    decode.providers["sdpa"] = lambda: F.scaled_dot_product_attention(dqd, dkd, dvd, scale=scale, enable_gqa=True)

    try:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    except ImportError:
        return [prefill, decode]
    k_dense, v_dense = kc.view(-1, kv_heads, head_dim), vc.view(-1, kv_heads, head_dim)
    prefill.providers["flash-attn"] = lambda: flash_attn_varlen_func(
        q, k_dense, v_dense, meta.query_start_loc, meta.query_start_loc, prefill_len, prefill_len,
        softmax_scale=scale, causal=True)
    dk_dense = dkc.view(decode_seqs, decode_len, kv_heads, head_dim)
    dv_dense = dvc.view(decode_seqs, decode_len, kv_heads, head_dim)
    decode.providers["flash-attn"] = lambda: flash_attn_with_kvcache(
        dq.view(decode_seqs, 1, heads, head_dim), dk_dense, dv_dense, cache_seqlens=dmeta.seq_lens,
        softmax_scale=scale, causal=True)
    return [prefill, decode]


# ------------------------------------------------------------------------------ norm and RoPE

def norm_rope_cases(device: str, tokens: int = 4096, hidden: int = 4096, heads: int = 32,
                    kv_heads: int = 8, head_dim: int = 128) -> list[Case]:
    from picochat.kernels import reference, triton_norm_rope

    dtype = torch.bfloat16
    x, residual = (torch.randn(tokens, hidden, dtype=dtype, device=device) for _ in range(2))
    weight = torch.randn(hidden, dtype=dtype, device=device)
    norm = Case(f"rms_norm + residual {tokens}x{hidden}", flops=4 * tokens * hidden,
                bytes=4 * tokens * hidden * 2)  # x, residual in; normed, new residual out
    norm.providers["triton"] = lambda: triton_norm_rope.rms_norm(x, weight, 1e-5, residual)
    norm.providers["torch"] = lambda: reference.rms_norm(x, weight, 1e-5, residual)

    q = torch.randn(tokens, heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    cos_sin = reference.rope_cos_sin_cache(head_dim, tokens, 500000.0).to(device)
    positions = torch.arange(tokens, device=device)
    rope = Case(f"rope {tokens} tokens", flops=3 * (q.numel() + k.numel()),
                bytes=2 * (q.numel() + k.numel()) * 2 + tokens * head_dim * 4)
    rope.providers["triton"] = lambda: triton_norm_rope.apply_rope(q, k, positions, cos_sin)
    rope.providers["torch"] = lambda: reference.apply_rope(q, k, positions, cos_sin)
    return [norm, rope]


# ---------------------------------------------------------------------------- quantized matmul

def quant_matmul_cases(device: str, n: int = 4096, k: int = 4096, prefill_rows: int = 2048,
                       group: int = 128) -> list[Case]:
    from picochat.kernels import quant_reference, triton_quant_matmul

    dtype = torch.bfloat16
    w_int8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
    scales = torch.rand(n, device=device) * 0.01
    packed = quant_reference.pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device))
    scales_and_zeros = torch.rand(k // group, n, 2, device=device) * 0.01
    w_dense = torch.randn(n, k, dtype=dtype, device=device)
    cases = []
    for rows in (1, prefill_rows):
        x = torch.randn(rows, k, dtype=dtype, device=device)
        act_bytes = 2 * rows * (k + n)
        for name, weight_bytes, fn in (
            ("int8", n * k, lambda x=x: triton_quant_matmul.int8_linear(x, w_int8, scales)),
            ("int4", n * k / 2 + scales_and_zeros.numel() * 4,
             lambda x=x: triton_quant_matmul.int4_linear(x, packed, scales_and_zeros, group)),
        ):
            case = Case(f"{name} linear {rows}x{k} @ {n}x{k}", flops=2 * rows * n * k,
                        bytes=weight_bytes + act_bytes)
            case.providers["triton"] = fn
            case.providers["torch bf16"] = lambda x=x: F.linear(x, w_dense)
            cases.append(case)
    return cases


# -------------------------------------------------------------------------------------- driver

def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU; none is visible here (the CPU path has no Triton kernels)")
        return 1
    from triton.testing import do_bench

    torch.manual_seed(0)
    cases = attention_cases("cuda") + norm_rope_cases("cuda") + quant_matmul_cases("cuda")
    print(f"{torch.cuda.get_device_name()}, bf16; ms is the median of triton.testing.do_bench")
    print(f"{'case':44} {'provider':12} {'ms':>9} {'TFLOP/s':>9} {'GB/s':>9} {'vs triton':>10}")
    results = []
    for case in cases:
        triton_ms = None
        for provider, fn in case.providers.items():
            ms = do_bench(fn, return_mode="median")
            triton_ms = triton_ms or ms
            tflops, gbs = case.flops / ms / 1e9, case.bytes / ms / 1e6
            print(f"{case.name:44} {provider:12} {ms:9.4f} {tflops:9.2f} {gbs:9.1f} {ms / triton_ms:9.2f}x")
            results.append({"case": case.name, "provider": provider, "ms": ms, "tflops": tflops, "gbs": gbs})
    print(json.dumps({"device": torch.cuda.get_device_name(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
