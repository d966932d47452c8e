"""device_stats(): the host without NVML (the normal case here), GPUs when NVML answers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types

import pytest

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


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA GPU and its driver")
def test_real_nvml_reports_each_gpu(monkeypatch):
    monkeypatch.setattr(system, "_nvml_ready", None)
    listed = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                            capture_output=True, text=True, check=True).stdout.strip().splitlines()
    gpus = system.device_stats()
    assert len(gpus) == len(listed)
    for index, (gpu, line) in enumerate(zip(gpus, listed)):
        name, total_mib = (part.strip() for part in line.split(","))
        assert gpu.kind == "gpu" and gpu.name == f"GPU{index} {name}"
        assert 0 <= gpu.memory_total_bytes - (int(total_mib) << 20) < 1 << 20  # nvidia-smi rounds to MiB
        assert 0 < gpu.memory_used_bytes <= gpu.memory_total_bytes and 0 <= gpu.utilization_pct <= 100
