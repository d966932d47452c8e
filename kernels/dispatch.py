"""Chooses the implementation of each kernel: Triton on CUDA, torch elsewhere; overridable.

Backends for attention: ``triton`` (CUDA only), ``sdpa`` (torch SDPA per sequence, the fast CPU
path), ``reference`` (plain fp32 math). ``auto`` picks triton on CUDA when triton imports, else
sdpa. Tests and the palette override with :func:`set_attention_backend`.

Norms, RoPE and the quantized matmuls have two backends, ``triton`` (CUDA only) and ``torch`` (the
reference twins; on a CPU where picochat's C++ kernels load, the norm is their op);
:func:`resolve_kernel_backend` picks one per device, tests override it with
:func:`set_kernel_backend`. The quantized matmuls store their weights differently per backend
(``quant_reference.pack_int4`` for Triton, torch's int4pack on the CPU), so the quantization code
picks its backend once, when it packs the weights, and then calls :func:`int8_matmul` /
:func:`int4_matmul` (Triton only) or its own CPU kernels.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable

import torch

from picochat.kernels import reference

AttentionFn = Callable[..., torch.Tensor]
BACKENDS = ("auto", "triton", "sdpa", "reference")

KERNEL_BACKENDS = ("auto", "triton", "torch")

_attention_override: str | None = None
_kernel_override: str | None = None


def triton_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def _check(kind: str, name: str, choices: tuple[str, ...]) -> None:
    if name not in choices:
        raise ValueError(f"{kind} backend must be one of {', '.join(choices)}, got {name!r}")


def _resolve(kind: str, name: str, choices: tuple[str, ...], cpu_default: str, device: torch.device) -> str:
    """``auto`` → triton on a CUDA device with triton, else ``cpu_default``; ValueError for an
    unknown name or triton where it cannot run."""
    _check(kind, name, choices)
    on_gpu = device.type == "cuda" and triton_available()
    if name == "auto":
        return "triton" if on_gpu else cpu_default
    if name == "triton" and not on_gpu:
        raise ValueError(f"{kind} backend 'triton' needs a CUDA GPU with triton installed")
    return name


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """The backend ``name`` means on ``device``; raises ValueError for an impossible choice."""
    return _resolve("attention", _attention_override or name, BACKENDS, "sdpa", device)


def set_attention_backend(name: str | None) -> None:
    """Force a backend everywhere (tests); None removes the override."""
    global _attention_override
    if name is not None:
        _check("attention", name, BACKENDS)
    _attention_override = name


def attention_fn(backend: str, device: torch.device) -> AttentionFn:
    """paged attention ``f(q, k_cache, v_cache, meta, scale, sliding_window) -> out``. On a CPU
    with picochat's bf16 attention kernel, the sdpa backend's bf16 prefill chunks take it."""
    if backend == "reference":
        return reference.paged_attention_reference
    if backend == "sdpa":
        from picochat.kernels import cpu_vnni

        if device.type == "cpu" and cpu_vnni.bf16_attention_available():
            return functools.partial(reference.paged_attention_sdpa, chunk_kernel=cpu_vnni.prefill_attention)
        return reference.paged_attention_sdpa
    if backend == "triton":
        from picochat.kernels import triton_attention
        return triton_attention.paged_attention
    raise ValueError(f"unknown attention backend {backend!r}")


def decode_attention_fn(backend: str, device: torch.device) -> AttentionFn | None:
    """attention over a decode-only step ``f(q, k_cache, v_cache, decode_meta, scale) -> out``, or
    None where the backend serves decode rows through its general varlen kernel. On a CPU with
    picochat's kernels (``cpu_vnni``) the sdpa backend takes their one-pass decode attention."""
    if backend != "sdpa":
        return None
    from picochat.kernels import cpu_vnni

    if device.type == "cpu" and cpu_vnni.available():
        return cpu_vnni.decode_attention
    return reference.decode_attention


def resolve_kernel_backend(device: torch.device) -> str:
    """``triton`` or ``torch`` for the norm, RoPE and quantized matmul kernels on ``device``."""
    return _resolve("kernel", _kernel_override or "auto", KERNEL_BACKENDS, "torch", device)


def set_kernel_backend(name: str | None) -> None:
    """Force the norm / RoPE / quantized matmul backend everywhere (tests); None removes it."""
    global _kernel_override
    if name is not None:
        _check("kernel", name, KERNEL_BACKENDS)
    _kernel_override = name


def rms_norm_fn(device: torch.device) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``f(x, weight, eps, residual=None) -> (normed, new_residual)``; on a CPU with picochat's
    kernels, their op for bf16 / fp16 rows."""
    if resolve_kernel_backend(device) == "triton":
        from picochat.kernels import triton_norm_rope
        return triton_norm_rope.rms_norm
    from picochat.kernels import cpu_vnni

    if device.type == "cpu" and cpu_vnni.available():
        return cpu_vnni.rms_norm
    return reference.rms_norm


def rope_fn(device: torch.device) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``f(q, k, positions, cos_sin) -> (q_rotated, k_rotated)``."""
    if resolve_kernel_backend(device) == "triton":
        from picochat.kernels import triton_norm_rope
        return triton_norm_rope.apply_rope
    return reference.apply_rope


def int8_matmul(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton (CUDA) ``x [..., K] @ (w_int8 [N, K] * scales[:, None]).T (+ bias)`` in x's dtype."""
    from picochat.kernels import triton_quant_matmul
    return triton_quant_matmul.int8_linear(x, w_int8, scales, bias)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton (CUDA) int4 matmul over ``packed = quant_reference.pack_int4(q)`` [N, K // 2] uint8."""
    from picochat.kernels import triton_quant_matmul
    return triton_quant_matmul.int4_linear(x, packed, scales_and_zeros, group, bias)
