"""Short human-readable numbers for panels and status lines; ``None`` reads "n/a"."""

from __future__ import annotations

UNAVAILABLE = "n/a"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return UNAVAILABLE
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def rate(tokens_per_s: float | None) -> str:
    if tokens_per_s is None:
        return UNAVAILABLE
    return f"{tokens_per_s:,.0f} tok/s" if tokens_per_s >= 100 else f"{tokens_per_s:.1f} tok/s"


def gib(n_bytes: int | None) -> str:
    return UNAVAILABLE if n_bytes is None else f"{n_bytes / 2**30:.1f}"


def percent(fraction: float | None) -> str:
    return UNAVAILABLE if fraction is None else f"{fraction * 100:.0f}%"
