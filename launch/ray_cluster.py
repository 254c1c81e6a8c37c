"""Where the workers run: an embedded single-machine Ray cluster, or an existing one joined by
address.

``longctx train`` with no ``--address`` starts Ray inside the driver process (no set-up needed):
every Ray service listens on 127.0.0.1 only, usage statistics are off, and token authentication
is off because nothing outside this machine can reach the cluster. With ``--address`` (``auto``,
``HOST:PORT`` or ``ray://HOST:PORT``) the driver joins that cluster as a client and changes none
of its security settings.

The worker count is checked against the CPUs (and GPUs) the cluster has before any worker starts,
so an impossible request is a one-line ``LongctxError`` instead of Ray waiting forever for
resources. For the embedded cluster the check runs before Ray is even started.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from longctx.errors import LongctxError

# Ray reads these when it is imported or started; set here, they reach every Ray process that
# the embedded cluster spawns (the raylet, the Train controller and the workers inherit them).
_EMBEDDED_ENV = {
    # No usage statistics are sent anywhere.
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's single-machine mode (its default on macOS and Windows): the node address is the
    # loopback address, so every Ray server binds to 127.0.0.1 instead of the public interface.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Token authentication protects a cluster reachable from the network; this one is not.
    "RAY_AUTH_MODE": "disabled",
    # Spot-instance preemption cannot happen to a cluster inside this process.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
# Set for embedded and joined clusters alike: Ray Train would otherwise route each worker's
# print() through a logger that echoes it a second time on the terminal.
_DRIVER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@dataclass(frozen=True)
class WorkerResources:
    """What each of ``num_workers`` Ray Train workers gets, and how they talk to each other."""

    num_workers: int
    cpus_per_worker: int
    use_gpu: bool
    description: str  # one line for the terminal: which cluster, how many CPUs / GPUs
    worker_env: dict[str, str] = field(default_factory=dict)  # set in each worker first thing

    @property
    def backend(self) -> str:
        """torch.distributed backend: NCCL between GPUs, gloo between CPU processes."""
        return "nccl" if self.use_gpu else "gloo"


def local_cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        return os.cpu_count() or 1


def _local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_capacity(workers: int, cpus: float, gpus: float, where: str, fix: str) -> bool:
    """Whether the workers use GPUs; a one-line ``LongctxError`` if ``workers`` ranks cannot all
    run at once on a cluster with ``cpus`` CPUs and ``gpus`` GPUs.

    Every worker needs at least one CPU: Ray starts an actor only on a free CPU, so more workers
    than CPUs would wait forever. On a cluster with GPUs every worker takes one GPU.
    """
    if workers > cpus:
        raise LongctxError(
            f"--workers {workers} needs {workers} CPUs but {where} has {cpus:g}; pass --workers "
            f"{int(cpus)} or fewer{fix}"
        )
    use_gpu = gpus > 0
    if use_gpu and workers > gpus:
        raise LongctxError(
            f"--workers {workers} needs one GPU each but {where} has {gpus:g} GPUs; pass "
            f"--workers {int(gpus)} or fewer{fix}"
        )
    return use_gpu


def _worker_env(use_gpu: bool, embedded: bool) -> dict[str, str]:
    """Environment each worker sets before importing DeepSpeed."""
    env = {}
    if not use_gpu:
        # DeepSpeed would otherwise probe for CUDA and other accelerators on every import.
        env["DS_ACCELERATOR"] = "cpu"
    if embedded:
        # DeepSpeed's CPU comm op is compiled once into TORCH_EXTENSIONS_DIR: pass the driver's
        # cache on (the Makefile points it into the venv) so workers never recompile it.
        extensions = os.environ.get("TORCH_EXTENSIONS_DIR")
        if extensions:
            env["TORCH_EXTENSIONS_DIR"] = extensions
    return env


def _quiet_ray_init_kwargs() -> dict:
    """ray.init arguments that keep Ray's own INFO chatter off the terminal; the workers' output
    (progress lines, warnings, tracebacks) still reaches it."""
    return {"logging_level": logging.WARNING, "log_to_driver": True}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _environment(updates: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the old values."""
    saved = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _embedded_environment() -> dict[str, str]:
    """Variables for an embedded cluster: ``_EMBEDDED_ENV`` (a value the user exported wins),
    and the address of the cluster about to start.

    Ray Train's controller finds its cluster's state API through ``RAY_ADDRESS``; without it,
    Ray guesses from ``/tmp/ray`` and, with other Ray clusters running on the machine (parallel
    test runs, other users), may pick the wrong one. So the GCS port is chosen here
    (``RAY_GCS_SERVER_PORT``) and every process of the cluster inherits ``RAY_ADDRESS``.
    """
    port = _free_port()
    env = {name: os.environ.get(name, value) for name, value in _EMBEDDED_ENV.items()}
    env.update(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"127.0.0.1:{port}")
    return env


