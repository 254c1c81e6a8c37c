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

The embedded cluster may *oversubscribe* the machine: more CPU workers than cores (say 4 ranks of
a ring 2 x dp 2 layout on a 2-core laptop) is a legitimate way to test a layout before taking it
to a cluster. Ray is then started with one logical CPU per worker (``num_cpus = workers``), each
worker gets one CPU and so one intra-op thread (Ray sets ``OMP_NUM_THREADS`` from it), and the
launcher logs that the cores are shared. Up to ``MAX_WORKERS_PER_CPU`` workers per core are
allowed; beyond that the request is almost certainly a typo and is refused. A joined cluster is
never oversubscribed: its nodes' CPU counts are what its operator declared.

Placement (``--placement``): Ray Train reserves the workers' resources as one placement group;
``PACK`` (the default) fills a node before using the next, ``SPREAD`` spreads them where it can,
``STRICT_SPREAD`` puts every worker on a different node (and fails if there are too few nodes).
"""

from __future__ import annotations

import logging
import os
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
# Most workers the embedded cluster runs per core (each then gets one thread).
MAX_WORKERS_PER_CPU = 4
# Ray placement-group strategies that ``--placement`` accepts (Ray Train ScalingConfig).
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerResources:
    """What each of ``num_workers`` Ray Train workers gets, and how they talk to each other."""

    num_workers: int
    cpus_per_worker: int
    use_gpu: bool
    description: str  # one line for the terminal: which cluster, how many CPUs / GPUs
    worker_env: dict[str, str] = field(default_factory=dict)  # set in each worker first thing
    placement_strategy: str = "PACK"  # one of PLACEMENT_STRATEGIES

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


def _quiet_ray_init_kwargs(worker_output: bool) -> dict:
    """ray.init arguments that keep Ray's own INFO chatter off the terminal; the workers' output
    (warnings, tracebacks) reaches it only when ``worker_output`` (else it stays in the log
    files Ray or the workers write: ``longctx train`` shows rank 0's progress itself)."""
    return {"logging_level": logging.WARNING, "log_to_driver": worker_output}


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
    # imported here: the ``longctx.parallel`` package imports torch, which the CLI's
    # validation paths (this module is imported for its constants) must not pay for
    from longctx.parallel.ports import free_port

    port = free_port()
    env = {name: os.environ.get(name, value) for name, value in _EMBEDDED_ENV.items()}
    env.update(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"127.0.0.1:{port}")
    return env


def embedded_cpu_plan(workers: int, cpus: int) -> tuple[int, int]:
    """``(ray_cpus, cpus_per_worker)`` for ``workers`` CPU workers on a machine with ``cpus``
    cores: the cores are split evenly, or, with more workers than cores, Ray is told there is
    one CPU per worker (oversubscription, each worker then runs one thread). More than
    ``MAX_WORKERS_PER_CPU`` workers per core is a one-line ``LongctxError``."""
    if workers <= cpus:
        return cpus, cpus // workers
    limit = MAX_WORKERS_PER_CPU * cpus
    if workers > limit:
        raise LongctxError(
            f"--workers {workers} would put {workers / cpus:g} workers on each of this machine's "
            f"{cpus} CPUs (at most {MAX_WORKERS_PER_CPU} per CPU are run); pass --workers {limit} "
            "or fewer, or join a larger cluster with --address"
        )
    return workers, 1


def _start_embedded(workers: int, worker_output: bool) -> tuple[int, bool, str]:
    """Start a local cluster for ``workers`` workers; ``(cpus_per_worker, use_gpu, line)``."""
    cpus, gpus = local_cpu_count(), _local_gpu_count()
    fix = ", or join a larger cluster with --address"
    use_gpu = gpus > 0
    if use_gpu:
        check_capacity(workers, max(cpus, workers), gpus, "this machine", fix)
    ray_cpus, cpus_per_worker = embedded_cpu_plan(workers, cpus)
    oversubscribed = ray_cpus > cpus
    if oversubscribed:
        log.warning(
            "oversubscribing this machine: %d workers share %d CPUs, 1 thread each "
            "(Ray is started with num_cpus=%d); steps will be slower than on %d cores",
            workers,
            cpus,
            ray_cpus,
            workers,
        )
    import ray

    context = ray.init(
        address="local",  # always a new cluster, never one found in /tmp/ray
        num_cpus=ray_cpus,
        num_gpus=gpus,
        include_dashboard=True,  # Ray Train's controller queries the state API served here
        dashboard_host="127.0.0.1",
        **_quiet_ray_init_kwargs(worker_output),
    )
    dashboard = f", dashboard http://{context.dashboard_url}" if context.dashboard_url else ""
    line = (
        f"local Ray on 127.0.0.1: {workers} workers x {cpus_per_worker} CPU"
        + (" + 1 GPU" if use_gpu else "")
        + (f" (oversubscribed: {cpus} CPUs shared, 1 thread each)" if oversubscribed else "")
        + dashboard
    )
    return cpus_per_worker, use_gpu, line


def _gcs_address(address: str) -> str | None:
    """``HOST:PORT`` when ``address`` names a cluster's GCS directly; None for ``auto`` and
    Ray Client addresses (``ray://``), which Ray resolves itself."""
    if address == "auto" or "://" in address:
        return None
    return address


def _joined_runtime_env(address: str) -> dict:
    """Runtime environment of this job on a joined cluster: its processes (Ray Train's controller
    and workers) get ``RAY_ADDRESS``, so the state API calls they make find this cluster even
    where several Ray clusters share a machine (several nodes or jobs on one host); without it
    Ray guesses from ``/tmp/ray`` and refuses when it finds more than one."""
    gcs = _gcs_address(address)
    return {"env_vars": {"RAY_ADDRESS": gcs}} if gcs else {}


def _join(address: str, workers: int, worker_output: bool) -> tuple[int, bool, str]:
    """Connect to the cluster at ``address``; ``(cpus_per_worker, use_gpu, line)``."""
    import ray

    try:
        ray.init(
            address=address,
            runtime_env=_joined_runtime_env(address),
            **_quiet_ray_init_kwargs(worker_output),
        )
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
def ray_cluster(
    address: str | None, workers: int, placement: str = "PACK", *, worker_output: bool = True
) -> Iterator[WorkerResources]:
    """Start (``address=None``) or join a Ray cluster for ``workers`` training workers placed
    with ``placement`` (one of ``PLACEMENT_STRATEGIES``); yields what each worker gets and
    disconnects (stopping an embedded cluster) on exit. ``worker_output``: whether Ray copies
    the workers' output to this terminal (with its ``(RayTrainWorker pid=N)`` prefixes).

    Raises ``LongctxError`` when the cluster cannot hold ``workers`` workers at once (the
    embedded cluster oversubscribes up to ``MAX_WORKERS_PER_CPU`` per core); for the embedded
    cluster this happens before Ray starts. The embedded cluster binds to 127.0.0.1
    only when Ray is first imported here (Ray reads its single-machine switch at import). The
    environment variables set for Ray are restored on exit.
    """
    if placement not in PLACEMENT_STRATEGIES:
        raise LongctxError(
            f"placement {placement!r} is not a Ray placement strategy; use one of "
            f"{', '.join(PLACEMENT_STRATEGIES)}"
        )
    embedded = address is None
    if embedded:
        cluster_env = _embedded_environment()
    else:
        gcs = _gcs_address(address)
        cluster_env = {"RAY_ADDRESS": gcs} if gcs else {}
    env = {**_DRIVER_ENV, **cluster_env}
    with _environment(env):
        if embedded:
            cpus_per_worker, use_gpu, line = _start_embedded(workers, worker_output)
        else:
            cpus_per_worker, use_gpu, line = _join(address, workers, worker_output)
        import ray

        try:
            yield WorkerResources(
                num_workers=workers,
                cpus_per_worker=cpus_per_worker,
                use_gpu=use_gpu,
                description=line,
                worker_env=_worker_env(use_gpu, embedded=embedded),
                placement_strategy=placement,
            )
        finally:
            ray.shutdown()
