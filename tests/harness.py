"""Run a function on N real gloo ranks (separate processes) and gather what each returns.

Every distributed test in the project goes through ``run_on_ranks``: no mocks of
torch.distributed. The function must be importable by the children (defined at module level
in a test file or in the library); it is called as ``fn(rank, world_size, *args)`` after the
default process group is initialised with the gloo backend on localhost. Return values travel
back through a queue (tensors are fine) and come back ordered by rank. A rank that raises makes
``run_on_ranks`` raise with that rank's traceback; a hang is cut by ``timeout``.

Ranks start from a forkserver that has imported what ranks import (``PRELOAD``): each rank is a
fresh process, but without its own seconds of imports; it takes the caller's environment and
directory.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from datetime import timedelta
from queue import Empty
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx.parallel.ports import free_port

# What ranks import, imported once by the fork server (a fresh rank then starts in ~0.1 s instead
# of spending ~3-8 CPU seconds on imports): torch; DeepSpeed (its accelerator resolves from the
# server's environment, and `make test` exports DS_ACCELERATOR=cpu); the trainer; and the
# datasets, transformers and peft imports of the data, HF and adapter tests.
PRELOAD = ["torch", "torch.distributed", "deepspeed", "datasets", "peft", "longctx.trainer.worker"]


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable,
    args: tuple,
    queue,
    collected,
    environ: dict[str, str],
    cwd: str,
) -> None:
    # A forkserver child starts with the server's environment and directory: take the caller's.
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # N ranks share this machine's cores; one thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
        )
        result = fn(rank, world_size, *args)
        dist.barrier()
        queue.put((rank, True, result))
    except BaseException:  # report every failure, including KeyboardInterrupt in a child
        queue.put((rank, False, traceback.format_exc()))
    finally:
        # Tensors travel through shared memory owned by this process: stay alive until the
        # parent has received every result.
        collected.wait(timeout=60)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    Returns the ranks' return values as a list indexed by rank. Raises RuntimeError with the
    first failing rank's traceback, or TimeoutError if the ranks do not finish in ``timeout``.
    """
    ctx = mp.get_context("forkserver")
    # The server imports torch once; every rank forks from it instead of importing it again.
    ctx.set_forkserver_preload(PRELOAD)
    queue = ctx.Queue()
    collected = ctx.Event()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(
                rank,
                world_size,
                port,
                fn,
                args,
                queue,
                collected,
                dict(os.environ),
                os.getcwd(),
            ),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < world_size:
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except Empty as exc:
                missing = sorted(set(range(world_size)) - set(results))
                raise TimeoutError(
                    f"ranks {missing} did not finish within {timeout:.0f} s"
                ) from exc
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            results[rank] = payload
    finally:
        collected.set()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [results[rank] for rank in range(world_size)]
