"""Kernel tests run the Triton kernels against their torch twins: compiled on a CUDA box, in
triton's interpreter (CPU tensors) everywhere else. The interpreter switch is read when
``@triton.jit`` decorates, so it is set here, before any test module imports a kernel module."""

import os
import sys

import torch

if not torch.cuda.is_available():
    early = sorted(m for m in sys.modules if m.startswith("picochat.kernels.triton_"))
    if early and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{', '.join(early)} imported before tests/kernels/conftest.py could set "
                           "TRITON_INTERPRET=1; set it in the environment to run these tests")
    os.environ["TRITON_INTERPRET"] = "1"
