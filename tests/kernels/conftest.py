"""Kernel tests run the Triton kernels against their torch twins: compiled on a CUDA box, in
triton's interpreter (CPU tensors) everywhere else. The interpreter switch is read when
``@triton.jit`` decorates, so it is set here, before any test module imports a kernel module."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
