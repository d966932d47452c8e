"""picochat's own CPU kernels (``cpu_vnni.cpp``: int4 and int8 matmuls; ``cpu_attention.cpp``:
decode and bf16 prefill attention; ``cpu_norm.cpp``: RMSNorm of bf16 / fp16 rows; ``cpu_simd.h``:
their shared AVX-512 helpers): building them, their weight layouts, their ops.

torch's ``_weight_int4pack_mm_for_cpu`` reads the default model's int4 linears at ~7.7 GB/s on the
2-core test host, where a plain read of the same bytes runs at ~14 GB/s, and its time grows with
the number of rows (8 rows cost 3x one row); its int8 kernel costs ~3x more at 8 rows than at one.
The AVX-512 VNNI kernels round x to int8 per group of 32 and sum exact integer products, as
llama.cpp does. Measured there, one process, alternating: the default model's 120 int4 linears
took 5.6-6.9 ms a pass at 1 row and ~12 ms at 8 rows against 7.0-8.1 and 24-27 ms on torch's
kernel; its int8 lm_head 2.6-2.8 ms at 1 row and 4.6-9.9 ms at 8 rows against 3.4-4.7 and 19-21 ms.
A third op dequantizes int4 to bf16 in one pass (~15x torch's unpacking) for prefill chunks; a
fourth is the decode-only step's attention (``decode_attention``, what ``dispatch`` picks for the
CPU's sdpa backend where these kernels load); a fifth is causal flash attention of bf16 prefill
chunks on AVX512-BF16 dot products (``prefill_attention``, ~6x torch's CPU flash kernel on a
512-token prompt), compiled for that instruction set alone and used only where the CPU reports
``avx512_bf16``; the last is RMSNorm (``rms_norm``), which the eager forward and the compiled
decode step share so that both sum each row alike (inductor's own sums made the compiled step's
greedy tokens part from the eager step's).

The extension is compiled once per torch version and source (~25 s) into the user cache dir, on
first use, and only on a CPU that reports ``avx512f``, ``avx512bw``, ``avx512_vnni`` and ``f16c``.
:func:`available` says whether it is loaded; every failure (no compiler, no such CPU,
``PICOCHAT_CPU_KERNELS=0``) leaves it False and torch's kernel serving, logged once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from picochat.kernels.reference import DecodeMetadata

log = logging.getLogger("picochat.kernels")

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_vnni.cpp", "cpu_attention.cpp", "cpu_norm.cpp")]
HEADER = Path(__file__).with_name("cpu_simd.h")
ROWS = 16  # output rows a block of the packed layout
GROUP = 32  # weights a quantization group in the packed layout
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni", "f16c", "fma")
# -fopenmp: at::parallel_for is an OpenMP pragma in a header (serial without it); the process
# then shares torch's libgomp (same soname), as inductor's kernels do
_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@functools.cache
def available() -> bool:
    """Whether the ``torch.ops.picochat_cpu`` matmuls are loaded (builds them the first time)."""
    if os.environ.get("PICOCHAT_CPU_KERNELS", "1") == "0":
        return False
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        log.info("picochat's CPU kernels need %s; using torch's", ", ".join(missing))
        return False
    try:
        _build()
    except Exception as e:  # no compiler, no ninja, a header mismatch…: torch's kernel serves
        log.warning("could not build picochat's CPU kernels (%s: %s); using torch's", type(e).__name__, e)
        return False
    return True


def bf16_attention_available() -> bool:
    """Whether :func:`prefill_attention` runs: the kernels are loaded and the CPU has AVX512-BF16."""
    return available() and "avx512_bf16" in _cpu_flags()


def _build() -> None:
    from picochat.config import cache_dir

    text = b"".join(path.read_bytes() for path in [*SOURCES, HEADER])
    digest = hashlib.sha256(text + " ".join(_FLAGS).encode()).hexdigest()[:12]
    build_dir = cache_dir() / "kernels" / f"cpu_vnni-torch{torch.__version__}-{digest}"
    built = build_dir / "picochat_cpu_vnni.so"
    if built.exists():  # the directory names these sources, these flags and this torch: load it as is
        try:
            torch.ops.load_library(str(built))
            return _register_fakes()
        except OSError as e:  # a build cut short: build again
            log.warning("rebuilding picochat's CPU kernels (%s)", e)
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="picochat_cpu_vnni", sources=[str(path) for path in SOURCES], extra_cflags=_FLAGS,
                       extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False)
    _register_fakes()


def _register_fakes() -> None:
    """Output shapes for torch.compile's tracing."""
    @torch.library.register_fake("picochat_cpu::int4_mm")
    def _(x, q, d, m):
        return x.new_empty((x.shape[0], q.shape[0] * ROWS), dtype=torch.float32)

    @torch.library.register_fake("picochat_cpu::int8_mm")
    def _(x, w, s):
        return x.new_empty((x.shape[0], w.shape[0] * ROWS), dtype=torch.float32)

    @torch.library.register_fake("picochat_cpu::decode_attention")
    def _(q, k_cache, v_cache, context_slots, bias, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("picochat_cpu::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("picochat_cpu::add_rms_norm")
    def _(x, residual, weight, eps):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(x, memory_format=torch.contiguous_format))

    @torch.library.register_fake("picochat_cpu::prefill_attention")
    def _(q, k, v, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)


def pack_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's ``(q, d, m)`` of an int4 weight in the reference format (``q [N, K]`` in 0..15,
    ``scales_and_zeros [K // g, N, 2]`` with ``w = (q - 8) * scale + zero``; ``N % 16 == 0`` and
    ``g % 32 == 0``): ``w = q * d + m`` with ``d = scale`` and ``m = zero - 8 * scale`` in fp16,
    a group of g repeated as g / 32 groups of 32."""
    n, k = q.shape
    blocks, groups = n // ROWS, k // GROUP
    # [N, K] -> [blocks, row, group, v, half, b]: weight 8v + 4·half + b of the row's group
    nibbles = q.to(torch.uint8).view(blocks, ROWS, groups, 4, 2, 4)
    packed = nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)  # [blocks, row, group, v, b]
    packed = packed.permute(0, 2, 3, 1, 4).reshape(blocks, groups, 256).contiguous()
    repeat = groups // scales_and_zeros.shape[0]
    scale, zero = scales_and_zeros.float().repeat_interleave(repeat, dim=0).unbind(-1)  # [groups, N] each

    def blocked(t: torch.Tensor) -> torch.Tensor:  # [groups, N] -> fp16 [blocks, groups, 16]
        return t.T.reshape(blocks, ROWS, groups).transpose(1, 2).to(torch.float16).contiguous()

    return packed, blocked(scale), blocked(zero - 8 * scale)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``q [N, K]`` uint8 in 0..15 back from :func:`pack_int4`'s layout."""
    blocks, groups, _ = packed.shape
    b = packed.view(blocks, groups, 4, ROWS, 4).permute(0, 3, 1, 2, 4)  # [blocks, row, group, v, b]
    nibbles = torch.stack([b & 15, b >> 4], dim=-2)  # [blocks, row, group, v, half, b]
    return nibbles.reshape(blocks * ROWS, groups * GROUP)


def int4_dequantize_bf16(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """:func:`dequantize_int4` rounded to bf16, in one pass of the kernel (for prefill chunks)."""
    return torch.ops.picochat_cpu.int4_dequantize(packed, d, m)


def dequantize_int4(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` that :func:`pack_int4`'s layout holds."""
    q = unpack_int4(packed).float().view(-1, d.shape[1], GROUP)

    def per_row(t: torch.Tensor) -> torch.Tensor:  # fp16 [blocks, groups, 16] -> [N, groups, 1]
        return t.float().transpose(1, 2).reshape(-1, d.shape[1], 1)

    return torch.addcmul(per_row(m), q, per_row(d)).reshape(q.shape[0], -1)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """fp32 ``[M, N]`` = ``x [M, K]`` @ the packed weight's transpose (x quantized to int8 per group)."""
    return torch.ops.picochat_cpu.int4_mm(x, packed, d, m)


def pack_int8(w_int8: torch.Tensor) -> torch.Tensor:
    """The kernel's layout of an int8 weight ``[N, K]`` (``N % 16 == 0``, ``K % 32 == 0``): uint8
    ``w + 128`` in ``[N / 16, K / 32, 512]``, byte ``64v + 4·row + b`` of a group being weight
    ``4v + b`` of that row."""
    n, k = w_int8.shape
    u8 = (w_int8.view(torch.uint8) ^ 0x80).view(n // ROWS, ROWS, k // GROUP, 8, 4)  # [blocks, row, group, v, b]
    return u8.permute(0, 2, 3, 1, 4).reshape(n // ROWS, k // GROUP, 512).contiguous()


def int8_rows(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (any shape) of the int8 weight in :func:`pack_int8`'s layout: ``[*ids.shape, K]``."""
    blocks, groups, _ = packed.shape
    by_row = packed.view(blocks, groups, 8, ROWS, 4)
    rows = by_row[ids // ROWS, :, :, ids % ROWS, :]  # [*ids, groups, 8, 4]
    return (rows.reshape(*ids.shape, groups * GROUP) ^ 0x80).view(torch.int8)


def int8_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 ``[M, N]`` = ``x [M, K]`` @ (the packed weight times ``scales [N]`` fp32)'s transpose."""
    return torch.ops.picochat_cpu.int8_mm(x, packed, scales)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: "DecodeMetadata",
                     scale: float) -> torch.Tensor:
    """:func:`kernels.reference.decode_attention` in one pass (head dim a multiple of 16 up to
    128): each (row, query head) reads its context rows straight from the pools, in fp32, and
    skips masked positions — no gathered fp32 copy of K and V, no matmul calls. Other head dims
    take the torch path."""
    if q.shape[-1] % 16 or q.shape[-1] > 128:
        from picochat.kernels import reference

        return reference.decode_attention(q, k_cache, v_cache, meta, scale)
    return torch.ops.picochat_cpu.decode_attention(q, k_cache, v_cache, meta.context_slots, meta.bias, scale)


PREFILL_HEAD_DIMS = (32, 64, 128)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Causal attention of a bf16 query chunk ``q [Lq, H, D]`` (the last Lq positions) over its
    sequence's ``k, v [L, Hkv, D]`` as one flash-attention pass on AVX512-BF16 dot products (a
    ``reference.ChunkKernel``; only where :func:`bf16_attention_available`); None for other dtypes
    or head dims (32, 64 and 128 only)."""
    if q.dtype != torch.bfloat16 or k.dtype != torch.bfloat16 or q.shape[-1] not in PREFILL_HEAD_DIMS:
        return None
    return torch.ops.picochat_cpu.prefill_attention(q, k, v, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kernels.reference.rms_norm` as one op for bf16 / fp16 rows (``cpu_norm.cpp``), which
    the eager forward and the compiled step share, so both sum each row the same way; fp32 and
    other shapes take the reference (fp32 stays op for op what HF transformers computes)."""
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype or x.shape[-1] % 16:
        from picochat.kernels import reference

        return reference.rms_norm(x, weight, eps, residual)
    if residual is None:
        return torch.ops.picochat_cpu.rms_norm(x, weight, eps), x
    return torch.ops.picochat_cpu.add_rms_norm(x, residual, weight, eps)
