"""The roofline line of ``picochat bench``: achieved weight-read bandwidth of decoding against the
machine's measured memory bandwidth (measured once, cached in the user cache dir), as gpt-fast
prints it. Decode at small batch reads every weight once per step, so weight bytes × steps/s is
the bandwidth it achieves."""

from __future__ import annotations

import json
import time

import torch

from picochat.config import atomic_write_text, cache_dir

PROBE_BYTES = 512 << 20


def measured_bandwidth_gbs(device: str = "cpu") -> float:
    """Read-only memory bandwidth in GB/s (median of 5 passes over a 512 MiB tensor), cached."""
    path = cache_dir() / "bandwidth.json"
    key = f"{device}:{torch.get_num_threads()}"
    try:
        cached = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        cached = {}
    if key in cached:
        return float(cached[key])
    x = torch.ones(PROBE_BYTES // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        x.sum().item()
        times.append(time.perf_counter() - start)
    gbs = PROBE_BYTES / sorted(times[1:])[2] / 1e9
    atomic_write_text(path, json.dumps({**cached, key: gbs}))
    return gbs


def roofline(weight_bytes: int, decode_steps_per_s: float, device: str = "cpu") -> dict:
    achieved = weight_bytes * decode_steps_per_s / 1e9
    peak = measured_bandwidth_gbs(device)
    return {"weight_bytes": weight_bytes, "achieved_weight_gbs": achieved,
            "measured_bandwidth_gbs": peak, "bandwidth_share": achieved / peak}
