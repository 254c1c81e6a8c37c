"""The driver's view of a training run: rank 0's progress, replayed from its events file.

Under ``longctx train`` every worker's stdout and stderr go to ``RUN/logs/rank_N.log`` (Python
output, DeepSpeed's op builds, tracebacks), so the terminal carries no Ray prefixes. Rank 0's
``ProgressDisplay`` appends what it shows to ``RUN/logs/progress.jsonl`` (the ``TrainJob``'s
``events``); ``follow_progress`` tails that file on a thread of the driver while the workers run
and shows each record (``trainer.metrics.ProgressReplay``): a progress bar with ETA on a
terminal, one line per logged step otherwise. The file lives in the run directory, which the
driver and the workers already share (the summary and checkpoints are read from it).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from longctx.trainer.metrics import ProgressReplay

LOGS_DIR = "logs"
EVENTS_FILE = "progress.jsonl"
POLL_S = 0.2


def logs_dir(run_dir: Path) -> Path:
    """``RUN/logs``: the workers' output files and the progress events."""
    return run_dir / LOGS_DIR


class _Follower:
    def __init__(self, path: Path, replay: ProgressReplay):
        self.path, self.replay = path, replay
        self.offset, self.partial = 0, ""

    def poll(self) -> None:
        """Show every complete line appended since the last poll."""
        try:
            with self.path.open() as file:
                file.seek(self.offset)
                text = file.read()
                self.offset = file.tell()
        except FileNotFoundError:
            return
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line a killed worker left half-written
            self.replay.feed(record)


@contextmanager
def follow_progress(events: Path, stream: TextIO | None = None) -> Iterator[None]:
    """Show ``events`` (emptied first) on ``stream`` while the block runs, then what is left."""
    events.parent.mkdir(parents=True, exist_ok=True)
    events.write_text("")
    follower = _Follower(events, ProgressReplay(stream))
    done = threading.Event()

    def run() -> None:
        while not done.wait(POLL_S):
            follower.poll()

    thread = threading.Thread(target=run, name="longctx-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        follower.poll()
        follower.replay.close()
