"""Run ``longctx train`` as a user does and SIGKILL Ray Train workers while it trains.

``train_with_kills`` starts ``longctx train`` (embedded Ray, real Ray Train workers running
DeepSpeed), reads rank 0's progress lines (``step 7/30 loss ...``) as they arrive, and when the
run reaches each requested step it sends SIGKILL to one of the run's Ray Train worker processes,
chosen at random. The workers are found among the descendants of the ``longctx`` process (its
embedded Ray cluster), never by name alone, so other Ray clusters on the machine are left alone.
After a kill the next one waits until the restarted group has logged a step again.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
LONGCTX = Path(sys.executable).parent / "longctx"
_STEP_LINE = re.compile(r"\bstep (\d+)/(\d+) loss\b")
WORKER_TITLE = "RayTrainWorker"


@dataclass
class KilledRun:
    """What a run with kills did: exit code, its whole output, the (step, pid) of each kill,
    and the most checkpoint directories seen on disk at once."""

    returncode: int
    output: str
    kills: list[tuple[int, int]] = field(default_factory=list)
    most_checkpoints: int = 0


def train_worker_pids(root_pid: int) -> list[int]:
    """Ray Train worker processes below ``root_pid`` (their process title names the actor)."""
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    pids = []
    for child in children:
        try:
            title = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if WORKER_TITLE in title:
            pids.append(child.pid)
    return sorted(pids)


def _count_checkpoints(run_dir: Path) -> int:
    root = run_dir / "checkpoints"
    return len(list(root.glob("step_*"))) if root.is_dir() else 0


def train_with_kills(
    args: list[str],
    cwd: Path,
    run_dir: Path,
    kill_steps: list[int],
    *,
    seed: int = 0,
    timeout: float = 1800,
) -> KilledRun:
    """``longctx train ARGS`` with one worker SIGKILLed at (or just after, as the log arrives)
    each step of ``kill_steps`` (increasing). Output is read line by line; stderr is merged."""
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(REPO / ".venv" / "torch_extensions"),
        "COLUMNS": "200",
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [str(LONGCTX), "train", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    chooser = random.Random(seed)
    pending = list(kill_steps)
    run = KilledRun(returncode=-1, output="")
    lines: list[str] = []
    started = time.monotonic()
    armed = True  # False after a kill until the restarted group logs a step
    for line in process.stdout:
        lines.append(line)
        run.most_checkpoints = max(run.most_checkpoints, _count_checkpoints(run_dir))
        if time.monotonic() - started > timeout:
            process.kill()
            break
        if "resumed from" in line:
            armed = True
        match = _STEP_LINE.search(line)
        if not (match and pending and armed and int(match.group(1)) >= pending[0]):
            continue
        workers = train_worker_pids(process.pid)
        if not workers:
            continue
        victim = chooser.choice(workers)
        os.kill(victim, signal.SIGKILL)
        run.kills.append((int(match.group(1)), victim))
        pending.pop(0)
        armed = False
    run.returncode = process.wait()
    run.output = "".join(lines)
    return run
