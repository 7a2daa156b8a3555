"""What the benchmarks share: the machine and versions a result came from, and sample summaries."""

from __future__ import annotations

import os
import platform
import statistics
from importlib.metadata import PackageNotFoundError, version


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def machine_line() -> str:
    """CPU model, core count, memory and the load average when the run started."""
    memory = memory_gib()
    load = os.getloadavg()
    return (
        f"{cpu_model()}, {os.cpu_count()} cores"
        + (f", {memory:.0f} GiB" if memory is not None else "")
        + f", load {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} (1/5/15 min)"
    )


def versions_line(*packages: str) -> str:
    """`python X, pkg Y, ...` for the installed packages among `packages`."""
    parts = [f"python {platform.python_version()}"]
    for name in packages:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(parts)


def spread(values: list[float], fmt: str = ".3f") -> str:
    """`median [min-max]` of a sample."""
    med = statistics.median(values)
    return f"{med:{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def compare(name: str, runs: dict, *, repeats: int, steps: int, base: str) -> dict[str, float]:
    """Runs each contender `repeats` times, interleaved so drift in machine load hits every
    contender alike; prints median steps/s [min-max] and the ratio to `base`."""
    samples = {label: [] for label in runs}
    for _ in range(repeats):
        for label, fn in runs.items():
            samples[label].append(fn())
    reference = statistics.median(samples[base])
    print(f"\n{name} ({steps} steps, {repeats} repeats)")
    ratios = {}
    for label, values in samples.items():
        ratios[label] = statistics.median(values) / reference
        print(f"  {label:18s} {spread(values, '.1f'):>26s} steps/s  {ratios[label]:5.2f}x")
    return ratios
