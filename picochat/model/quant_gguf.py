"""GGUF quantized blocks (Q4_0, Q4_1, Q8_0) straight into picochat's int4 / int8 formats.

The GGUF loader hands over raw blocks as a ``GGUFQuantTensor``: ``qtype`` ("Q4_0" | "Q4_1" |
"Q8_0"), ``data`` (``uint8 [N, K // 32, block_bytes]``, rows already in HF order) and ``shape``
``(N, K)``; this module never reads files. Block layouts (32 weights each, little-endian):

- Q8_0 (34 bytes): fp16 ``d``, 32 × int8 ``q``; ``w = d * q``.
- Q4_0 (18 bytes): fp16 ``d``, 16 bytes of nibbles (low nibbles are weights 0..15, high nibbles
  16..31); ``w = d * (q - 8)``.
- Q4_1 (20 bytes): fp16 ``d``, fp16 ``m``, 16 bytes of nibbles as Q4_0; ``w = d * q + m``.

Q4_0 and Q4_1 map exactly onto int4 with group 32 (no requantization). Q8_0 has a scale per
32-block but the int8 kernel has one per row, so it is requantized (see
:func:`int8_from_gguf_q8_0`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from picochat.errors import ModelLoadError
from picochat.model.gguf_dequant import BLOCK_BYTES, BLOCK_SIZE, dequantize_blocks
from picochat.model.quant_formats import quantize_int8
from picochat.model.quant_linear import Backend, Int4Linear, Int8Linear

if TYPE_CHECKING:
    from picochat.model.gguf_loader import GGUFQuantTensor

_REQUANT_CHUNK_ELEMENTS = 1 << 22  # weights dequantized at once in Q8_0 requantization: 16 MB fp32


def _blocks(t: GGUFQuantTensor, qtypes: tuple[str, ...]) -> torch.Tensor:
    """``t.data`` checked against ``t.qtype`` and ``t.shape``: ``uint8 [N, K // 32, block_bytes]``."""
    if t.qtype not in qtypes:
        raise ModelLoadError(f"expected a GGUF tensor of type {' or '.join(qtypes)}, got {t.qtype}")
    n, k = t.shape
    expected = (n, k // BLOCK_SIZE, BLOCK_BYTES[t.qtype])
    if k % BLOCK_SIZE or tuple(t.data.shape) != expected or t.data.dtype != torch.uint8:
        raise ModelLoadError(
            f"GGUF {t.qtype} tensor of shape {tuple(t.shape)} has blocks of shape "
            f"{tuple(t.data.shape)} ({t.data.dtype}), expected {expected} (torch.uint8)"
        )
    return t.data


def _fp16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 stored at byte ``offset`` of every block, as fp32 ``[N, K // 32]``."""
    return blocks[..., offset : offset + 2].contiguous().view(torch.float16)[..., 0].float()


def int4_from_gguf(t: GGUFQuantTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 blocks → int4 ``(q [N, K] uint8, scales_and_zeros [K // 32, N, 2] fp32)``, group 32.

    Exact up to fp32 rounding: Q4_0's ``d·(q − 8)`` is scale ``d``, zero 0; Q4_1's ``d·q + m`` is
    ``(q − 8)·d + (m + 8d)``, so scale ``d``, zero ``m + 8d``.
    """
    blocks = _blocks(t, ("Q4_0", "Q4_1"))
    n, k = t.shape
    d = _fp16_field(blocks, 0)  # [N, K/32]
    if t.qtype == "Q4_0":
        zero, nibbles = torch.zeros_like(d), blocks[..., 2:18]
    else:
        zero, nibbles = _fp16_field(blocks, 2) + 8 * d, blocks[..., 4:20]
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(n, k)  # [N, K/32, 32] → [N, K]
    scales_and_zeros = torch.stack([d, zero], dim=-1).transpose(0, 1).contiguous()
    return q, scales_and_zeros


def int8_from_gguf_q8_0(t: GGUFQuantTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks → int8 ``(w_int8 [N, K], scales [N] fp32)``, requantized per output channel.

    Q8_0 stores one fp16 scale per 32 weights; the int8 kernel takes one per row. Rows are
    dequantized a chunk at a time (never the whole tensor in fp32) and requantized with
    :func:`quantize_int8`. Extra error: at most half the new row scale, ``max|w_row| / 254``, per
    element on top of Q8_0's own — the same bound as quantizing the float weights to int8.
    """
    blocks = _blocks(t, ("Q8_0",))
    n, k = t.shape
    w_int8 = torch.empty(n, k, dtype=torch.int8, device=blocks.device)
    scales = torch.empty(n, dtype=torch.float32, device=blocks.device)
    rows = max(1, _REQUANT_CHUNK_ELEMENTS // k)
    for start in range(0, n, rows):
        w_int8[start : start + rows], scales[start : start + rows] = quantize_int8(
            dequantize_blocks(blocks[start : start + rows], "Q8_0")
        )
    return w_int8, scales


def linear_from_gguf(
    tensors: Sequence[GGUFQuantTensor], bias: torch.Tensor | None = None, backend: Backend = "auto"
) -> Int4Linear | Int8Linear:
    """One quantized linear from GGUF tensors concatenated along N (e.g. q, k, v → ``qkv_proj``).

    All Q4_0 / Q4_1 → :class:`Int4Linear` (group 32, exact); all Q8_0 → :class:`Int8Linear`
    (requantized). The module lives on the device of the tensors' ``data``.
    """
    qtypes = {t.qtype for t in tensors}
    if qtypes <= {"Q4_0", "Q4_1"}:
        parts = [int4_from_gguf(t) for t in tensors]
        q = torch.cat([p[0] for p in parts], dim=0)
        scales_and_zeros = torch.cat([p[1] for p in parts], dim=1)
        return Int4Linear(q, scales_and_zeros, bias=bias, backend=backend)
    if qtypes == {"Q8_0"}:
        parts = [int8_from_gguf_q8_0(t) for t in tensors]
        w_int8 = torch.cat([p[0] for p in parts], dim=0)
        return Int8Linear(w_int8, torch.cat([p[1] for p in parts]), bias=bias, backend=backend)
    raise ModelLoadError(
        f"cannot build one quantized linear from GGUF types {', '.join(sorted(qtypes))} "
        "(supported: Q4_0 / Q4_1 together, or Q8_0)"
    )
