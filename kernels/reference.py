"""Torch reference twins of every kernel: the CPU path, and the ground truth for the Triton tests.

Layouts (shared with the Triton kernels in this package):
  q            [T, H, D]       packed query tokens of all sequences in the step (varlen)
  k, v (new)   [T, Hkv, D]
  k_cache      [num_blocks, block_size, Hkv, D]   one pair of caches per layer
  slot_mapping [T] int64       flat slot (block * block_size + offset) of each new token
  AttentionMetadata            per-sequence query ranges, context lengths and block tables

A sequence's query tokens are the *last* ``q_len`` positions of its ``seq_len`` context, so the
same call serves full prefill, chunked prefill, prefill after a prefix-cache hit, decode (q_len 1)
and speculative verification (q_len k+1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative query lengths (cu_seqlens_q)
    seq_lens: torch.Tensor  # [B] int32, context length including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64
    query_lens_cpu: list[int]  # host copies, so the CPU path never syncs
    seq_lens_cpu: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu)


@dataclass
class DecodeMetadata:
    """A step of decode rows only — one query per sequence at its last position — held in
    tensors alone, so a forward over it has no host data and traces into one graph.

    Each query reads ``context_slots``: its sequence's slots in order, where every position it
    must not see (past its length, outside a sliding window, block-table padding) points at
    ``null_slot`` instead, a slot the caller keeps at zero. So attention gathers only finite
    values from a pool that is otherwise allocated uninitialised, and masks by adding ``bias``."""

    slot_mapping: torch.Tensor  # [B] int64: where this step's K/V go
    context_slots: torch.Tensor  # [B, S] int64, S = block-table width * block size
    bias: torch.Tensor  # [B, 1, 1, S] float32: 0 where visible, -inf elsewhere

    @classmethod
    def build(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
              block_size: int, null_slot: int, sliding_window: int | None = None) -> DecodeMetadata:
        b, width = block_tables.shape
        offsets = torch.arange(block_size, device=block_tables.device)
        slots = (block_tables[:, :, None] * block_size + offsets).view(b, width * block_size)
        kpos = torch.arange(width * block_size, device=block_tables.device)[None, :]
        visible = kpos < seq_lens[:, None]
        if sliding_window is not None:
            visible &= kpos >= seq_lens[:, None] - sliding_window
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
        bias.masked_fill_(~visible, -math.inf)
        return cls(slot_mapping, torch.where(visible, slots, null_slot), bias.view(b, 1, 1, -1))


# causal attention of one sequence's query chunk q [Lq, H, D] over its K/V [L, Hkv, D] (the chunk
# is the last Lq positions), or None for a chunk the kernel does not take
ChunkKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor | None]


# ------------------------------------------------------------------------------------ KV write

def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V ([T, Hkv, D]) into the paged caches at ``slot_mapping``."""
    num_blocks, block_size, hkv, d = k_cache.shape
    k_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence: [seq_len, Hkv, D]."""
    block_size = cache.shape[1]
    nblocks = (seq_len + block_size - 1) // block_size
    return cache[block_table[:nblocks]].flatten(0, 1)[:seq_len]


# ---------------------------------------------------------------------------------- attention

def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float,
                              sliding_window: int | None = None) -> torch.Tensor:
    """Plain math in fp32, one sequence at a time: the twin the Triton kernels are held to."""
    out = torch.empty_like(q)
    h, hkv = q.shape[1], k_cache.shape[2]
    group = h // hkv
    starts = meta.query_start_loc.tolist()
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        qs = q[starts[i]:starts[i] + q_len].float()  # [Lq, H, D]
        ks = gather_kv(k_cache, meta.block_tables[i], seq_len).float().repeat_interleave(group, dim=1)
        vs = gather_kv(v_cache, meta.block_tables[i], seq_len).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale  # [H, Lq, L]
        scores = scores.masked_fill(~_causal_mask(q_len, seq_len, sliding_window, q.device), -math.inf)
        probs = scores.softmax(dim=-1)
        out[starts[i]:starts[i] + q_len] = torch.einsum("hqk,khd->qhd", probs, vs).to(q.dtype)
    return out


def paged_attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                         chunk_kernel: ChunkKernel | None = None) -> torch.Tensor:
    """The fast CPU path, one sequence at a time: SDPA for prefill chunks, an fp32 bmm with the
    query heads of each KV group folded together for decode rows. ``chunk_kernel`` (picochat's
    CPU kernel, where ``dispatch`` finds it) takes the causal prefill chunks it supports first."""
    out = torch.empty_like(q)
    h, hkv, d = q.shape[1], k_cache.shape[2], q.shape[2]
    group = h // hkv
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        k_rows = gather_kv(k_cache, meta.block_tables[i], seq_len)  # [L, Hkv, D]
        v_rows = gather_kv(v_cache, meta.block_tables[i], seq_len)
        ks, vs = k_rows.transpose(0, 1), v_rows.transpose(0, 1)  # [Hkv, L, D]
        qs = q[start:start + q_len]  # [Lq, H, D]
        if q_len == 1 and (sliding_window is None or seq_len <= sliding_window):
            # one query: the heads of a KV group become the rows of one fp32 bmm (cheaper than SDPA
            # for a single query on CPU)
            qg = qs.view(hkv, group, d).float()  # [Hkv, G, D]
            scores = torch.bmm(qg, ks.float().transpose(1, 2)).mul_(scale)  # [Hkv, G, L]
            o = torch.bmm(scores.softmax(dim=-1), vs.float())  # [Hkv, G, D]
            out[start] = o.view(h, d)
        elif chunk_kernel is not None and sliding_window is None and \
                (o := chunk_kernel(qs, k_rows, v_rows, scale)) is not None:
            out[start:start + q_len] = o
        else:
            # 4-D inputs: torch's CPU flash kernel takes those (3-D ones fall back to plain math,
            # ~9x slower for a 512-token prefill), and it does GQA without copying K/V per head
            qh = qs.transpose(0, 1)[None]  # [1, H, Lq, D]
            kh, vh = ks[None].to(q.dtype), vs[None].to(q.dtype)  # [1, Hkv, L, D]
            if q_len == seq_len and sliding_window is None:
                o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
            else:
                mask = _causal_mask(q_len, seq_len, sliding_window, q.device)
                o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start:start + q_len] = o[0].transpose(0, 1)
        start += q_len
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: DecodeMetadata, scale: float) -> torch.Tensor:
    """All decode rows at once: q [B, H, D] against the slots of ``meta.context_slots``, gathered
    as whole rows; the query heads of a KV group are the rows of one fp32 matmul."""
    b, h, d = q.shape
    num_blocks, block_size, hkv, _ = k_cache.shape
    s = meta.context_slots.shape[1]
    slots = meta.context_slots.view(-1)

    def gather(cache: torch.Tensor) -> torch.Tensor:  # [B, Hkv, S, D] fp32, contiguous: on a
        # strided view the matmuls took another path at batch 1 than in a batch, so a row's
        # scores changed with the rows beside it (a draft's verification rows, other requests)
        rows = cache.view(num_blocks * block_size, hkv * d).index_select(0, slots)
        return rows.float().view(b, s, hkv, d).transpose(1, 2).contiguous()

    qg = q.view(b, hkv, h // hkv, d).float()
    scores = torch.matmul(qg, gather(k_cache).transpose(-1, -2)).mul_(scale).add_(meta.bias)
    out = torch.matmul(scores.softmax(dim=-1), gather(v_cache))  # [B, Hkv, G, D]
    return out.view(b, h, d).to(q.dtype)


def _causal_mask(q_len: int, seq_len: int, sliding_window: int | None, device) -> torch.Tensor:
    """[Lq, L] bool: query j sits at position seq_len - q_len + j."""
    qpos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    kpos = torch.arange(seq_len, device=device)[None, :]
    mask = kpos <= qpos
    if sliding_window is not None:
        mask &= kpos > qpos - sliding_window
    return mask


# ----------------------------------------------------------------------------- norms and RoPE

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with an optional fused residual add: returns (normed, new_residual).

    With ``residual`` given, ``new_residual = x + residual`` and the norm is taken of it; without,
    ``new_residual = x``. Computed in fp32, cast back to x's dtype (as HF Llama does).
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def rope_cos_sin_cache(head_dim: int, max_positions: int, theta: float,
                       scaling: dict | None = None, dtype=torch.float32) -> torch.Tensor:
    """[max_positions, head_dim] table: cos in the first half, sin in the second (HF neox layout)."""
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling, max_positions)
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [P, D/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).mul(attention_factor).to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None,
                  max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies with HF's rope_scaling kinds: linear, llama3, yarn (dynamic: static base)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        return inv_freq, 1.0  # NTK-dynamic only changes beyond the trained length
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        old_len = float(scaling.get("original_max_position_embeddings", max_positions))
        beta_fast, beta_slow = float(scaling.get("beta_fast", 32)), float(scaling.get("beta_slow", 1))
        attention_factor = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0)

        def correction_dim(rotations: float) -> float:
            return (head_dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
        return inv, float(attention_factor)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, Hkv, D] at ``positions`` [T] (HF rotate_half convention)."""
    cs = cos_sin[positions]  # [T, D]
    half = cs.shape[-1] // 2
    cos = cs[:, None, :half].to(q.dtype)
    sin = cs[:, None, half:].to(q.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    return rotate(q), rotate(k)
