"""Vectorised torch dequantizers for GGUF tensors, bit-equal to ``gguf.quants.dequantize``.

Covers the types picochat meets in practice (F32, F16, BF16, Q8_0, Q4_0, Q4_1); every other
type goes through gguf's numpy dequantizer (torch versions of Q4_K / Q5_K / Q6_K were measured no
faster than gguf's and were dropped). The arithmetic mirrors gguf's step for step (same
float32 operations in the same order), so results are identical, not merely close.
Block layouts (32 weights per block, little-endian):
  Q8_0  [d: f16][q: 32 × int8]                      x = q · d
  Q4_0  [d: f16][q: 16 bytes, low nibbles first]    x = (q − 8) · d
  Q4_1  [d: f16][m: f16][q: 16 bytes]               x = q · d + m
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

BLOCK_SIZE = 32  # weights per block for Q8_0 / Q4_0 / Q4_1
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def dequantize_blocks(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """Raw blocks ``[..., n_blocks, block_bytes]`` (uint8) → float32 ``[..., n_blocks * 32]``."""
    if blocks.dtype != torch.uint8 or blocks.shape[-1] != BLOCK_BYTES[qtype]:
        raise ValueError(f"{qtype} blocks must be uint8 [..., {BLOCK_BYTES[qtype]}], "
                         f"got {blocks.dtype} {tuple(blocks.shape)}")
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # [..., n_blocks, 1]
    if qtype == "Q8_0":
        return torch.mul(blocks[..., 2:].view(torch.int8), d).flatten(-2)  # int8 → f32, then · d
    packed = blocks[..., 4:] if qtype == "Q4_1" else blocks[..., 2:]  # [..., n_blocks, 16]
    q = torch.empty(packed.shape[:-1] + (BLOCK_SIZE,), dtype=torch.float32, device=blocks.device)
    q[..., :16] = packed & 0x0F  # elements 0..15
    q[..., 16:] = packed >> 4  # elements 16..31
    if qtype == "Q4_0":
        return q.sub_(8).mul_(d).flatten(-2)
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()
    return q.mul_(d).add_(m).flatten(-2)


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """A GGUF tensor's raw data (as ``ReaderTensor.data`` holds it) → float32 tensor of ``shape``
    (numpy order, i.e. GGUF dims reversed: ``(rows, K)`` for a matrix)."""
    name = qtype.name
    if name == "F32":
        out = torch.from_numpy(np.array(raw, dtype=np.float32))
    elif name == "F16":
        out = torch.from_numpy(np.array(raw, dtype=np.float16)).float()
    elif name == "BF16":
        out = torch.from_numpy(np.array(raw).view(np.int16)).view(torch.bfloat16).float()
    elif name in BLOCK_BYTES:
        blocks = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(-1, BLOCK_BYTES[name])
        out = dequantize_blocks(blocks, name)
    else:
        out = torch.from_numpy(np.ascontiguousarray(quants.dequantize(raw, qtype), dtype=np.float32))
    return out.reshape(shape)