def _start_embedded(workers: int) -> tuple[int, bool, str]:
    """Start a local cluster for ``workers`` workers; ``(cpus_per_worker, use_gpu, line)``."""
    cpus, gpus = local_cpu_count(), _local_gpu_count()
    fix = ", or join a larger cluster with --address"
    use_gpu = check_capacity(workers, cpus, gpus, "this machine", fix)
    # The machine's CPUs are split evenly, so each rank's intra-op threads get their own cores.
    cpus_per_worker = cpus // workers
    import ray

    context = ray.init(
        address="local",  # always a new cluster, never one found in /tmp/ray
        num_cpus=cpus,
        num_gpus=gpus,
        include_dashboard=True,  # Ray Train's controller queries the state API served here
        dashboard_host="127.0.0.1",
        **_quiet_ray_init_kwargs(),
    )
    dashboard = f", dashboard http://{context.dashboard_url}" if context.dashboard_url else ""
    line = (
        f"local Ray on 127.0.0.1: {workers} workers x {cpus_per_worker} CPU"
        + (" + 1 GPU" if use_gpu else "")
        + dashboard
    )
    return cpus_per_worker, use_gpu, line


def _join(address: str, workers: int) -> tuple[int, bool, str]:
    """Connect to the cluster at ``address``; ``(cpus_per_worker, use_gpu, line)``."""
    import ray

    try:
        ray.init(address=address, **_quiet_ray_init_kwargs())
    except ConnectionError as error:
        raise LongctxError(
            f"--address {address}: cannot connect to a Ray cluster ({error}); start one with "
            "'ray start --head' or check the address"
        ) from None
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    try:
        use_gpu = check_capacity(
            workers, cpus, gpus, f"the Ray cluster at {address}", ", or add nodes"
        )
    except LongctxError:
        ray.shutdown()
        raise
    # One CPU per worker: a worker must fit on one node, whose size the driver cannot see.
    line = f"Ray cluster at {address} ({cpus:g} CPUs, {gpus:g} GPUs): {workers} workers x 1 CPU" + (
        " + 1 GPU" if use_gpu else ""
    )
    return 1, use_gpu, line


@contextmanager
def ray_cluster(address: str | None, workers: int) -> Iterator[WorkerResources]:
    """Start (``address=None``) or join a Ray cluster for ``workers`` training workers; yields
    what each worker gets and disconnects (stopping an embedded cluster) on exit.

    Raises ``LongctxError`` when the cluster cannot hold ``workers`` workers at once; for the
    embedded cluster this happens before Ray starts. The embedded cluster binds to 127.0.0.1
    only when Ray is first imported here (Ray reads its single-machine switch at import). The
    environment variables set for Ray are restored on exit.
    """
    embedded = address is None
    env = {**_DRIVER_ENV, **(_embedded_environment() if embedded else {})}
    with _environment(env):
        if embedded:
            cpus_per_worker, use_gpu, line = _start_embedded(workers)
        else:
            cpus_per_worker, use_gpu, line = _join(address, workers)
        import ray

        try:
            yield WorkerResources(
                num_workers=workers,
                cpus_per_worker=cpus_per_worker,
                use_gpu=use_gpu,
                description=line,
                worker_env=_worker_env(use_gpu, embedded=embedded),
            )
        finally:
            ray.shutdown()
