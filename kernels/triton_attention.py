"""Triton paged attention for CUDA: the twin of ``reference.paged_attention_reference``.

One call serves every sequence of a step. Sequences with more than one query token (prefill,
chunked prefill, prefill after a prefix-cache hit, speculative verification) go through a
flash-attention kernel over the packed queries; decode rows (one query) go through a split-K
flash-decoding kernel plus a small kernel that merges the splits. Both read K/V only from the
paged cache (this step's K/V is already written there by ``write_kv``), so earlier context and
new tokens are one key range. Layouts are those of ``reference.py``; scheduling, the cache and
``write_kv`` belong elsewhere.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from picochat.kernels.reference import AttentionMetadata
from picochat.kernels.triton_common import INTERPRET, dot_precision

_LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(cache_ptr, block_table_ptr, offs_n, offs_d, kv_head, block_size,
                  stride_cb, stride_cs, stride_ch, stride_cd, mask_n, mask_d):
    """[BLOCK_N, BLOCK_D] K or V rows of token positions ``offs_n`` through the block table."""
    logical_block = offs_n // block_size
    physical_block = tl.load(block_table_ptr + logical_block, mask=mask_n, other=0).to(tl.int64)
    row = physical_block * stride_cb + (offs_n % block_size) * stride_cs + kv_head * stride_ch
    ptrs = cache_ptr + row[:, None] + offs_d[None, :] * stride_cd
    return tl.load(ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k, v, qk_mask, scale_log2,
                 DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step (base 2) of rows ``q`` [M, D] over a K/V tile [N, D]."""
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    else:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    # scores, scaled into the log2 domain; masked keys are -inf
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    qk = tl.where(qk_mask, qk, float("-inf"))
    # running max starts at -1e30 (finite), so a fully masked tile leaves acc and l unchanged
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, H, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    out_ptr,  # [T, H, D]
    block_tables_ptr,  # [B, max_blocks] int32
    query_start_loc_ptr,  # [B+1] int32
    seq_lens_ptr,  # [B] int32
    scale_log2, sliding_window, block_size,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq, m_block, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_len <= 1 or m_block * BLOCK_M >= q_len:
        return  # decode rows belong to the split-K kernel
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q_pos = context_len + offs_m  # [BLOCK_M] absolute positions
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # keys this query block can see: causal end, and the window's start
    hi = tl.minimum(seq_len, context_len + (m_block + 1) * BLOCK_M)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(context_len + m_block * BLOCK_M - sliding_window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seq_len
        k = _load_kv_tile(k_cache_ptr, block_table, offs_n, offs_d, kv_head, block_size,
                          stride_kb, stride_ks, stride_kh, stride_kd, mask_n, mask_d)
        v = _load_kv_tile(v_cache_ptr, block_table, offs_n, offs_d, kv_head, block_size,
                          stride_vb, stride_vs, stride_vh, stride_vd, mask_n, mask_d)
        qk_mask = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            qk_mask = qk_mask & (offs_n[None, :] > q_pos[:, None] - sliding_window)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, qk_mask, scale_log2,
                                     DOT_FP32, DOT_PRECISION)

    out = acc / tl.where(mask_m, l_i, 1.0)[:, None]  # rows past q_len may have seen no key
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [T, H, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    out_ptr,  # [T, H, D] (one split) or [B, H, S, D] fp32 partial outputs
    lse_ptr,  # [B, H, S] fp32 partial log2-sum-exp (unused with one split)
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    scale_log2, sliding_window, block_size, split_size,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_o0, stride_o1, stride_o2, stride_o3,
    stride_l0, stride_l1, stride_l2,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (sequence, KV head, split): the GROUP query heads sharing the KV head are the rows."""
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_start != 1:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - sliding_window, 0)
    start = lo + split * split_size
    end = tl.minimum(start + split_size, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + q_start.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        k = _load_kv_tile(k_cache_ptr, block_table, offs_n, offs_d, kv_head, block_size,
                          stride_kb, stride_ks, stride_kh, stride_kd, mask_n, mask_d)
        v = _load_kv_tile(v_cache_ptr, block_table, offs_n, offs_d, kv_head, block_size,
                          stride_vb, stride_vs, stride_vh, stride_vd, mask_n, mask_d)
        qk_mask = tl.broadcast_to(mask_n[None, :], (BLOCK_G, BLOCK_N))
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, qk_mask, scale_log2,
                                     DOT_FP32, DOT_PRECISION)

    # an empty split (start >= end) leaves l_i = 0: output 0 with weight exp2(-inf) = 0
    has_keys = l_i > 0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    store_mask = mask_g[:, None] & mask_d[None, :]
    if NUM_SPLITS == 1:
        row = q_start.to(tl.int64) * stride_o0 + heads[:, None] * stride_o1
        ptrs = out_ptr + row + offs_d[None, :] * stride_o2
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        row = seq.to(tl.int64) * stride_o0 + heads[:, None] * stride_o1 + split * stride_o2
        tl.store(out_ptr + row + offs_d[None, :] * stride_o3, out, mask=store_mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq * stride_l0 + heads * stride_l1 + split * stride_l2, lse, mask=mask_g)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,  # [B, H, S, D] fp32
    part_lse_ptr,  # [B, H, S] fp32
    out_ptr,  # [T, H, D]
    query_start_loc_ptr,
    stride_p0, stride_p1, stride_p2, stride_p3,
    stride_l0, stride_l1, stride_l2,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Weights each split's normalized output by its share of the total softmax mass."""
    seq, head = tl.program_id(0), tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_start != 1:
        return
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + seq * stride_l0 + head * stride_l1 + offs_s * stride_l2,
                  mask=mask_s, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 always has keys: the max is finite
    row = seq.to(tl.int64) * stride_p0 + head * stride_p1
    part = tl.load(part_out_ptr + row + offs_s[:, None] * stride_p2 + offs_d[None, :] * stride_p3,
                   mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    out = tl.sum(weight[:, None] * part, axis=0) / tl.sum(weight, axis=0)
    tl.store(out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=mask_d)


# ------------------------------------------------------------------------------------ wrappers

def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Attention of every query row in ``q`` [T, H, D] over its sequence's paged context."""
    _check_shapes(q, k_cache, v_cache, meta)
    out = torch.empty_like(q)
    if any(n > 1 for n in meta.query_lens_cpu):
        paged_prefill_attention(q, k_cache, v_cache, meta, scale, sliding_window, out)
    num_decode = meta.query_lens_cpu.count(1)
    if num_decode:
        max_keys = _max_decode_keys(meta, sliding_window)
        splits = decode_splits(num_decode, k_cache.shape[2], max_keys, _num_sms(q.device))
        paged_decode_attention(q, k_cache, v_cache, meta, scale, sliding_window, out, splits)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float, sliding_window: int | None,
                            out: torch.Tensor) -> None:
    """Writes ``out`` rows of the sequences with more than one query; leaves decode rows alone."""
    h, d = q.shape[1], q.shape[2]
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16: zero-padded head dims
    block_m = min(64, max(16, triton.next_power_of_2(meta.max_query_len)))
    block_n = 64 if d <= 64 else 32
    grid = (meta.num_seqs, triton.cdiv(meta.max_query_len, block_m), h)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, meta.block_tables, meta.query_start_loc, meta.seq_lens,
        scale * _LOG2E, sliding_window or 0, meta.block_size,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        meta.block_tables.stride(0),
        GROUP=h // k_cache.shape[2], HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None, DOT_FP32=INTERPRET,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=4, num_stages=2,
    )


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, sliding_window: int | None,
                           out: torch.Tensor, num_splits: int) -> None:
    """Writes ``out`` rows of the one-query sequences, each key range cut into ``num_splits``."""
    h, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    group = h // hkv
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16: zero-padded head dims
    block_n = 64 if d <= 64 else 32
    max_keys = _max_decode_keys(meta, sliding_window)
    split_size = triton.cdiv(triton.cdiv(max_keys, num_splits), block_n) * block_n
    b = meta.num_seqs
    if num_splits == 1:
        # the kernel writes straight to out [T, H, D] (its 4th stride unused) and no lse
        part_out, part_lse = out, out
        out_strides = (*out.stride(), 0)
        lse_strides = (0, 0, 0)
    else:
        part_out = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(b, h, num_splits, dtype=torch.float32, device=q.device)
        out_strides, lse_strides = part_out.stride(), part_lse.stride()
    _decode_split_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, part_out, part_lse, meta.block_tables, meta.query_start_loc,
        meta.seq_lens, scale * _LOG2E, sliding_window or 0, meta.block_size, split_size,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out_strides, *lse_strides,
        meta.block_tables.stride(0),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_D=block_d,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, USE_WINDOW=sliding_window is not None,
        DOT_FP32=INTERPRET, DOT_PRECISION=dot_precision(q.dtype), num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _decode_merge_kernel[(b, h)](
            part_out, part_lse, out, meta.query_start_loc,
            *part_out.stride(), *part_lse.stride(), *out.stride(),
            HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4,
        )


def decode_splits(num_seqs: int, num_kv_heads: int, max_keys: int, num_sms: int) -> int:
    """How many key splits fill the GPU: about two programs per SM, at least 256 keys a split."""
    wanted = triton.cdiv(2 * num_sms, num_seqs * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_keys, 256), 64))


def _max_decode_keys(meta: AttentionMetadata, sliding_window: int | None) -> int:
    longest = max(s for n, s in zip(meta.query_lens_cpu, meta.seq_lens_cpu) if n == 1)
    return longest if sliding_window is None else min(longest, sliding_window)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: one split unless a test asks for more
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata) -> None:
    t, h, d = q.shape
    _, block_size, hkv, dk = k_cache.shape
    if k_cache.shape != v_cache.shape or dk != d or h % hkv or block_size != meta.block_size:
        raise ValueError(f"paged_attention: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}, block_size {meta.block_size} disagree")
    if t != sum(meta.query_lens_cpu):
        raise ValueError(f"paged_attention: q has {t} rows, metadata counts {sum(meta.query_lens_cpu)}")
