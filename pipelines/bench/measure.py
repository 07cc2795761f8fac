"""What both sides of the benchmark measure the same way: the device, peak memory (GPU and resident set) of a
measurement, and throughput and MFU of a measured window. How each number is counted: docs/bench.md.
"""

from __future__ import annotations

import gc
import os
import resource
import sys

import torch


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def reset_peaks(dev: torch.device) -> bool:
    """Free what the last measurement left and reset the peak counters; True if the RSS peak could be reset."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def peaks(dev: torch.device, rss_reset: bool) -> dict:
    """The measurement's peak GPU memory and peak RSS (since reset_peaks, or since the process started when the
    peak could not be reset: "peak_rss_scope": "process")."""
    rss_gb = None
    if rss_reset:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        rss_gb = int(line.split()[1]) * 1024 / 2**30
        except OSError:
            pass
    if rss_gb is None:
        rss_reset = False
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        rss_gb = maxrss / 2**30 if sys.platform == "darwin" else maxrss * 1024 / 2**30
    return {"peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
            "peak_rss_gb": rss_gb, "peak_rss_scope": "measurement" if rss_reset else "process"}


def sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def rates(tokens: int, sec: float, flops: float, steps: int, dev: torch.device) -> dict:
    """Throughput and MFU of a measured window, the same way for ours and the peer."""
    from components.training.flops import peak_flops

    peak = peak_flops(dev)
    return {"tokens_per_s": tokens / sec, "sec_per_step": sec / steps, "mfu": flops / sec / peak if peak else None}
