"""Torch twins of the weight-only quantized matmuls, and the int4 nibble packing the Triton
kernels read. Pure torch (never imports triton); the fast CPU matmuls live with the quantization
code, which holds itself to these same twins.

Formats (shared with the quantization code):
  int8  w_int8 [N, K] int8, scales [N]:           y = x @ (w_int8 * scales[:, None]).T (+ bias)
  int4  q [N, K] in 0..15, group g along K, scales_and_zeros [K // g, N, 2] (scale, zero):
        w[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n]   (torch's CPU int4pack rule)
"""

from __future__ import annotations

import torch


def int8_linear_reference(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype, computed in fp32 with the scale after the sum."""
    y = (x.float() @ w_int8.float().T) * scales.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int4_linear_reference(x: torch.Tensor, q: torch.Tensor, scales_and_zeros: torch.Tensor,
                          group: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype with the weights dequantized in fp32."""
    y = x.float() @ dequantize_int4(q, scales_and_zeros, group).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] fp32 weights of logical int4 values ``q`` [N, K]."""
    scale = scales_and_zeros[..., 0].float().repeat_interleave(group, dim=0).T  # [N, K]
    zero = scales_and_zeros[..., 1].float().repeat_interleave(group, dim=0).T
    return (q.float() - 8) * scale + zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K // 2] uint8, column k // 2 holding k even low, k odd high."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even K, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: [N, K // 2] uint8 -> [N, K] uint8 values 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)
