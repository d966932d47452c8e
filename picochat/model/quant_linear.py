"""``Int8Linear`` and ``Int4Linear``: drop-in ``nn.Linear`` replacements over the quant formats.

Each module is built on its target device and picks a backend once, which fixes how it stores the
weight (so a module is not moved between devices afterwards — build a new one):

- ``packed`` (CPU): torch's packed kernels, ``_weight_int8pack_mm`` and
  ``_weight_int4pack_mm_for_cpu``. Both are fast only with bf16 activations, so inputs are cast to
  bf16, scales (and bias) are stored in bf16, and the output is cast back to the input's dtype.
  Measured here (batch 1, the default model's four linears × 30 layers): fp32 inputs cast to bf16
  cost ~6.2 ms a pass vs ~6.0 ms for bf16 inputs, for int8 and int4 alike; feeding fp32 to the
  kernels directly would cost ~89 ms (int8) and ~181 ms (int4).
  The int8 kernel needs K % 16 == 0 (it returns garbage otherwise) and the int4 pack needs
  N % 16 == 0; ``auto`` falls back to ``reference`` for such shapes.
- ``triton`` (CUDA): ``picochat.kernels.dispatch.int8_matmul(x, w_int8, scales)`` /
  ``int4_matmul(x, q, scales_and_zeros, group)`` (x ``[M, K]`` → ``[M, N]`` in x's dtype), used
  when dispatch provides them and triton is available; looked up lazily.
- ``reference``: dequantize to fp32, then ``F.linear`` — the exact math, for tests and as the
  fallback anywhere else.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from picochat.model.quant_formats import check_int4_shape, dequantize_int4, dequantize_int8

Backend = Literal["auto", "packed", "reference", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "packed", "reference", "triton")
_INT4_INNER_K_TILES = 2  # an argument of torch's int4 pack; no effect on CPU


def _triton_kernel(name: str) -> Callable[..., torch.Tensor] | None:
    """``picochat.kernels.dispatch.<name>`` when dispatch has it and triton can run, else None."""
    from picochat.kernels import dispatch

    kernel = getattr(dispatch, name, None)
    return kernel if kernel is not None and dispatch.triton_available() else None


def _resolve_backend(requested: Backend, device: torch.device, packed_fits: bool, kernel: str) -> Backend:
    """The backend a module on ``device`` uses; ValueError for an impossible explicit choice."""
    if requested not in BACKENDS:
        raise ValueError(f"quant backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    can_pack = device.type == "cpu" and packed_fits
    can_triton = device.type == "cuda" and _triton_kernel(kernel) is not None
    if requested == "auto":
        return "packed" if can_pack else "triton" if can_triton else "reference"
    if requested == "packed" and not can_pack:
        raise ValueError(f"quant backend 'packed' needs a CPU tensor of a supported shape ({kernel})")
    if requested == "triton" and not can_triton:
        raise ValueError(f"quant backend 'triton' needs CUDA, triton and dispatch.{kernel}")
    return requested


class QuantLinear(nn.Module):
    """What both quantized linears share: ``[..., K]`` → ``[..., N]`` in x's dtype, optional bias."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, backend: Backend,
                 device: torch.device) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        # the dtype the matmul produces, in which scales and bias are stored
        self.compute_dtype = torch.bfloat16 if backend == "packed" else torch.float32
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} for {out_features} outputs")
        bias = None if bias is None else bias.detach().to(device=device, dtype=self.compute_dtype)
        self.register_buffer("bias", bias)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` → ``[M, N]`` (no bias) in the backend's output dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.reshape(-1, self.in_features))  # [M, N]
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
        resolved = _resolve_backend(backend, w_int8.device, packed_fits=k % 16 == 0, kernel="int8_matmul")
        super().__init__(k, n, bias, resolved, w_int8.device)
        self.register_buffer("w_int8", w_int8.contiguous())  # [N, K]
        self.register_buffer("scales", scales.to(self.compute_dtype).contiguous())  # [N]
        self._triton = _triton_kernel("int8_matmul") if resolved == "triton" else None

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "packed":
            return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.w_int8, self.scales)
        if self._triton is not None:
            return self._triton(x, self.w_int8, self.scales)
        return F.linear(x.float(), dequantize_int8(self.w_int8, self.scales))


class Int4Linear(QuantLinear):
    """A linear over int4 weights with a scale and zero per group of K."""

    def __init__(self, q: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: Backend = "auto") -> None:
        n, k = q.shape
        n_groups = scales_and_zeros.shape[0]
        if n_groups == 0 or k % n_groups or tuple(scales_and_zeros.shape) != (n_groups, n, 2):
            raise ValueError(f"int4 weight [N, K] = {(n, k)} needs scales_and_zeros [K // group, N, 2], "
                             f"got {tuple(scales_and_zeros.shape)}")
        check_int4_shape(n, k, k // n_groups)
        resolved = _resolve_backend(backend, q.device, packed_fits=n % 16 == 0, kernel="int4_matmul")
        super().__init__(k, n, bias, resolved, q.device)
        self.group = k // n_groups
        if resolved == "packed":
            qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), _INT4_INNER_K_TILES)
        else:
            qweight = q.to(torch.uint8).contiguous()
        self.register_buffer("qweight", qweight)  # packed: torch's CPU layout; else q [N, K] 0..15
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(self.compute_dtype).contiguous())
        self._triton = _triton_kernel("int4_matmul") if resolved == "triton" else None

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "packed":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16), self.qweight, self.group, self.scales_and_zeros)
        if self._triton is not None:
            return self._triton(x, self.qweight, self.scales_and_zeros, self.group)
        return F.linear(x.float(), dequantize_int4(self.qweight, self.scales_and_zeros))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}"
