"""Shared by the kernel tests: where the kernels run, the error bound against fp32 math, and
random quantized weights and activations."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")

# the interpreter turns bf16 into fp32 by truncation, so bf16 is checked on a GPU only
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])

# max |error| allowed, as a fraction of the reference's largest magnitude: a few output roundings
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton)")


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``out`` within the dtype's bound of the fp32 ``ref``; the message has max and mean error."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.float() - ref.float()).abs()
    bound = TOLERANCE[dtype] * max(1.0, ref.float().abs().max().item())
    assert err.max().item() <= bound, (
        f"{what}: max error {err.max().item():.3g} > {bound:.3g} (mean {err.mean().item():.3g})")


def make_int8(n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    return w, torch.rand(n, generator=gen) * 0.02 + 0.001


def make_int4(n: int, k: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(k // group, n, generator=gen) * 0.1 + 0.01
    zeros = torch.randn(k // group, n, generator=gen) * 0.1
    return q, torch.stack([scales, zeros], dim=-1)


def activations(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
