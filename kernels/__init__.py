"""picochat's compute kernels: Triton kernels for CUDA, their torch reference twins for the CPU,
and ``dispatch`` choosing between them. Installed as ``picochat.kernels`` (the folder is
``kernels/``). Importing this package never imports triton."""
