"""picochat's compute kernels: Triton kernels for CUDA, their torch reference twins for the CPU,
picochat's own C++ int4 matmul for AVX-512 VNNI CPUs (``cpu_int4``), and ``dispatch`` choosing
between them. Installed as ``picochat.kernels`` (the folder is ``kernels/``). Importing this
package never imports triton and never builds the C++ kernel."""
