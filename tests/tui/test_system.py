"""device_stats(): the host without NVML (the normal case here), GPUs when NVML answers."""

from __future__ import annotations

import sys
import types

from picochat import system


def test_host_stats_without_nvml(monkeypatch):
    monkeypatch.setattr(system, "_nvml_ready", False)
    (host,) = system.device_stats()
    assert host.kind == "cpu" and host.name == "CPU (RAM)"
    assert 0 < host.memory_used_bytes <= host.memory_total_bytes
    assert host.process_rss_bytes > 0 and host.utilization_pct >= 0


def test_missing_nvml_library_is_not_an_error(monkeypatch):
    fake = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def nvml_init():
        raise NVMLError("NVML Shared Library Not Found")

    fake.NVMLError, fake.nvmlInit = NVMLError, nvml_init
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(system, "_nvml_ready", None)
    assert [d.kind for d in system.device_stats()] == ["cpu"]


def test_gpus_from_nvml(monkeypatch):
    fake = types.ModuleType("pynvml")
    fake.NVMLError = type("NVMLError", (Exception,), {})
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetName = lambda h: b"NVIDIA H100"
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=(h + 1) << 30, total=80 << 30)
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=40 + h)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(system, "_nvml_ready", None)
    gpus = system.device_stats()
    assert [(g.name, g.kind, g.memory_used_bytes, g.utilization_pct) for g in gpus] == [
        ("GPU0 NVIDIA H100", "gpu", 1 << 30, 40.0), ("GPU1 NVIDIA H100", "gpu", 2 << 30, 41.0)]
