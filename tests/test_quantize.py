"""Weight quantization: formats, GGUF conversion, the quantized linears and the model-level swap."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from picochat.config import QuantConfig
from picochat.errors import ConfigError, ModelLoadError
from picochat.kernels import cpu_vnni
from picochat.model import quant_gguf, quant_linear
from picochat.model.gguf_loader import GGUFQuantTensor, open_gguf
from picochat.model.quantize import (
    Int4Linear, Int8Linear, build_quantized_linears, dequantize_int4, dequantize_int8, int4_from_gguf,
    int8_from_gguf_q8_0, linear_from_gguf, quantize_int4, quantize_int8, swap_linears, weight_bytes,
)

BF16 = torch.bfloat16
FLOAT_SLACK = 1e-6  # relative fp32 rounding allowed on top of an exact bound


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


def group_view(t: torch.Tensor, group: int) -> torch.Tensor:
    """``[N, K]`` → ``[K // group, N, group]``, aligned with ``scales_and_zeros``."""
    n, k = t.shape
    return t.reshape(n, k // group, group).transpose(0, 1)


def assert_matches_bf16_reference(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                                  bias: torch.Tensor | None) -> None:
    """``out`` is what torch's packed kernels compute: bf16 x times the fp32 weight ``w`` (dequantized
    from the bf16 scales the module stores), fp32 accumulation, bf16 output and bias add. Allowed:
    one or two bf16 roundings of the result landing differently, plus fp32 accumulation noise."""
    y = (x.to(BF16).float() @ w.float().t()).to(BF16)
    bias_abs = 0.0
    if bias is not None:
        y = y + bias.to(BF16)
        bias_abs = bias.float().abs()
    expected = y.float()
    tol = 2**-7 * (expected.abs() + bias_abs) + 2**-16 * (x.float().abs() @ w.float().abs().t())
    diff = (out.float() - expected).abs()
    assert out.dtype == x.dtype and out.shape == expected.shape
    excess = (diff - tol).max().item()
    assert excess <= 0, f"max diff {diff.max().item():.3g} exceeds the bf16 tolerance by {excess:.3g}"


# ---- formats: round trip within half a scale --------------------------------------------------


def test_int8_round_trip_within_half_a_scale() -> None:
    w = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]
    w[5] = 0.0  # an all-zero row quantizes to zeros
    w_int8, scales = quantize_int8(w)
    assert w_int8.dtype == torch.int8 and w_int8.shape == (48, 80) and scales.shape == (48,)
    assert int(w_int8.abs().max()) == 127
    err = (dequantize_int8(w_int8, scales) - w).abs()
    assert bool((err <= scales[:, None] / 2 * (1 + FLOAT_SLACK)).all())
    assert bool((w_int8[5] == 0).all())


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_within_half_a_group_scale(group: int) -> None:
    w = torch.randn(32, 256) + torch.randn(32, 1)  # rows off-centre: the zero point matters
    w[3, :group] = 0.7  # a constant group: scale 0, reproduced exactly
    q, scales_and_zeros = quantize_int4(w, group)
    assert q.dtype == torch.uint8 and q.shape == (32, 256) and int(q.max()) == 15 and int(q.min()) == 0
    assert scales_and_zeros.shape == (256 // group, 32, 2)
    err = group_view((dequantize_int4(q, scales_and_zeros) - w).abs(), group)  # [K/g, N, g]
    scale = scales_and_zeros[..., 0:1]
    assert bool((err <= scale / 2 + FLOAT_SLACK * group_view(w.abs(), group)).all())
    assert torch.allclose(dequantize_int4(q, scales_and_zeros)[3, :group], torch.full((group,), 0.7))


def test_int4_group_that_does_not_divide_the_width_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="group size 128 does not divide a layer width of 576 .*32, 64"):
        quantize_int4(torch.randn(16, 576), 128)


# ---- the quantized linears: packed CPU kernels vs the dequantized reference --------------------


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_int8_linear_packed_matches_reference(dtype: torch.dtype) -> None:
    w, bias = torch.randn(96, 128) * 0.05, torch.randn(96) * 0.1
    w_int8, scales = quantize_int8(w)
    packed = Int8Linear(w_int8, scales, bias=bias, backend="packed")
    reference = Int8Linear(w_int8, scales, bias=bias, backend="reference")
    assert (packed.backend, reference.backend) == ("packed", "reference")
    x = torch.randn(2, 3, 128).to(dtype)
    expected = x.float() @ dequantize_int8(w_int8, scales).t() + bias
    torch.testing.assert_close(reference(x), expected.to(dtype))
    assert_matches_bf16_reference(packed(x).reshape(6, 96), x.reshape(6, 128),
                                  dequantize_int8(w_int8, scales.to(BF16)), bias)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_int4_linear_packed_matches_reference(group: int, dtype: torch.dtype) -> None:
    w = torch.randn(48, 256) * 0.05
    q, scales_and_zeros = quantize_int4(w, group)
    packed = Int4Linear(q, scales_and_zeros, backend="packed")
    reference = Int4Linear(q, scales_and_zeros, backend="reference")
    assert (packed.backend, packed.group, reference.backend) == ("packed", group, "reference")
    x = torch.randn(5, 256).to(dtype)
    torch.testing.assert_close(reference(x), (x.float() @ dequantize_int4(q, scales_and_zeros).t()).to(dtype))
    assert_matches_bf16_reference(packed(x), x, dequantize_int4(q, scales_and_zeros.to(BF16)), None)


@pytest.mark.parametrize("group", [32, 128])
def test_int4_prefill_rows_use_the_dequantized_weight_and_match_the_kernel(group: int) -> None:
    assert quant_linear.int4pack_layout_known()
    q, scales_and_zeros = quantize_int4(torch.randn(128, 256) * 0.05, group)
    packed = Int4Linear(q, scales_and_zeros, backend="packed")
    assert torch.equal(quant_linear.unpack_int4pack(packed.qweight, 128, 256), q.to(torch.uint8))
    torch.testing.assert_close(packed.dequantized().float(),
                               dequantize_int4(q, scales_and_zeros.to(BF16)).to(BF16).float())
    rows = quant_linear.INT4_DEQUANT_MIN_ROWS
    x = torch.randn(rows, 256).to(BF16)
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed.qweight, group, packed.scales_and_zeros)
    torch.testing.assert_close(packed(x), kernel, atol=2e-2, rtol=2e-2)  # bf16 rounding of the weight
    assert_matches_bf16_reference(packed(x), x, packed.dequantized(), None)


