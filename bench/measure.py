"""Measurement helpers shared by the benchmarks: peak resident memory, timed steps, subprocess
cases, T^2 extrapolation of cases too big to run, and the JSON report.

Memory is the resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) after a reset
through ``/proc/self/clear_refs`` (writing ``5`` sets the mark to the current resident size),
minus the resident size at the reset: every byte a case allocates after the reset, nothing the
process held before (torch's libraries, whatever the case set up before the reset). Linux only.

Each case of a sweep runs in a fresh subprocess (``run_worker``, or ``run_ranks`` for cases on
several gloo ranks), so one case's freed heap or cached buffers never count in the next one's
peak. ``run_ranks`` children run with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``):
every large tensor is then its own mapping, returned on free, and the resident size follows live
tensors instead of freed heap that glibc keeps.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from queue import Empty

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx.bench.report import WRITTEN_INDEX, cpu_name
from longctx.parallel.ports import free_port

GiB = 1024**3
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
# glibc mmap thresholds of a memory run (every allocation of 128 KiB or more is its own
# mapping, returned on free: the resident peak follows the live tensors) and of a timed run
# (32 MiB, where glibc's adaptive threshold ends up once large temporaries have been freed:
# temporaries reuse heap memory instead of faulting in fresh pages, as in a training process).
MEMORY_RUN_THRESHOLD = 128 * 1024
TIMED_RUN_THRESHOLD = 32 * 1024 * 1024
# how ``peak_and_median_times`` in a ``run_worker`` subprocess measures, for the reports
MEMORY_METHOD = (
    "fresh subprocess per case, glibc's mmap threshold fixed at 128 KiB from its start; VmHWM "
    "after one run minus VmRSS at a /proc/self/clear_refs reset taken after inputs and a tiny "
    "warm-up exist and the heap was trimmed"
)
TIME_METHOD = (
    "median process CPU time (time_s; ratios use it) and wall time (wall_s) of the timed runs "
    "after the memory run, with the mmap threshold at 32 MiB"
)


def status_kib(field: str) -> int:
    """The value of ``field`` (``VmRSS``, ``VmHWM``) in ``/proc/self/status``, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def release_free_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc ``malloc_trim``; nothing
    elsewhere): freed temporaries of the input set-up otherwise stay resident, and a measured
    case that reuses them shows a peak lower by up to ~30 MiB at random (seen on dense
    attention at T=32768, 143 to 172 MiB for the same run)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def fix_mmap_threshold(threshold: int = 128 * 1024) -> None:
    """Fix glibc's mmap threshold in this process (what ``MALLOC_MMAP_THRESHOLD_`` does for a
    child at start), and its trim threshold at twice that, as glibc's adaptive rule pairs them:
    every allocation of ``threshold`` bytes or more is then its own mapping, returned on free,
    so at 128 KiB the resident peak follows the live tensors instead of where freed temporaries
    were left in the heap (nothing where the C library is not glibc)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * threshold)


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


def random_training_batch(
    vocab_size: int,
    length: int,
    gen: torch.Generator,
    shard: Callable[[dict], dict] | None = None,
) -> dict[str, torch.Tensor]:
    """One random next-token batch of ``length`` tokens (input_ids, labels, position_ids
    [1, T]); with ``shard`` (a mesh's ``shard_batch``) this rank's zigzag shard of it, else the
    whole sequence with its ``seq_positions``."""
    ids = torch.randint(0, vocab_size, (1, length + 1), generator=gen)
    batch = {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "position_ids": torch.arange(length)[None],
    }
    if shard is None:
        return batch | {"seq_positions": torch.arange(length)}
    return shard(batch)


def peak_and_median_times(
    step: Callable[[], None], repeats: int, *, timed_threshold: int | None = None
) -> dict:
    """Peak memory of one ``step()`` after a reset, then the median process CPU time and wall
    time of ``repeats`` more (0: the times of that first run, which include first-touch page
    faults): ``{"time_s", "wall_s", "peak_bytes"}``. ``timed_threshold``: glibc's mmap
    threshold for the timed runs (``fix_mmap_threshold``), when the memory run had another."""
    baseline = reset_peak_memory()
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    step()
    cpu_times, wall_times = [time.process_time() - cpu_start], [time.perf_counter() - wall_start]
    peak = peak_memory_since(baseline)
    if repeats > 0:
        cpu_times, wall_times = [], []
        if timed_threshold is not None:
            fix_mmap_threshold(timed_threshold)
    for _ in range(repeats):
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


def run_ranks(fn: Callable, world: int, *args, timeout: float = 1800.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh spawned processes (a gloo group when
    world > 1) and return their results (plain Python values) ordered by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    saved_env = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # children inherit it at start
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world, port, fn, args, queue), daemon=True)
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    if saved_env is None:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    else:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = saved_env
    results = {}
    try:
        while len(results) < world:
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except Empty as exc:
                raise TimeoutError(f"benchmark ranks did not finish in {timeout:.0f} s") from exc
            if not ok:
                raise RuntimeError(f"benchmark rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return [results[rank] for rank in range(world)]


def _rank_main(rank, world, port, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        if world > 1:
            dist.init_process_group(
                "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=1800)
            )
        queue.put((rank, True, fn(rank, world, *args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
    """Write ``report`` as indented JSON to ``path`` (creating its folder) and say so, and
    record when and on which CPU in the folder's ``written.json`` (a clone or checkout resets
    file times, so the report's "measured" dates come from there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    index = path.parent / WRITTEN_INDEX
    written = json.loads(index.read_text()) if index.exists() else {}
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    written[path.stem] = {"written": when, "cpu": cpu_name()}
    index.write_text(json.dumps(dict(sorted(written.items())), indent=2) + "\n")
    print(f"wrote {path}")
