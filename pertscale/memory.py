"""This process's peak resident memory, as benchmarks, logs and scale tests report it."""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["peak_rss_mb"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB: Linux VmHWM (ru_maxrss is inherited across
    fork + exec, so a child of a large parent would report the parent's peak), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
