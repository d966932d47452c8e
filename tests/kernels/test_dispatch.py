"""Kernel dispatch: torch twins on the CPU, Triton only where CUDA is, overrides for tests."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import DEVICE, assert_close, gpu
from picochat.kernels import cpu_vnni, dispatch, quant_reference, reference

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_override():
    yield
    dispatch.set_kernel_backend(None)


def test_cpu_gets_the_torch_twins():
    assert dispatch.resolve_kernel_backend(CPU) == "torch"
    # picochat's C++ norm where its CPU kernels load (it falls back to the twin for fp32)
    assert dispatch.rms_norm_fn(CPU) is (cpu_vnni.rms_norm if cpu_vnni.available() else reference.rms_norm)
    assert dispatch.rope_fn(CPU) is reference.apply_rope


def test_forcing_triton_without_cuda_is_a_clear_error():
    dispatch.set_kernel_backend("triton")
    if torch.cuda.is_available():
        pytest.skip("this box has CUDA: forcing triton is allowed here")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        dispatch.rms_norm_fn(CPU)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="auto, triton, torch"):
        dispatch.set_kernel_backend("cuda")


@gpu
@pytest.mark.gpu
def test_cuda_gets_triton_unless_overridden():
    from picochat.kernels import triton_norm_rope

    cuda = torch.device("cuda")
    assert dispatch.rms_norm_fn(cuda) is triton_norm_rope.rms_norm
    dispatch.set_kernel_backend("torch")
    assert dispatch.rope_fn(cuda) is reference.apply_rope


def test_quant_matmuls_reach_the_triton_kernels():
    """The names the quantization code looks up; run here through the interpreter (or the GPU)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8, generator=gen)
    sz = torch.rand(2, 16, 2, generator=gen)
    x = torch.randn(2, 64, generator=gen)
    w = torch.randint(-128, 128, (16, 64), dtype=torch.int8, generator=gen)
    scales = torch.rand(16, generator=gen)
    out4 = dispatch.int4_matmul(x.to(DEVICE), quant_reference.pack_int4(q).to(DEVICE), sz.to(DEVICE), 32)
    out8 = dispatch.int8_matmul(x.to(DEVICE), w.to(DEVICE), scales.to(DEVICE))
    assert_close(out4.cpu(), quant_reference.int4_linear_reference(x, q, sz, 32), torch.float32, "int4")
    assert_close(out8.cpu(), quant_reference.int8_linear_reference(x, w, scales), torch.float32, "int8")
    with pytest.raises(ValueError, match="disagree"):  # unpacked weights are refused, not misread
        dispatch.int4_matmul(x.to(DEVICE), q.to(DEVICE), sz.to(DEVICE), 32)