def test_shapes_the_packed_kernels_cannot_take_fall_back_to_reference() -> None:
    w = torch.randn(40, 72)  # int8: K % 16 != 0 (the kernel returns garbage); int4: N % 16 != 0
    int8 = Int8Linear(*quantize_int8(w))
    int4 = Int4Linear(*quantize_int4(torch.randn(40, 64), 32))
    assert (int8.backend, int4.backend) == ("reference", "reference")
    with pytest.raises(ValueError, match="packed"):
        Int8Linear(*quantize_int8(w), backend="packed")
    x = torch.randn(3, 72)
    torch.testing.assert_close(int8(x), x @ dequantize_int8(int8.w_int8, int8.scales).t())


def test_weight_bytes_counts_weight_scales_and_bias() -> None:
    q, scales_and_zeros = quantize_int4(torch.randn(32, 128), 32)
    int4 = Int4Linear(q, scales_and_zeros, bias=torch.zeros(32), backend="packed")
    # packed int4: two weights a byte; bf16 scale and zero per group; bf16 bias
    assert int4.weight_bytes() == 32 * 128 // 2 + (128 // 32) * 32 * 2 * 2 + 32 * 2
    int8 = Int8Linear(*quantize_int8(torch.randn(32, 128)), backend="reference")
    assert int8.weight_bytes() == 32 * 128 + 32 * 4  # int8 weights; fp32 scales on the reference path


