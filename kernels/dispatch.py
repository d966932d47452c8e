"""Chooses the implementation of each kernel: Triton on CUDA, torch elsewhere; overridable.

Backends for attention: ``triton`` (CUDA only), ``sdpa`` (torch SDPA per sequence, the fast CPU
path), ``reference`` (plain fp32 math). ``auto`` picks triton on CUDA when triton imports, else
sdpa. Tests and the palette override with :func:`set_attention_backend`.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from picochat.kernels import reference

AttentionFn = Callable[..., torch.Tensor]
BACKENDS = ("auto", "triton", "sdpa", "reference")

_attention_override: str | None = None


def triton_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """The backend ``name`` means on ``device``; raises ValueError for an impossible choice."""
    name = _attention_override or name
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "sdpa"
    if name == "triton" and not (device.type == "cuda" and triton_available()):
        raise ValueError("attention backend 'triton' needs a CUDA GPU with triton installed")
    return name


def set_attention_backend(name: str | None) -> None:
    """Force a backend everywhere (tests); None removes the override."""
    global _attention_override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    _attention_override = name


def attention_fn(backend: str) -> AttentionFn:
    """paged attention ``f(q, k_cache, v_cache, meta, scale, sliding_window) -> out``."""
    if backend == "reference":
        return reference.paged_attention_reference
    if backend == "sdpa":
        return reference.paged_attention_sdpa
    if backend == "triton":
        from picochat.kernels import triton_attention
        return triton_attention.paged_attention
    raise ValueError(f"unknown attention backend {backend!r}")
