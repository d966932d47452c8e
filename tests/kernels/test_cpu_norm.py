"""picochat's CPU RMSNorm op (``cpu_norm.cpp``): the reference's rounding, rows independent of the
rows beside them, and fp32 left to the reference."""

from __future__ import annotations

import pytest
import torch

from picochat.kernels import cpu_vnni, dispatch, reference

pytestmark = pytest.mark.skipif(not cpu_vnni.available(), reason="needs an AVX-512 VNNI CPU and a C++ compiler")


def inputs(dtype: torch.dtype, rows: int = 37, dim: int = 576, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x, residual = (torch.randn(rows, dim, generator=gen).mul(scale).to(dtype) for scale in (3.0, 5.0))
    return x, residual, torch.randn(dim, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_the_reference(dtype, with_residual):
    x, residual, weight = inputs(dtype)
    residual = residual if with_residual else None
    normed, new_residual = cpu_vnni.rms_norm(x, weight, 1e-5, residual)
    expected, expected_residual = reference.rms_norm(x, weight, 1e-5, residual)
    assert normed.dtype == dtype and new_residual.dtype == dtype
    assert torch.equal(new_residual, expected_residual)  # x + residual rounded once, as torch rounds it
    # the sum of squares may differ in its last bit (another order): one rounding step at most
    torch.testing.assert_close(normed, expected, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=0)


def test_rows_do_not_depend_on_the_rows_beside_them():
    x, residual, weight = inputs(torch.bfloat16, rows=9)
    batch = cpu_vnni.rms_norm(x, weight, 1e-5, residual)
    for i in range(9):
        alone = cpu_vnni.rms_norm(x[i:i + 1], weight, 1e-5, residual[i:i + 1])
        assert all(torch.equal(a, b[i:i + 1]) for a, b in zip(alone, batch))


def test_fp32_takes_the_reference_and_dispatch_picks_the_op():
    x, residual, weight = inputs(torch.float32)
    got = cpu_vnni.rms_norm(x, weight, 1e-5, residual)
    assert all(torch.equal(a, b) for a, b in zip(got, reference.rms_norm(x, weight, 1e-5, residual)))
    assert dispatch.rms_norm_fn(torch.device("cpu")) is cpu_vnni.rms_norm
