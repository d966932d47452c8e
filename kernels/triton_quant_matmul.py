"""Triton weight-only int8 / int4 matmuls for CUDA: twins of ``quant_reference``.

A GEMV kernel (one program per activation row and block of outputs, no tensor cores) serves
decode batches of a few rows; a tiled GEMM kernel with tl.dot serves prefill. Both accumulate
``x @ (integer weights).T`` in fp32 and apply scales (and int4 zeros) per tile or at the end,
so the low-precision rounding is only that of x and of the output. int4 weights are read as two
nibbles a byte (``quant_reference.pack_int4``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from picochat.kernels.triton_common import INTERPRET, dot_precision

GEMV_MAX_ROWS = 4  # up to this many activation rows, re-reading the weights per row beats padding a tile


@triton.jit
def _load_weights(w_ptr, offs_n, offs_k, k, stride_wn, mask_n, INT4: tl.constexpr):
    """[BLOCK_N, BLOCK_K] integer weights as int32: int8 values, or int4 values minus 8."""
    mask = mask_n[:, None] & (offs_k < k)[None, :]
    if INT4:
        byte = tl.load(w_ptr + offs_n[:, None] * stride_wn + (offs_k // 2)[None, :], mask=mask, other=0)
        return ((byte.to(tl.int32) >> ((offs_k % 2) * 4)[None, :]) & 0xF) - 8
    return tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.int32)


@triton.jit
def _load_group_scale_zero(sz_ptr, k_start, offs_n, mask_n, stride_sg, stride_sn,
                           GROUP: tl.constexpr):
    """scale and zero [BLOCK_N] of the int4 group holding column ``k_start``."""
    ptrs = sz_ptr + (k_start // GROUP) * stride_sg + offs_n * stride_sn
    scale = tl.load(ptrs, mask=mask_n, other=0.0).to(tl.float32)
    zero = tl.load(ptrs + 1, mask=mask_n, other=0.0).to(tl.float32)
    return scale, zero


@triton.jit
def _epilogue(acc, scales_ptr, bias_ptr, offs_n, mask_n, INT4: tl.constexpr, HAS_BIAS: tl.constexpr):
    """int8's per-channel scale (int4 scaled per group already), then the bias."""
    if not INT4:
        acc = acc * tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return acc


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
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k_start in range(0, k, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs_k, mask=offs_k < k, other=0.0).to(tl.float32)
        w = _load_weights(w_ptr, offs_n, offs_k, k, stride_wn, mask_n, INT4).to(tl.float32)
        part = tl.sum(w * x[None, :], axis=1)
        if INT4:  # BLOCK_K divides GROUP: one scale and zero per output in this tile
            scale, zero = _load_group_scale_zero(scales_ptr, k_start, offs_n, mask_n,
                                                 stride_sg, stride_sn, GROUP)
            part = part * scale + tl.sum(x, axis=0) * zero
        acc += part
    acc = _epilogue(acc, scales_ptr, bias_ptr, offs_n, mask_n, INT4, HAS_BIAS)
    tl.store(y_ptr + row * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _quant_gemm_kernel(
    x_ptr, w_ptr, scales_ptr, bias_ptr, y_ptr,  # as in _quant_gemv_kernel
    m, n, k,
    stride_xm, stride_wn, stride_sg, stride_sn, stride_ym,
    INT4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < m, offs_n < n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in range(0, k, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < k)[None, :], other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
        # small integers are exact in fp16 / bf16: the dot only rounds x's own products
        w = _load_weights(w_ptr, offs_n, offs_k, k, stride_wn, mask_n, INT4).to(x.dtype)
        part = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        if INT4:
            scale, zero = _load_group_scale_zero(scales_ptr, k_start, offs_n, mask_n,
                                                 stride_sg, stride_sn, GROUP)
            x_sum = tl.sum(x.to(tl.float32), axis=1)
            part = part * scale[None, :] + x_sum[:, None] * zero[None, :]
        acc += part
    acc = _epilogue(acc, scales_ptr, bias_ptr, offs_n[None, :], mask_n[None, :], INT4, HAS_BIAS)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


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
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    int4 = int4_group is not None
    common = dict(INT4=int4, GROUP=int4_group or 1, HAS_BIAS=bias is not None)
    args = (x2, w, scales, bias if bias is not None else y, y)
    strides = (x2.stride(0), w.stride(0), *scale_strides, y.stride(0))
    if m <= GEMV_MAX_ROWS:
        block_n = 64
        block_k = min(int4_group, 128) if int4 else 128
        _quant_gemv_kernel[(triton.cdiv(n, block_n), m)](
            *args, n, k, *strides, **common, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    else:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n, block_k = 64, (min(int4_group, 64) if int4 else 64)
        _quant_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            *args, m, n, k, *strides, **common, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_FP32=INTERPRET, DOT_PRECISION=dot_precision(x.dtype), num_warps=4, num_stages=3)
    return y.view(*x.shape[:-1], n)
