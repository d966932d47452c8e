"""Weight-only int8 / int4 matmuls for CUDA: twins of ``quant_reference``.

Decode batches of a few rows run a Triton GEMV (one program per activation row and block of
outputs, no tensor cores) that reads the integer weights once per row, accumulates
``x @ (integer weights).T`` in fp32 and applies scales (and int4 zeros) per group or at the end,
so the low-precision rounding is only that of x and of the output. int4 weights are read as two
nibbles a byte (``quant_reference.pack_int4``): the low nibble pairs with the even column of x,
the high one with the odd column.

More rows (prefill) are compute-bound: there the weights are dequantized into x's dtype and
multiplied by torch's matmul (cuBLAS on tensor cores): on an H100 at 2048 rows x 4096 x 4096 that
ran 26x (int4) and 3x (int8) faster than a Triton GEMM dequantizing per tile (``benchmarks/kernels.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

GEMV_MAX_ROWS = 4  # up to this many activation rows, re-reading the weights per row beats a matmul
# GEMV tile: few outputs per program (enough programs on small N), long steps along K (whole int4
# groups); the best of a sweep on an H100 at 4096 x 4096 for int8 and int4 alike
GEMV_BLOCK_N, GEMV_MAX_BLOCK_K, GEMV_WARPS = 8, 1024, 4


@triton.jit
def _quant_gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] int8, or [N, K // 2] uint8 nibbles
    scales_ptr,  # int8: [N]; int4: scales_and_zeros [K // GROUP, N, 2]
    bias_ptr,  # [N] (read only with HAS_BIAS)
    y_ptr,  # [M, N]
    n, k,
    stride_xm, stride_wn, stride_sg, stride_sn, stride_ym,
    INT4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    x_row = x_ptr + row * stride_xm
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k_start in range(0, k, BLOCK_K):
        if INT4:  # BLOCK_K spans whole groups: [BLOCK_N, GROUPS, GROUP // 2] bytes
            offs_b = k_start // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns
            mask_b = offs_b < k // 2
            byte = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :],
                           mask=mask_n[:, None] & mask_b[None, :], other=0).to(tl.int32)
            x_even = tl.load(x_row + 2 * offs_b, mask=mask_b, other=0.0).to(tl.float32)
            x_odd = tl.load(x_row + 2 * offs_b + 1, mask=mask_b, other=0.0).to(tl.float32)
            low = ((byte & 0xF) - 8).to(tl.float32)
            high = ((byte >> 4) - 8).to(tl.float32)
            prods = low * x_even[None, :] + high * x_odd[None, :]
            groups: tl.constexpr = BLOCK_K // GROUP
            part = tl.sum(tl.reshape(prods, (BLOCK_N, groups, GROUP // 2)), axis=2)
            x_sum = tl.sum(tl.reshape(x_even + x_odd, (groups, GROUP // 2)), axis=1)
            offs_g = k_start // GROUP + tl.arange(0, groups)
            mask_s = mask_n[:, None] & (offs_g < k // GROUP)[None, :]
            ptrs = scales_ptr + offs_g[None, :] * stride_sg + offs_n[:, None] * stride_sn
            scale = tl.load(ptrs, mask=mask_s, other=0.0).to(tl.float32)
            zero = tl.load(ptrs + 1, mask=mask_s, other=0.0).to(tl.float32)
            acc += tl.sum(part * scale + x_sum[None, :] * zero, axis=1)
        else:
            offs_k = k_start + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0).to(tl.float32)
            x = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
    if not INT4:
        acc = acc * tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _dequantize_kernel(
    w_ptr,  # [N, K] int8, or [N, K // 2] uint8 nibbles
    scales_ptr,  # as in _quant_gemv_kernel
    out_ptr,  # [N, K] in the activations' dtype
    n, k, stride_wn, stride_sg, stride_sn, stride_on,
    INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    out_rows = out_ptr + offs_n[:, None].to(tl.int64) * stride_on
    if INT4:  # BLOCK_K // 2 bytes as [BLOCK_N, GROUPS, GROUP // 2], each an even and an odd column
        groups: tl.constexpr = BLOCK_K // GROUP
        offs_b = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        mask = mask_n[:, None] & (offs_b < k // 2)[None, :]
        byte = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :], mask=mask, other=0).to(tl.int32)
        byte = tl.reshape(byte, (BLOCK_N, groups, GROUP // 2))
        offs_g = tl.program_id(1) * groups + tl.arange(0, groups)
        mask_g = mask_n[:, None] & (offs_g < k // GROUP)[None, :]
        ptrs = scales_ptr + offs_g[None, :] * stride_sg + offs_n[:, None] * stride_sn
        scale = tl.load(ptrs, mask=mask_g, other=0.0).to(tl.float32)[:, :, None]
        zero = tl.load(ptrs + 1, mask=mask_g, other=0.0).to(tl.float32)[:, :, None]
        low = ((byte & 0xF) - 8).to(tl.float32) * scale + zero
        high = ((byte >> 4) - 8).to(tl.float32) * scale + zero
        w = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))  # columns interleaved back
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(out_rows + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & (offs_k < k)[None, :])
    else:
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k < k)[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.float32)
        scale = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_rows + offs_k[None, :], (w * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (w_int8 [N, K] * scales [N, None]).T (+ bias) in x's dtype."""
    n, k = w_int8.shape
    if w_int8.dtype != torch.int8 or scales.shape != (n,) or x.shape[-1] != k:
        raise ValueError(f"int8_linear: x {tuple(x.shape)}, w {tuple(w_int8.shape)} {w_int8.dtype}, "
                         f"scales {tuple(scales.shape)} disagree")
    return _launch(x, w_int8.contiguous(), scales.contiguous(), (0, 0), bias, n, k, int4_group=None)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantized int4 weights (``pack_int4`` [N, K // 2]).T (+ bias) in x's dtype."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if (packed.dtype != torch.uint8 or group not in (32, 64, 128) or x.shape[-1] != k
            or scales_and_zeros.shape != (k // group, n, 2) or k % group):
        raise ValueError(f"int4_linear: x {tuple(x.shape)}, packed {tuple(packed.shape)} {packed.dtype}, "
                         f"scales_and_zeros {tuple(scales_and_zeros.shape)}, group {group} disagree")
    sz = scales_and_zeros.contiguous()
    return _launch(x, packed.contiguous(), sz, sz.stride()[:2], bias, n, k, int4_group=group)


def _launch(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, scale_strides: tuple[int, int],
            bias: torch.Tensor | None, n: int, k: int, int4_group: int | None) -> torch.Tensor:
    x2 = (x if x.stride(-1) == 1 else x.contiguous()).reshape(-1, k)
    m = x2.shape[0]
    if m > GEMV_MAX_ROWS:
        return _dequantized_linear(x2, w, scales, scale_strides, bias, n, k, int4_group).view(*x.shape[:-1], n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    int4 = int4_group is not None
    _quant_gemv_kernel[(triton.cdiv(n, GEMV_BLOCK_N), m)](
        x2, w, scales, bias if bias is not None else y, y, n, k,
        x2.stride(0), w.stride(0), *scale_strides, y.stride(0),
        INT4=int4, GROUP=int4_group or 1, HAS_BIAS=bias is not None,
        BLOCK_N=GEMV_BLOCK_N, BLOCK_K=min(GEMV_MAX_BLOCK_K, triton.next_power_of_2(k)),
        num_warps=GEMV_WARPS)
    return y.view(*x.shape[:-1], n)


def _dequantized_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, scale_strides: tuple[int, int],
                        bias: torch.Tensor | None, n: int, k: int, int4_group: int | None) -> torch.Tensor:
    """x [M, K] @ weights.T through torch's matmul, the weights dequantized into x's dtype first."""
    weights = torch.empty(n, k, dtype=x.dtype, device=x.device)
    block_n, block_k = 32, 128
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        w, scales, weights, n, k, w.stride(0), *scale_strides, weights.stride(0),
        INT4=int4_group is not None, GROUP=int4_group or 1, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return F.linear(x, weights, None if bias is None else bias.to(x.dtype))
