"""Weight-only int8 / int4 matmuls: the torch twins against torch's own CPU packed kernels (the
format contract), and the CUDA paths (Triton GEMV, Triton dequantization + matmul) against the twins."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import DEVICE, DTYPES, activations, assert_close, gpu, make_int4, make_int8
from picochat.kernels import quant_reference, triton_quant_matmul


# ------------------------------------------------------------------ the twins and torch's format

def test_int8_reference_matches_torch_int8pack():
    w, scales = make_int8(48, 96)
    x = activations(5, 96, torch.bfloat16)
    torch_out = torch._weight_int8pack_mm(x, w, scales.to(torch.bfloat16))
    assert_close(quant_reference.int8_linear_reference(x, w, scales), torch_out.float(), torch.bfloat16, "int8")


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_reference_matches_torch_int4pack(group):
    q, sz = make_int4(64, 256, group)
    x = activations(3, 256, torch.bfloat16)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    torch_out = torch._weight_int4pack_mm_for_cpu(x, packed, group, sz.to(torch.bfloat16))
    ref = quant_reference.int4_linear_reference(x, q, sz, group)
    assert_close(ref, torch_out.float(), torch.bfloat16, f"int4 group {group}")


def test_pack_int4_round_trips_and_checks_k():
    q, _ = make_int4(5, 64, 32)
    packed = quant_reference.pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)
    assert torch.equal(quant_reference.unpack_int4(packed), q)
    with pytest.raises(ValueError, match="even K"):
        quant_reference.pack_int4(q[:, :7])


# ------------------------------------------------------------------------ Triton against twins

ROWS = [1, 3, 17, 70]  # GEMV for decode batches, dequantize + matmul for prefill


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ROWS)
def test_int8_linear_matches_reference(dtype, m):
    w, scales = make_int8(70, 100)  # N and K off the block sizes
    x = activations(m, 100, dtype)
    bias = torch.randn(70).to(dtype)
    out = triton_quant_matmul.int8_linear(x.to(DEVICE), w.to(DEVICE), scales.to(DEVICE), bias.to(DEVICE))
    ref = quant_reference.int8_linear_reference(x.float(), w, scales, bias.float())
    assert out.dtype == dtype
    assert_close(out.cpu(), ref, dtype, f"int8 m={m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_matches_reference(dtype, m, group):
    q, sz = make_int4(40, 256, group)
    x = activations(m, 256, dtype)
    packed = quant_reference.pack_int4(q)
    out = triton_quant_matmul.int4_linear(x.to(DEVICE), packed.to(DEVICE), sz.to(DEVICE), group)
    ref = quant_reference.int4_linear_reference(x.float(), q, sz, group)
    assert_close(out.cpu(), ref, dtype, f"int4 m={m} group={group}")


@pytest.mark.parametrize("m", [2, 20])
def test_strided_3d_activations_and_act_dtype_scales(m):
    """x as a [B, T, K] slice of a wider buffer; scales in the activation dtype."""
    w, scales = make_int8(33, 64)
    q, sz = make_int4(33, 64, 32)
    wide = activations(m * 2, 80, torch.float16).view(2, m, 80)
    x = wide[:, :, 8:72]
    scales16, sz16 = scales.half(), sz.half()
    packed = quant_reference.pack_int4(q)
    out8 = triton_quant_matmul.int8_linear(x.to(DEVICE), w.to(DEVICE), scales16.to(DEVICE))
    out4 = triton_quant_matmul.int4_linear(x.to(DEVICE), packed.to(DEVICE), sz16.to(DEVICE), 32)
    assert out8.shape == (2, m, 33)
    ref8 = quant_reference.int8_linear_reference(x.float(), w, scales16)
    ref4 = quant_reference.int4_linear_reference(x.float(), q, sz16, 32)
    assert_close(out8.cpu(), ref8, torch.float16, "int8 3d")
    assert_close(out4.cpu(), ref4, torch.float16, "int4 3d")


def test_bad_shapes_are_rejected():
    q, sz = make_int4(8, 64, 32)
    with pytest.raises(ValueError, match="disagree"):
        triton_quant_matmul.int4_linear(activations(1, 64, torch.float32), quant_reference.pack_int4(q), sz, 64)
    w, scales = make_int8(8, 64)
    with pytest.raises(ValueError, match="disagree"):
        triton_quant_matmul.int8_linear(activations(1, 32, torch.float32), w, scales)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 512])
def test_llama_sized_matmuls_on_gpu(m):
    q, sz = (t.to(DEVICE) for t in make_int4(4096, 4096, 128))
    w, scales = (t.to(DEVICE) for t in make_int8(4096, 4096))
    x = activations(m, 4096, torch.bfloat16).to(DEVICE)
    out4 = triton_quant_matmul.int4_linear(x, quant_reference.pack_int4(q), sz, 128)
    out8 = triton_quant_matmul.int8_linear(x, w, scales)
    assert_close(out4, quant_reference.int4_linear_reference(x.float(), q, sz, 128), torch.bfloat16, "int4")
    assert_close(out8, quant_reference.int8_linear_reference(x.float(), w, scales), torch.bfloat16, "int8")
