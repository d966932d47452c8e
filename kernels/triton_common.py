"""What every Triton kernel module here shares: the interpreter switch and the dot precision."""

from __future__ import annotations

import os

import torch

# Read at import, the moment triton reads it for the @triton.jit decorators below it. The
# interpreter multiplies bf16 dot operands as raw bits (triton-lang/triton#11584), so under it
# the kernels run every tl.dot on fp32 operands.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for tl.dot: fp32 stays fp32 (tf32 would break greedy equality with the
    CPU path); for fp16/bf16 operands the choice is moot."""
    return "ieee" if dtype == torch.float32 or INTERPRET else "tf32"
