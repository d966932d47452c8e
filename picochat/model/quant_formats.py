"""The two weight formats picochat quantizes to, and their exact dequantizers.

Shared with the Triton kernels (``kernels/triton_quant_matmul.py``) — keep them exactly:

- **int8**: per output channel, symmetric. ``w_int8 [N, K] int8`` (values -127..127) and
  ``scales [N]``; ``w = w_int8 * scale``.
- **int4**: group-wise along K (group 32, 64 or 128), asymmetric (min/max per group).
  ``q [N, K] uint8`` (values 0..15) and ``scales_and_zeros [K // group, N, 2]`` (``[..., 0]`` the
  scale, ``[..., 1]`` the zero); ``w = (q - 8) * scale + zero`` — the convention of torch's
  ``_weight_int4pack_mm_for_cpu``.

Quantizers round to nearest, so the round-trip error is at most half a scale per element (plus
float rounding). Everything here is plain tensor math in fp32 on the weight's device; the
reference matmuls live in ``kernels/quant_reference.py``, packing for a kernel in ``quant_linear``,
GGUF blocks in ``quant_gguf``.
"""

from __future__ import annotations

import torch

from picochat.errors import ConfigError
from picochat.kernels import quant_reference

INT4_GROUP_SIZES = (32, 64, 128)


def _safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by 1: an all-zero row or group quantizes to q = 0 exactly."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` → ``(w_int8 [N, K] int8, scales [N] fp32)``, symmetric per output channel."""
    w = w.float()
    lo, hi = torch.aminmax(w, dim=1)
    scales = torch.maximum(hi, -lo) / 127  # [N]
    w_int8 = (w / _safe_divisor(scales)[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return w_int8, scales


def dequantize_int8(w_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(w_int8 [N, K], scales [N])`` → ``w [N, K] fp32``."""
    return w_int8.float() * scales.float()[:, None]


def check_int4_group(k: int, group: int) -> None:
    """Raise ConfigError unless a weight of width ``k`` splits into int4 groups of ``group``."""
    if group not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group size must be 32, 64 or 128, got {group}")
    if k % group:
        fitting = ", ".join(str(g) for g in INT4_GROUP_SIZES if k % g == 0) or "none"
        raise ConfigError(
            f"int4 group size {group} does not divide a layer width of {k} (sizes that fit: {fitting})"
        )


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` → ``(q [N, K] uint8 0..15, scales_and_zeros [K // group, N, 2] fp32)``.

    Each group of ``group`` consecutive weights along K maps its [min, max] onto 0..15:
    ``scale = (max - min) / 15`` and ``zero = min + 8 * scale``.
    """
    n, k = w.shape
    check_int4_group(k, group)
    groups = w.float().reshape(n, k // group, group)  # [N, K/g, g]
    lo, hi = torch.aminmax(groups, dim=-1)  # [N, K/g]
    scale = (hi - lo) / 15
    q = (groups - lo[..., None]).div_(_safe_divisor(scale)[..., None]).round_().clamp_(0, 15)
    zero = lo + 8 * scale
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return q.to(torch.uint8).reshape(n, k), scales_and_zeros


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """``(q [N, K] 0..15, scales_and_zeros [K // g, N, 2])`` → ``w [N, K] fp32`` (the kernels' twin)."""
    return quant_reference.dequantize_int4(q, scales_and_zeros, q.shape[1] // scales_and_zeros.shape[0])
