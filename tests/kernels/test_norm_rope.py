"""Triton RMSNorm (+ fused residual) and RoPE against their torch twins in reference.py."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import DEVICE, DTYPES, assert_close, gpu
from picochat.kernels import reference, triton_norm_rope


def randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 576), (2, 3, 100)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, shape, with_residual):
    x, weight = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype, seed=1)
    residual = randn(*shape, dtype=dtype, seed=2) if with_residual else None
    out, new_residual = triton_norm_rope.rms_norm(x, weight, 1e-5, residual)
    ref, ref_residual = reference.rms_norm(x, weight, 1e-5, residual)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "rms_norm")
    if with_residual:
        assert torch.equal(new_residual, ref_residual)  # the same rounded add
    else:
        assert new_residual is x


def test_rms_norm_strided_rows_and_fp32_weight():
    """Rows of a wider buffer; an fp32 weight promotes the output like the reference does."""
    wide = randn(5, 300, dtype=torch.float16)
    x = wide[:, 20:276]
    weight = randn(256, seed=1)
    out, _ = triton_norm_rope.rms_norm(x, weight, 1e-6, None)
    ref, _ = reference.rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32
    assert_close(out, ref, torch.float16, "strided rms_norm")


def test_rms_norm_rejects_mismatched_residual():
    x = randn(3, 64)
    with pytest.raises(ValueError, match="disagree"):
        triton_norm_rope.rms_norm(x, randn(64), 1e-5, randn(3, 64, dtype=torch.float16))


ROPE_SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", ROPE_SCALINGS, ids=["none", "linear", "llama3", "yarn"])
def test_rope_matches_reference(dtype, scaling):
    heads, kv_heads, d = 6, 2, 64
    cos_sin = reference.rope_cos_sin_cache(d, 512, 10000.0, scaling).to(DEVICE)
    positions = torch.tensor([0, 511, 3, 3, 200, 17, 64], device=DEVICE)
    q, k = randn(7, heads, d, dtype=dtype), randn(7, kv_heads, d, dtype=dtype, seed=1)
    q_rot, k_rot = triton_norm_rope.apply_rope(q, k, positions, cos_sin)
    q_ref, k_ref = reference.apply_rope(q, k, positions, cos_sin)
    assert q_rot.dtype == dtype and k_rot.shape == k.shape
    assert_close(q_rot, q_ref, dtype, f"rope q {scaling}")
    assert_close(k_rot, k_ref, dtype, f"rope k {scaling}")
    if dtype != torch.float32:  # the kernel rounds each product and sum as torch does
        assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)


def test_rope_on_fused_qkv_views_head_dim_128():
    """q and k sliced out of one QKV projection output (non-contiguous token strides)."""
    heads, kv_heads, d = 4, 1, 128
    qkv = randn(5, heads + 2 * kv_heads, d, dtype=torch.float16)
    q, k = qkv[:, :heads], qkv[:, heads:heads + kv_heads]
    cos_sin = reference.rope_cos_sin_cache(d, 64, 500000.0).to(DEVICE)
    positions = torch.arange(10, 15, device=DEVICE)
    q_rot, k_rot = triton_norm_rope.apply_rope(q, k, positions, cos_sin)
    q_ref, k_ref = reference.apply_rope(q, k, positions, cos_sin)
    assert_close(q_rot, q_ref, torch.float16, "rope q view")
    assert_close(k_rot, k_ref, torch.float16, "rope k view")
    assert torch.equal(qkv[:, :heads], q)  # the input is left alone


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 8192])
def test_wide_rms_norm_on_gpu(hidden):
    x, r = randn(33, hidden, dtype=torch.bfloat16), randn(33, hidden, dtype=torch.bfloat16, seed=1)
    w = randn(hidden, dtype=torch.bfloat16, seed=2)
    out, new_residual = triton_norm_rope.rms_norm(x, w, 1e-5, r)
    ref, ref_residual = reference.rms_norm(x, w, 1e-5, r)
    assert_close(out, ref, torch.bfloat16, f"rms_norm hidden {hidden}")
    assert torch.equal(new_residual, ref_residual)
