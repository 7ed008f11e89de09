"""What the benchmarks share: Linux process memory (/proc/self/status, resetting the high-water mark), how
busy the rest of the machine is (/proc/stat), so that a contended run can be waited out, flagged or redone,
and what the machine is (for the JSON)."""

from __future__ import annotations

import os
import platform
import time


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform.processor()` says."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def trl_version() -> str | None:
    """TRL's version, or None where it is not installed (the peer the benchmarks compare with)."""
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def status_kb(field: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM, ...), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    try:  # Linux: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_busy_s() -> float | None:
    """Seconds of CPU time the whole machine has spent busy (all processes, all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def other_load_now(seconds: float = 1.0) -> float | None:
    """Share of the machine's cores other processes keep busy, sampled over `seconds`."""
    busy0, cpu0 = cpu_busy_s(), time.process_time()
    time.sleep(seconds)
    busy1, cpu1 = cpu_busy_s(), time.process_time()
    if busy0 is None or busy1 is None:
        return None
    return max(0.0, (busy1 - busy0 - (cpu1 - cpu0)) / (seconds * (os.cpu_count() or 1)))


def wait_for_quiet(threshold: float, max_wait: float) -> tuple[float, float | None]:
    """Wait (at most `max_wait` s) until other processes use at most `threshold` of the cores.
    Returns (seconds waited, the last load sampled)."""
    t0 = time.perf_counter()
    load = None
    while True:
        load = other_load_now()
        if load is None or load <= threshold or time.perf_counter() - t0 >= max_wait:
            break
    return time.perf_counter() - t0, load
