"""picochat's CPU int4 / int8 kernels (AVX-512 VNNI) against their torch twins, their weight layouts
against the reference formats, and the quantized linears choosing them, or torch's kernels where
they are unavailable."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import activations, make_int4, make_int8
from picochat.kernels import cpu_vnni, quant_reference
from picochat.model.quant_linear import VNNI_INT4_DEQUANT_MIN_ROWS, Int4Linear, Int8Embedding, Int8Linear

needs_kernels = pytest.mark.skipif(not cpu_vnni.available(), reason="needs an AVX-512 VNNI CPU and a C++ compiler")


def activations_with_a_zero_group(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    x = activations(rows, k, dtype, seed=7)
    x[0, :32] = 0  # an all-zero group: scale 0, nothing divided by it
    return x


def quantized_x_twin(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' x: ``(xq [M, G, 32], scale [M, G], sum of x [M, G])``, rounded half to even."""
    groups = x.float().view(x.shape[0], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inverse = torch.full_like(amax, 127) / amax  # as the kernel divides (127 / tensor rounds otherwise)
    xq = torch.where(amax > 0, torch.round(groups * inverse), 0.0)
    return xq, (amax / 127).squeeze(-1), groups.sum(-1)


def group_dots(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact integer dot products per group: ``xq [M, G, 32]`` with ``w [N, G * 32]`` → ``[M, N, G]``."""
    return torch.einsum("mgt,ngt->mng", xq.double(), w.double().view(w.shape[0], -1, 32)).float()


def int4_mm_twin(x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    xq, scale, sums = quantized_x_twin(x)
    per_row = lambda t: t.float().transpose(1, 2).reshape(-1, t.shape[1])  # noqa: E731  [N, G]
    dots = group_dots(xq, cpu_vnni.unpack_int4(packed))
    return (dots * per_row(d) * scale[:, None, :] + per_row(m) * sums[:, None, :]).sum(-1)


def int8_mm_twin(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    xq, scale, _ = quantized_x_twin(x)
    return (group_dots(xq, w) * scale[:, None, :]).sum(-1) * scales


def test_cpu_flags_that_allow_the_kernels_get_them_built() -> None:
    flags_present = all(f in cpu_vnni._cpu_flags() for f in cpu_vnni.REQUIRED_CPU_FLAGS)
    assert cpu_vnni.available() == flags_present  # a build failure on such a CPU is a test failure


def test_disabled_by_environment_means_unavailable(monkeypatch) -> None:
    monkeypatch.setenv("PICOCHAT_CPU_KERNELS", "0")
    assert cpu_vnni.available.__wrapped__() is False


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_pack_round_trips_and_dequantizes_as_the_reference(group: int) -> None:
    q, scales_and_zeros = make_int4(48, 256, group)
    packed, d, m = cpu_vnni.pack_int4(q, scales_and_zeros)
    assert packed.shape == (3, 8, 256) and d.shape == m.shape == (3, 8, 16) and d.dtype == torch.float16
    assert torch.equal(cpu_vnni.unpack_int4(packed), q)
    expected = quant_reference.dequantize_int4(q, scales_and_zeros, group)
    # only the fp16 rounding (half an ulp, 2^-11 relative) of d = scale and m = zero - 8 * scale
    # separates the two: |error| <= 2^-11 * (|m| + 15 |d|), plus fp32 noise
    scale, zero = scales_and_zeros.repeat_interleave(group, dim=0).unbind(-1)  # [K, N] each
    bound = 2**-11 * ((zero - 8 * scale).abs() + 15 * scale).T + 1e-6
    assert ((cpu_vnni.dequantize_int4(packed, d, m) - expected).abs() <= bound).all()


def test_int8_pack_keeps_every_row() -> None:
    w, _ = make_int8(48, 96)
    packed = cpu_vnni.pack_int8(w)
    assert packed.shape == (3, 3, 512) and packed.dtype == torch.uint8
    ids = torch.tensor([[0, 17, 47], [16, 15, 5]])
    assert torch.equal(cpu_vnni.int8_rows(packed, ids), w[ids])
    assert torch.equal(cpu_vnni.int8_rows(packed, torch.arange(48)), w)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_their_torch_twins(rows: int, dtype: torch.dtype) -> None:
    x = activations_with_a_zero_group(rows, 576, dtype)
    q, scales_and_zeros = make_int4(64, 576, 32, seed=rows)
    packed, d, m = cpu_vnni.pack_int4(q, scales_and_zeros)
    out = cpu_vnni.int4_mm(x, packed, d, m)
    assert out.dtype == torch.float32 and out.shape == (rows, 64)
    torch.testing.assert_close(out, int4_mm_twin(x, packed, d, m), rtol=1e-5, atol=1e-5)
    w, scales = make_int8(48, 576, seed=rows)
    out = cpu_vnni.int8_mm(x, cpu_vnni.pack_int8(w), scales)
    assert out.dtype == torch.float32 and out.shape == (rows, 48)
    torch.testing.assert_close(out, int8_mm_twin(x, w, scales), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("group", [32, 128])
def test_int4_dequantize_kernel_equals_the_torch_unpacking_rounded_to_bf16(group: int) -> None:
    packed, d, m = cpu_vnni.pack_int4(*make_int4(64, 384, group, seed=group))
    expected = cpu_vnni.dequantize_int4(packed, d, m).to(torch.bfloat16)
    assert torch.equal(cpu_vnni.int4_dequantize_bf16(packed, d, m), expected)


@needs_kernels
@pytest.mark.parametrize("group", [32, 128])
def test_int4_linear_picks_the_kernel_and_stays_close_to_the_fp32_reference(group: int) -> None:
    q, scales_and_zeros = make_int4(96, 512, group)
    bias = torch.randn(96) * 0.1
    fast = Int4Linear(q, scales_and_zeros, bias=bias)
    reference = Int4Linear(q, scales_and_zeros, bias=bias, backend="reference")
    assert (fast.backend, fast.group) == ("vnni", group)
    for rows in (1, 7, VNNI_INT4_DEQUANT_MIN_ROWS):  # the last: a prefill chunk on the dequantized weight
        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        out, expected = fast(x).float(), reference(x.float())
        # int8 activations (or a bf16 weight for prefill rows) cost ~1 % of the output's scale
        assert out.shape == expected.shape
        assert (out - expected).abs().max() <= 0.02 * expected.abs().max()
    assert fast(x).dtype == torch.bfloat16


@needs_kernels
def test_int8_linear_and_its_embedding_on_the_kernel_layout() -> None:
    w, scales = make_int8(80, 192)
    bias = torch.randn(80) * 0.1
    fast = Int8Linear(w, scales, bias=bias)
    reference = Int8Linear(w, scales, bias=bias, backend="reference")
    assert fast.backend == "vnni" and not hasattr(fast, "w_int8")  # the weight is held once
    x = torch.randn(3, 192)
    expected = reference(x)
    assert (fast(x) - expected).abs().max() <= 0.02 * expected.abs().max()
    ids = torch.tensor([[3, 79], [0, 16]])
    embedding = Int8Embedding(fast, torch.float32)
    torch.testing.assert_close(embedding(ids), Int8Embedding(reference, torch.float32)(ids))


@needs_kernels
def test_weight_bytes_of_the_kernel_layouts() -> None:
    q, scales_and_zeros = make_int4(32, 256, 64)
    int4 = Int4Linear(q, scales_and_zeros, bias=torch.zeros(32))
    # two weights a byte; fp16 d and m per group of 32 (group 64 repeated); fp32 bias
    assert int4.backend == "vnni"
    assert int4.weight_bytes() == 32 * 256 // 2 + (256 // 32) * 32 * 2 * 2 + 32 * 4
    int8 = Int8Linear(*make_int8(32, 256))
    assert int8.backend == "vnni" and int8.weight_bytes() == 32 * 256 + 32 * 4


def test_shapes_the_kernels_cannot_take_use_torchs(monkeypatch) -> None:
    q, scales_and_zeros = make_int4(40, 64, 32)  # N % 16 != 0
    assert Int4Linear(q, scales_and_zeros).backend == "reference"
    with pytest.raises(ValueError, match="vnni"):
        Int4Linear(q, scales_and_zeros, backend="vnni")
    assert Int8Linear(*make_int8(48, 80)).backend == "packed"  # K % 32 != 0
    monkeypatch.setattr(cpu_vnni, "available", lambda: False)
    q, scales_and_zeros = make_int4(48, 64, 32)
    assert Int4Linear(q, scales_and_zeros).backend == "packed"
    assert Int8Linear(*make_int8(48, 64)).backend == "packed"
