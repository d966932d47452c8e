"""Triton RMSNorm (with the fused residual add) and RoPE for CUDA: twins of ``reference.rms_norm``
and ``reference.apply_rope``, rounding where they round so low-precision outputs match.

The cos/sin table (with any rope scaling) is built by ``reference.rope_cos_sin_cache``; these
kernels only read it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [R, N]
    residual_ptr,  # [R, N] (read only with HAS_RESIDUAL)
    weight_ptr,  # [N]
    out_ptr,  # [R, N]
    new_residual_ptr,  # [R, N] x + residual (written only with HAS_RESIDUAL)
    n, eps,
    stride_x, stride_r, stride_o, stride_nr,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # the sum is rounded to x's dtype before the norm, as the reference's ``x + residual``
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_residual_ptr + row * stride_nr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    normed = (xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)).to(x.dtype)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, token, stride_xt, stride_xh, stride_ot, stride_oh,
                  num_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    """rotate_half RoPE of one token's heads [H, D], each product and sum rounded to x's dtype."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    src = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    dst = out_ptr + token * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    x1c, x2s = (x1 * cos).to(dtype).to(tl.float32), (x2 * sin).to(dtype).to(tl.float32)
    x2c, x1s = (x2 * cos).to(dtype).to(tl.float32), (x1 * sin).to(dtype).to(tl.float32)
    tl.store(dst, (x1c - x2s).to(dtype), mask=mask)
    tl.store(dst + HALF, (x2c + x1s).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr,  # [T, H, D], [T, Hkv, D]
    q_out_ptr, k_out_ptr,
    positions_ptr,  # [T] int64
    cos_sin_ptr,  # [P, D]: cos in the first half, sin in the second
    num_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    table = cos_sin_ptr + tl.load(positions_ptr + token) * stride_cs + offs_d
    # the reference casts the table to q's dtype before multiplying
    cos = tl.load(table, mask=offs_d < HALF, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = tl.load(table + HALF, mask=offs_d < HALF, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, token, stride_qt, stride_qh, stride_qot, stride_qoh,
                  num_heads, cos[None, :], sin[None, :], HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, token, stride_kt, stride_kh, stride_kot, stride_koh,
                  num_kv_heads, cos[None, :], sin[None, :], HALF, BLOCK_HKV, BLOCK_HALF)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) of x [..., N], as ``reference.rms_norm``."""
    n = x.shape[-1]
    if weight.shape != (n,) or (residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype)):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)}, residual "
                         f"{None if residual is None else (tuple(residual.shape), residual.dtype)} disagree")
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is None:
        r2, new_residual = x2, x2  # not read and not written
    else:
        r2 = _rows(residual)
        new_residual = torch.empty_like(x2)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight.contiguous(), out, new_residual, n, eps,
        x2.stride(0), r2.stride(0), out.stride(0), new_residual.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
        num_warps=_norm_warps(n),
    )
    returned_residual = x if residual is None else new_residual.view(x.shape)
    return out.view(*x.shape[:-1], n), returned_residual


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of q [T, H, D] and k [T, Hkv, D] at ``positions`` [T], as ``reference.apply_rope``."""
    t, h, d = q.shape
    if d % 2 or k.shape[0] != t or k.shape[2] != d or cos_sin.shape[-1] != d:
        raise ValueError(f"apply_rope: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"cos_sin {tuple(cos_sin.shape)} disagree")
    q, k, cos_sin = _last_dim_dense(q), _last_dim_dense(k), _last_dim_dense(cos_sin)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    half = d // 2
    _rope_kernel[(t,)](
        q, k, q_out, k_out, positions, cos_sin, h, k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin.stride(0),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_H=triton.next_power_of_2(h),
        BLOCK_HKV=triton.next_power_of_2(k.shape[1]), num_warps=4,
        # no fused multiply-add: torch rounds each product before the sum, and so must we
        enable_fp_fusion=False,
    )
    return q_out, k_out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [R, N] with unit stride along N (a view when possible)."""
    return _last_dim_dense(x).reshape(-1, x.shape[-1])


def _last_dim_dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _norm_warps(n: int) -> int:
    return 1 if n <= 512 else 4 if n <= 4096 else 8