@pytest.mark.slow
@pytest.mark.skipif(not cpu_vnni.available(), reason="needs an AVX-512 VNNI CPU and a C++ compiler")
def test_real_layers_on_picochats_cpu_kernel(real_tensors) -> None:
    down = real_tensors["blk.0.ffn_down.weight"]  # [576, 1536] Q4_1
    fast = linear_from_gguf([down])
    assert isinstance(fast, Int4Linear) and fast.backend == "vnni"
    # Q4_1's fp16 d and m are the kernel's own: the layout holds the GGUF weight exactly
    torch.testing.assert_close(cpu_vnni.dequantize_int4(fast.qweight, fast.d, fast.m), gguf_dequantize(down))
    x = torch.randn(4, 1536)
    expected = x @ gguf_dequantize(down).t()
    assert (fast(x) - expected).abs().max() <= 0.02 * expected.abs().max()  # int8 activations


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_triton_backend_matches_reference_on_cuda(mode: str) -> None:
    w, bias = torch.randn(96, 256, device="cuda") * 0.05, torch.randn(96, device="cuda") * 0.1
    if mode == "int8":
        fast, ref = (Int8Linear(*quantize_int8(w), bias=bias, backend=b) for b in ("auto", "reference"))
    else:
        fast, ref = (Int4Linear(*quantize_int4(w, 64), bias=bias, backend=b) for b in ("auto", "reference"))
    assert fast.backend == "triton"
    # the GEMV sums exact integers in fp32; more rows multiply weights dequantized to bf16
    for rows, atol in ((1, 1e-3), (37, 1e-2)):
        x = torch.randn(rows, 256, device="cuda", dtype=BF16)
        torch.testing.assert_close(fast(x), ref(x), rtol=2**-7, atol=atol)


# ---- GGUF blocks ------------------------------------------------------------------------------


