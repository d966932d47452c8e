"""Device statistics for the console's memory panel and the engine's metrics.

``device_stats()`` reports every NVIDIA GPU through NVML (memory used / total, utilisation), or,
on a machine without one, the host: RAM used / total, this process's RSS and CPU %. NVML being
absent (no driver, no GPU, no ``pynvml``) is the normal case on a laptop, not an error: it is
detected once and the host is reported instead. Imports neither torch nor textual.
"""

from __future__ import annotations

import threading

import psutil

from picochat.engine.protocol import DeviceStats

_lock = threading.Lock()
_nvml_ready: bool | None = None  # None: not tried yet
_process = psutil.Process()


def _nvml():
    """The ``pynvml`` module once initialised, or None where NVML is unavailable."""
    global _nvml_ready
    with _lock:
        if _nvml_ready is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_ready = pynvml.nvmlDeviceGetCount() > 0
            except Exception:  # ImportError, NVMLError_LibraryNotFound, driver errors: no NVML
                _nvml_ready = False
        if not _nvml_ready:
            return None
    import pynvml

    return pynvml


def gpu_stats() -> tuple[DeviceStats, ...]:
    """One entry per NVIDIA GPU; empty without NVML."""
    nvml = _nvml()
    if nvml is None:
        return ()
    stats = []
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
            stats.append(DeviceStats(
                name=f"GPU{index} {name.decode() if isinstance(name, bytes) else name}", kind="gpu",
                memory_used_bytes=int(memory.used), memory_total_bytes=int(memory.total),
                utilization_pct=float(utilization.gpu)))
    except nvml.NVMLError:  # a GPU that fell off the bus: report what was read
        pass
    return tuple(stats)


def host_stats() -> DeviceStats:
    """RAM of the host, and RSS and CPU % of this process (100 % = one core)."""
    memory = psutil.virtual_memory()
    return DeviceStats(name="CPU (RAM)", kind="cpu", memory_used_bytes=int(memory.total - memory.available),
                       memory_total_bytes=int(memory.total), utilization_pct=_process.cpu_percent(None),
                       process_rss_bytes=int(_process.memory_info().rss))


def device_stats() -> tuple[DeviceStats, ...]:
    """GPUs where NVML sees any, otherwise the host."""
    return gpu_stats() or (host_stats(),)
