"""``Int8Linear`` and ``Int4Linear``: drop-in ``nn.Linear`` replacements over the quant formats;
``Int8Embedding``: a tied model's embedding read from its int8 lm_head.

Each module is built on its target device and picks a backend once, which fixes how it stores the
weight (so a module is not moved between devices afterwards — build a new one). ``auto`` asks
``picochat.kernels.dispatch.resolve_kernel_backend``: ``triton`` there means ``triton`` here,
``torch`` means, on the CPU, ``vnni`` where picochat's own kernels are available and take the
shape, else ``packed`` (``reference`` for shapes the packed kernels cannot take), and
``reference`` elsewhere.

- ``vnni`` (CPU): ``kernels/cpu_vnni.cpp`` (see ``picochat.kernels.cpu_vnni``): x rounded to int8
  per group of 32, exact integer dot products; N % 16 == 0, K % 32 == 0 and, for int4, group % 32
  == 0. int4 keeps fp16 ``d`` and ``m`` per group of 32 (a larger group repeated), int8 its fp32
  scales. Rounding: that of x to int8 (~0.5-1 % of the output's scale on random inputs) and, for
  int4, of the scales to fp16.

- ``packed`` (CPU): torch's ``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu``. Both are
  fast only with bf16 activations, so inputs are cast to bf16, scales and bias are stored in bf16,
  and the output is cast back to the input's dtype. Measured here (batch 1, the default model's
  four linears × 30 layers): fp32 inputs cast to bf16 cost ~6.2 ms a pass vs ~6.0 ms for bf16
  inputs, int8 and int4 alike; fp32 fed to the kernels directly would cost ~89 ms (int8) and
  ~181 ms (int4). The int8 kernel needs K % 16 == 0 (it returns garbage otherwise), the int4
  pack N % 16 == 0. Rounding: that of x to bf16, of the scales to bf16 and of the output; the
  sums run in fp32 (int8 applies its scale after the sum, int4 dequantizes in fp32).
- ``triton`` (CUDA): ``kernels/triton_quant_matmul.py`` (imported lazily), int4 weights stored as
  ``quant_reference.pack_int4`` nibbles, fp32 scales.
- ``reference``: the fp32 twins in ``kernels/quant_reference.py`` — for tests, and the fallback.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from picochat.kernels import cpu_vnni, dispatch, quant_reference
from picochat.model.quant_formats import check_int4_group

Backend = Literal["auto", "vnni", "packed", "reference", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "vnni", "packed", "reference", "triton")
_INT4_INNER_K_TILES = 2  # an argument of torch's CPU int4 pack; no effect on CPU
# From this many rows (a prefill chunk) the int4 kernel, which dequantizes per row tile, loses to
# dequantizing the weight once and a bf16 matmul: for the default model's 512-token prefill the
# int4 kernel took 1.19 s of linears, a bf16 matmul 0.27 s plus ~0.3 s of dequantization.
INT4_DEQUANT_MIN_ROWS = 192
# The same crossover for picochat's kernel, whose one-pass dequantization to bf16 is ~15x torch's:
# the default model's int4 linears took 35 / 76 / 152 ms on the kernel at 32 / 64 / 128 rows and
# 56 / 73 / 92 ms dequantized into a bf16 matmul (one process, alternating).
VNNI_INT4_DEQUANT_MIN_ROWS = 64
_PACK_ROWS = 64  # torch's CPU int4 pack: per 64 rows, byte j of column k holds rows j and j + 32


def unpack_int4pack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``uint8 [N, K]`` values 0..15 from torch's CPU int4pack layout (N a multiple of 64)."""
    blocks = packed.view(n // _PACK_ROWS, k, _PACK_ROWS // 2)
    halves = torch.stack([blocks & 15, blocks >> 4], dim=1)  # [N / 64, 2, K, 32]
    return halves.transpose(2, 3).reshape(n, k)


@functools.cache
def int4pack_layout_known() -> bool:
    """Whether this torch build packs int4 as :func:`unpack_int4pack` reads it (checked once)."""
    q = torch.randint(0, 16, (2 * _PACK_ROWS, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INT4_INNER_K_TILES)
    return tuple(packed.shape) == (2 * _PACK_ROWS, 32) and torch.equal(unpack_int4pack(packed, *q.shape).int(), q)


def _resolve_backend(requested: Backend, device: torch.device, packed_fits: bool,
                     vnni_fits: bool = False) -> Backend:
    """The backend a module on ``device`` uses; ValueError for an impossible explicit choice."""
    if requested not in BACKENDS:
        raise ValueError(f"quant backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    can_pack = device.type == "cpu" and packed_fits
    can_vnni = (requested in ("auto", "vnni") and device.type == "cpu" and vnni_fits
                and cpu_vnni.available())  # builds the kernels on first use
    if requested == "auto":
        if dispatch.resolve_kernel_backend(device) == "triton":
            return "triton"
        return "vnni" if can_vnni else "packed" if can_pack else "reference"
    if requested == "vnni" and not can_vnni:
        raise ValueError("quant backend 'vnni' needs a CPU weight with N % 16 == 0 and K (int4: group) % 32 == 0, "
                         "and picochat's CPU kernels (an AVX-512 VNNI CPU and a C++ compiler)")
    if requested == "packed" and not can_pack:
        raise ValueError("quant backend 'packed' needs a CPU weight of a shape torch's kernel takes")
    if requested == "triton" and not (device.type == "cuda" and dispatch.triton_available()):
        raise ValueError("quant backend 'triton' needs a CUDA GPU with triton installed")
    return requested


class QuantLinear(nn.Module):
    """What both quantized linears share: ``[..., K]`` → ``[..., N]`` in x's dtype, optional bias."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, backend: Backend,
                 device: torch.device) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        # scales and bias are stored in the dtype the backend computes them in
        self.param_dtype = torch.bfloat16 if backend == "packed" else torch.float32
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} for {out_features} outputs")
        bias = None if bias is None else bias.detach().to(device=device, dtype=self.param_dtype)
        self.register_buffer("bias", bias)
        # triton / reference: f(x [..., K], weights…, bias) -> [..., N] in x's dtype
        self._linear: Callable[..., torch.Tensor] | None = None

    def _packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` → ``[M, N]`` (no bias) on a CPU kernel, in the kernel's output dtype (torch's
        packed ones compute in bf16, ``vnni`` takes x as it comes and gives fp32)."""
        raise NotImplementedError

    def _weight_args(self) -> tuple:
        """The arguments between x and bias of the triton / reference linear."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._linear is not None:
            return self._linear(x, *self._weight_args(), self.bias)
        y = self._packed_matmul(x.reshape(-1, self.in_features))  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        """Bytes held by the quantized weight, its scales and the bias."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend}")


class Int8Linear(QuantLinear):
    """A linear over int8 weights with one scale per output channel."""

    def __init__(self, w_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: Backend = "auto") -> None:
        n, k = w_int8.shape
        if w_int8.dtype != torch.int8 or tuple(scales.shape) != (n,):
            raise ValueError(f"int8 weight needs int8 [N, K] and scales [N], got {w_int8.dtype} "
                             f"{tuple(w_int8.shape)} and {tuple(scales.shape)}")
        resolved = _resolve_backend(backend, w_int8.device, packed_fits=k % 16 == 0,
                                    vnni_fits=n % cpu_vnni.ROWS == 0 and k % cpu_vnni.GROUP == 0)
        super().__init__(k, n, bias, resolved, w_int8.device)
        self.register_buffer("scales", scales.to(self.param_dtype).contiguous())  # [N]
        if resolved == "vnni":  # picochat's CPU layout: blocks of 16 rows, uint8 w + 128
            self.register_buffer("w_vnni", cpu_vnni.pack_int8(w_int8))
            return
        self.register_buffer("w_int8", w_int8.contiguous())  # [N, K]
        if resolved == "triton":
            from picochat.kernels.triton_quant_matmul import int8_linear
            self._linear = int8_linear
        elif resolved == "reference":
            self._linear = quant_reference.int8_linear_reference

    def _packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "vnni":
            return cpu_vnni.int8_mm(x, self.w_vnni, self.scales)
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.w_int8, self.scales)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The int8 weight's rows ``ids`` (any shape): ``[*ids.shape, K]``."""
        return cpu_vnni.int8_rows(self.w_vnni, ids) if self.backend == "vnni" else self.w_int8[ids]

    def _weight_args(self) -> tuple:
        return self.w_int8, self.scales


class Int4Linear(QuantLinear):
    """A linear over int4 weights with a scale and zero per group of K."""

    def __init__(self, q: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: Backend = "auto") -> None:
        n, k = q.shape
        n_groups = scales_and_zeros.shape[0]
        if n_groups == 0 or k % n_groups or tuple(scales_and_zeros.shape) != (n_groups, n, 2):
            raise ValueError(f"int4 weight [N, K] = {(n, k)} needs scales_and_zeros [K // group, N, 2], "
                             f"got {tuple(scales_and_zeros.shape)}")
        check_int4_group(k, k // n_groups)
        self.group = k // n_groups
        resolved = _resolve_backend(backend, q.device, packed_fits=n % 16 == 0,
                                    vnni_fits=n % cpu_vnni.ROWS == 0 and self.group % cpu_vnni.GROUP == 0)
        super().__init__(k, n, bias, resolved, q.device)
        if resolved == "vnni":  # picochat's CPU layout: no scales_and_zeros, fp16 d and m instead
            qweight, d, m = cpu_vnni.pack_int4(q, scales_and_zeros)
            self.register_buffer("qweight", qweight)
            self.register_buffer("d", d)
            self.register_buffer("m", m)
            return
        if resolved == "packed":  # torch's CPU layout
            qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.to(torch.int32), _INT4_INNER_K_TILES)
        elif resolved == "triton":  # [N, K // 2], two nibbles a byte
            from picochat.kernels.triton_quant_matmul import int4_linear
            qweight, self._linear = quant_reference.pack_int4(q), int4_linear
        else:  # q [N, K] uint8 0..15
            qweight, self._linear = q.to(torch.uint8).contiguous(), quant_reference.int4_linear_reference
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(self.param_dtype).contiguous())

    def _packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "vnni":
            if x.shape[0] >= VNNI_INT4_DEQUANT_MIN_ROWS:
                return F.linear(x.to(torch.bfloat16), self.dequantized())
            return cpu_vnni.int4_mm(x, self.qweight, self.d, self.m)
        x = x.to(torch.bfloat16)
        if (x.shape[0] >= INT4_DEQUANT_MIN_ROWS and self.out_features % _PACK_ROWS == 0
                and int4pack_layout_known()):
            return F.linear(x, self.dequantized())
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group, self.scales_and_zeros)

    def dequantized(self) -> torch.Tensor:
        """The weight ``[N, K]`` in bf16, ``(q - 8) * scale + zero`` computed in fp32 as the kernel does."""
        if self.backend == "vnni":
            return cpu_vnni.int4_dequantize_bf16(self.qweight, self.d, self.m)
        n, k = self.out_features, self.in_features
        q = unpack_int4pack(self.qweight, n, k).view(n, k // self.group, self.group)
        scales, zeros = self.scales_and_zeros.float().permute(2, 1, 0)[..., None]  # [N, K / group, 1] each
        return torch.addcmul(zeros, q.float() - 8, scales).to(torch.bfloat16).reshape(n, k)

    def _weight_args(self) -> tuple:
        return self.qweight, self.scales_and_zeros, self.group

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}"


class Int8Embedding(nn.Module):
    """The token embedding of a tied model read from its int8 lm_head, so the table is held once:
    row ``i`` is ``w_int8[i] * scales[i]``, in ``dtype``."""

    def __init__(self, lm_head: Int8Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.lm_head.rows(ids).to(self.dtype)
        return rows * self.lm_head.scales[ids].to(self.dtype).unsqueeze(-1)