def random_q4_0(n: int, k: int) -> GGUFQuantTensor:
    d = (torch.randn(n, k // 32, 1) * 0.01).half().view(torch.uint8)  # [N, K/32, 2]
    nibbles = torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8)
    return GGUFQuantTensor("Q4_0", torch.cat([d, nibbles], dim=-1), (n, k))


def gguf_dequantize(t: GGUFQuantTensor) -> torch.Tensor:
    qtype = gguf.GGMLQuantizationType[t.qtype]
    return torch.from_numpy(gguf.quants.dequantize(t.data.reshape(t.shape[0], -1).numpy(), qtype))


def test_q4_0_converts_exactly() -> None:
    t = random_q4_0(48, 96)
    q, scales_and_zeros = int4_from_gguf(t)
    assert scales_and_zeros.shape == (3, 48, 2) and bool((scales_and_zeros[..., 1] == 0).all())
    assert torch.equal(dequantize_int4(q, scales_and_zeros), gguf_dequantize(t))


def test_gguf_blocks_of_the_wrong_shape_or_type_are_load_errors() -> None:
    t = random_q4_0(16, 64)
    with pytest.raises(ModelLoadError, match="expected"):
        int4_from_gguf(GGUFQuantTensor("Q4_0", t.data[:, :1], (16, 64)))
    with pytest.raises(ModelLoadError, match="Q8_0"):
        int8_from_gguf_q8_0(t)
    q8 = GGUFQuantTensor("Q8_0", torch.zeros(16, 2, 34, dtype=torch.uint8), (16, 64))
    with pytest.raises(ModelLoadError, match="cannot build one quantized linear from GGUF types Q4_0, Q8_0"):
        linear_from_gguf([t, q8])


@pytest.fixture(scope="module")
def real_tensors(default_gguf_path: Path) -> dict[str, GGUFQuantTensor]:
    """A few raw tensors of the default model (most are Q4_1; token_embd is Q8_0)."""
    reader = open_gguf(default_gguf_path)
    wanted = {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight",
              "token_embd.weight"}
    out = {}
    for t in reader.tensors:
        if t.name in wanted:
            n, k = int(t.shape[1]), int(t.shape[0])
            data = torch.from_numpy(np.array(t.data)).reshape(n, k // 32, -1)
            out[t.name] = GGUFQuantTensor(t.tensor_type.name, data, (n, k))
    return out


@pytest.mark.slow
def test_q4_1_of_the_default_model_converts_within_float_rounding(real_tensors) -> None:
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        t = real_tensors[name]
        assert t.qtype == "Q4_1"
        q, scales_and_zeros = int4_from_gguf(t)
        ours, theirs = dequantize_int4(q, scales_and_zeros), gguf_dequantize(t)
        # (q − 8)·d + (m + 8d) vs d·q + m: a few fp32 roundings of terms up to |m| + 16|d|
        magnitude = scales_and_zeros[..., 1:2].abs() + 24 * scales_and_zeros[..., 0:1].abs()
        assert bool((group_view((ours - theirs).abs(), 32) <= 2**-21 * magnitude).all()), name
        assert not torch.equal(ours, torch.zeros_like(ours))


@pytest.mark.slow
def test_q8_0_requantization_error_is_bounded(real_tensors, monkeypatch) -> None:
    full = real_tensors["token_embd.weight"]
    assert full.qtype == "Q8_0"
    t = GGUFQuantTensor("Q8_0", full.data[:3000], (3000, full.shape[1]))
    monkeypatch.setattr(quant_gguf, "_REQUANT_CHUNK_ELEMENTS", 1000 * full.shape[1])  # three chunks
    w_int8, scales = int8_from_gguf_q8_0(t)
    exact = gguf_dequantize(t)
    err = (dequantize_int8(w_int8, scales) - exact).abs()
    assert bool((err <= scales[:, None] / 2 * (1 + FLOAT_SLACK)).all())
    w_direct, scales_direct = quantize_int8(exact)  # chunking changes nothing
    assert torch.equal(w_int8, w_direct) and torch.equal(scales, scales_direct)


@pytest.mark.slow
def test_real_layers_packed_match_reference(real_tensors) -> None:
    down = real_tensors["blk.0.ffn_down.weight"]  # [576, 1536] Q4_1
    packed = linear_from_gguf([down], backend="packed")
    assert isinstance(packed, Int4Linear) and packed.backend == "packed"
    q, scales_and_zeros = int4_from_gguf(down)
    x = torch.randn(4, 1536)
    assert_matches_bf16_reference(packed(x), x, dequantize_int4(q, scales_and_zeros.to(BF16)), None)

    w = gguf_dequantize(real_tensors["blk.0.attn_q.weight"])  # float weights → int8
    w_int8, scales = quantize_int8(w)
    x = torch.randn(4, 576, dtype=BF16)
    assert_matches_bf16_reference(Int8Linear(w_int8, scales, backend="packed")(x), x,
                                  dequantize_int8(w_int8, scales.to(BF16)), None)


@pytest.mark.slow
def test_fused_qkv_from_gguf_equals_the_three_projections(real_tensors) -> None:
    parts = [real_tensors[f"blk.0.attn_{p}.weight"] for p in "qkv"]
    bias = torch.randn(576 + 192 + 192)
    fused = linear_from_gguf(parts, bias=bias, backend="reference")
    assert (fused.in_features, fused.out_features) == (576, 960)
    x = torch.randn(3, 576)
    separate = torch.cat([x @ gguf_dequantize(t).t() for t in parts], dim=-1) + bias
    torch.testing.assert_close(fused(x), separate, rtol=1e-5, atol=1e-5)


# ---- model level: build without touching the model, then swap ---------------------------------


class TinyLayer(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv_proj = nn.Linear(hidden, 2 * hidden, bias=True)  # Qwen2-style qkv bias
        self.attn.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = nn.Linear(hidden, 2 * ffn, bias=False)
        self.mlp.down_proj = nn.Linear(ffn, hidden, bias=False)
        self.ffn = ffn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn.o_proj(torch.tanh(self.attn.qkv_proj(h)[..., : h.shape[-1]]))
        gate, up = self.mlp.gate_up_proj(h).split(self.ffn, dim=-1)
        return h + self.mlp.down_proj(torch.nn.functional.silu(gate) * up)


class TinyModel(nn.Module):
    """The transformer's linear names, a tied LM head, and one linear that is not quantized."""

    def __init__(self, hidden: int = 64, ffn: int = 128, vocab: int = 96, layers: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(TinyLayer(hidden, ffn) for _ in range(layers))
        self.router = nn.Linear(hidden, hidden)  # not a transformer linear: stays float
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h + self.router(h))


@pytest.mark.parametrize(("mode", "rel_tol"), [("int8", 0.02), ("int4", 0.15)])
def test_build_then_swap_quantizes_the_transformer_linears(mode: str, rel_tol: float) -> None:
    model = TinyModel()
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        before = model(ids)
    float_bytes = weight_bytes(model)
    calls: list[tuple[str, float]] = []
    replacements = build_quantized_linears(model, QuantConfig(mode=mode, quantize_lm_head=True),
                                           progress=lambda d, f: calls.append((d, f)))
    assert sorted(replacements) == sorted(
        [f"layers.{i}.{n}" for i in range(2) for n in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj",
                                                       "mlp.down_proj")] + ["lm_head", "embed_tokens"])
    assert all(isinstance(m, nn.Linear) for m in (model.lm_head, model.layers[0].attn.qkv_proj))  # untouched
    fractions = [f for _, f in calls]
    assert len(calls) == 10 and fractions == sorted(fractions) and fractions[-1] == 1.0
    # the tied embedding reads the int8 lm_head's rows
    lm_head = replacements["lm_head"]
    table = lm_head.rows(torch.arange(lm_head.out_features)).float() * lm_head.scales.float()[:, None]
    assert torch.equal(replacements["embed_tokens"](ids[0]).float(), table[ids[0]])

    previous = swap_linears(model, replacements)
    assert model.layers[1].mlp.down_proj is replacements["layers.1.mlp.down_proj"]
    assert isinstance(model.router, nn.Linear) and model.layers[0].attn.qkv_proj.bias is not None
    with torch.no_grad():
        after = model(ids)
        rel_err = ((after - before).norm() / before.norm()).item()
    assert 0 < rel_err < rel_tol
    assert weight_bytes(model) < float_bytes

    swap_linears(model, previous)  # switching back restores the float model exactly
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    assert weight_bytes(model) == float_bytes


def test_lm_head_is_int8_in_every_mode_unless_left_float_and_none_builds_nothing() -> None:
    model = TinyModel()
    assert isinstance(build_quantized_linears(model, QuantConfig(mode="int4"))["lm_head"], Int8Linear)
    assert "lm_head" not in build_quantized_linears(model, QuantConfig(mode="int8", quantize_lm_head=False))
    assert build_quantized_linears(model, QuantConfig(mode="none")) == {}


def test_weight_bytes_of_a_swapped_model() -> None:
    model = TinyModel()
    float_bytes = weight_bytes(model)
    assert float_bytes == sum(p.numel() * 4 for p in model.parameters())  # tied weight counted once
    replacements = build_quantized_linears(model, QuantConfig(mode="int8", quantize_lm_head=False), backend="packed")
    swap_linears(model, replacements)
    # each linear: fp32 weight (and bias) → int8 weight + bf16 scales (+ bf16 bias)
    linears = [(128, 64, True), (64, 64, False), (256, 64, False), (64, 128, False)]  # (N, K, bias) per layer
    saved = sum(n * k * 4 + bias * n * 4 - (n * k + n * 2 + bias * n * 2) for n, k, bias in linears)
    assert weight_bytes(model) == float_bytes - 2 * saved


def test_swap_with_an_unknown_name_changes_nothing() -> None:
    model = TinyModel()
    replacements = build_quantized_linears(model, QuantConfig(mode="int8"))
    replacements["layers.0.attn.nope"] = nn.Identity()
    with pytest.raises(AttributeError, match="nope"):
        swap_linears(model, replacements)
    assert isinstance(model.layers[0].attn.qkv_proj, nn.Linear)


def test_int4_group_that_does_not_fit_the_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="group size 128 does not divide a layer width of 64"):
        build_quantized_linears(TinyModel(), QuantConfig(mode="int4", group_size=128))
