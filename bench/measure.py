"""Measurement helpers shared by the benchmarks: peak resident memory, timed steps, subprocess
cases, T^2 extrapolation of cases too big to run, and the JSON report.

Memory is the resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) after a reset
through ``/proc/self/clear_refs`` (writing ``5`` sets the mark to the current resident size),
minus the resident size at the reset: every byte a case allocates after the reset, nothing the
process held before (torch's libraries, whatever the case set up before the reset). Linux only.

Each case of a sweep runs in a fresh subprocess (``run_worker``), so one case's freed heap or
cached buffers never count in the next one's peak.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

GiB = 1024**3
# how ``peak_and_median_times`` in a ``run_worker`` subprocess measures, for the reports
MEMORY_METHOD = (
    "fresh subprocess per case; VmHWM after one run minus VmRSS at a /proc/self/clear_refs "
    "reset taken after inputs and a tiny warm-up exist"
)
TIME_METHOD = (
    "median process CPU time (time_s; ratios use it) and wall time (wall_s) of the timed runs "
    "after the memory run"
)


def status_kib(field: str) -> int:
    """The value of ``field`` (``VmRSS``, ``VmHWM``) in ``/proc/self/status``, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_memory() -> int:
    """Reset the resident high-water mark to the current resident size; returns it in bytes."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return status_kib("VmRSS") * 1024


def peak_memory_since(baseline: int) -> int:
    """Bytes by which the resident high-water mark rose above ``baseline``."""
    return status_kib("VmHWM") * 1024 - baseline


def attention_inputs(
    gen: torch.Generator, heads: int, length: int, head_dim: int, *, requires_grad: bool = True
) -> list[torch.Tensor]:
    """q, k, v and an output gradient dout, each [1, H, T, D] standard normal, drawn from
    ``gen`` in that order; q, k, v require grad when ``requires_grad``."""
    q, k, v, dout = (torch.randn(1, heads, length, head_dim, generator=gen) for _ in range(4))
    return [x.requires_grad_(requires_grad) for x in (q, k, v)] + [dout]


def peak_and_median_times(step: Callable[[], None], repeats: int) -> dict:
    """Peak memory of one ``step()`` after a reset, then the median process CPU time and wall
    time of ``repeats`` (at least 1) more: ``{"time_s", "wall_s", "peak_bytes"}``."""
    baseline = reset_peak_memory()
    step()
    peak = peak_memory_since(baseline)
    cpu_times, wall_times = [], []
    for _ in range(max(repeats, 1)):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        step()
        cpu_times.append(time.process_time() - cpu_start)
        wall_times.append(time.perf_counter() - wall_start)
    return {
        "time_s": statistics.median(cpu_times),
        "wall_s": statistics.median(wall_times),
        "peak_bytes": peak,
    }


def run_worker(command: list[str], what: str) -> dict:
    """Run a benchmark case in a fresh process; its last stdout line is its JSON result.

    Raises with the end of its stderr (``what`` names the case) when it fails."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench {what} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measured_or_extrapolated(
    lengths: list[int],
    measure: Callable[[int], dict],
    memory_fraction: float,
    what: str,
    *,
    extrapolate: bool = True,
) -> dict[int, dict]:
    """Per length (ascending), ``measure(length)`` while the T^2-scaled estimate of its peak fits.

    With ``extrapolate``, a length whose estimate (every value of the largest length measured
    so far, times (T / T_measured)^2) exceeds ``memory_fraction`` of the available memory is not
    run: its row is that estimate, marked ``measured: False`` with ``estimated_from``. Exact for
    cases whose big buffers are all [B, H, T, T]; an overestimate otherwise.
    """
    rows: dict[int, dict] = {}
    largest = None  # (length, measurement) of the largest length measured so far
    for length in sorted(lengths):
        if extrapolate and largest is not None:
            scale = (length / largest[0]) ** 2
            estimate = {key: value * scale for key, value in largest[1].items()}
            budget = memory_fraction * psutil.virtual_memory().available
            if estimate["peak_bytes"] > budget:
                rows[length] = {**estimate, "measured": False, "estimated_from": largest[0]}
                print(
                    f"{what} T={length}: estimated peak {estimate['peak_bytes'] / GiB:.1f} "
                    f"GiB > {budget / GiB:.1f} GiB budget; extrapolated from T={largest[0]}"
                )
                continue
        result = measure(length)
        rows[length] = {**result, "measured": True}
        largest = (length, result)
    return rows


def write_report(path: Path, report: dict | list) -> None:
    """Write ``report`` as indented JSON to ``path`` (creating its folder) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
