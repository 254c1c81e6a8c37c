"""A real two-node Ray cluster on this machine (issue 8): ``ray start --head`` on 127.0.0.1 plus a
second ``ray start --address`` node, then ``longctx train --address 127.0.0.1:PORT --workers 2
--placement STRICT_SPREAD`` runs the tiny recipe with one worker on each node.

Each node declares 2 CPUs, so both workers would fit on one node: only the placement strategy
puts them on different nodes. The check reads Ray's own record of where the two Ray Train
worker actors ran (the state API served by the head's dashboard) and compares it with the node
ids of the two nodes, told apart by a custom resource each node declares.

Teardown: each node is a ``ray start --block`` process started in its own session; it is sent
SIGTERM (Ray then stops that node's processes) and anything left in its session is killed.
``ray stop`` is not used: it stops every Ray process on the machine, including clusters that
other programs run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from longctx.parallel.ports import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 600  # per node; a loaded 2-core machine may need minutes


def ray_env() -> dict[str, str]:
    """Environment of the Ray nodes and the driver: no usage statistics, the compiled DeepSpeed
    op cache, no Ray memory monitor (on this shared machine other programs' memory would make it
    kill our workers) and a patient node start-up (a loaded 2-core machine may need minutes)."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_memory_monitor_refresh_ms": "0",
        "RAY_raylet_start_wait_time_s": "300",
        "TORCH_EXTENSIONS_DIR": str(REPO / ".venv" / "torch_extensions"),
        "COLUMNS": "200",
    }


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    """``ray start ARGS --block`` in a new session (so that its processes can be found and ended
    by session id); output to ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", *args, "--block"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ray_env(),
            start_new_session=True,
        )


def node_agent_ports() -> list[str]:
    """Per-node ports that default to fixed numbers (two nodes on one host would collide)."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def stop_node(node: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the node's ``ray start --block`` (it then stops the node's Ray processes), wait,
    and kill whatever is left in its session."""
    if node.poll() is None:
        node.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=grace_s)
    listed = subprocess.run(
        ["ps", "-o", "pid=", "-s", str(node.pid)], capture_output=True, text=True
    ).stdout.split()
    for pid in listed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    if node.poll() is None:
        node.wait(timeout=10)


def python_in_cluster(code: str, *args: str, timeout: float = 120) -> str:
    """The last line ``code`` prints, run in a fresh interpreter (a Ray driver must not live in
    the test process; Ray may print its own lines before)."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ray_env(),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


NODES_CODE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps({n["NodeID"]: sorted(n["Resources"]) for n in ray.nodes() if n["Alive"]}))
"""

WORKER_NODES_CODE = """
import json, sys
from ray.util.state import list_actors
actors = list_actors(address=sys.argv[1], filters=[("class_name", "=", "RayTrainWorker")],
                     detail=True, limit=100)
print(json.dumps(sorted(actor.node_id for actor in actors)))
"""


def alive_nodes(address: str) -> dict[str, list[str]]:
    """{node id: its resource names} of the cluster's alive nodes."""
    return json.loads(python_in_cluster(NODES_CODE, address))


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> Iterator[dict]:
    """A head and a second node on 127.0.0.1, 2 CPUs each, marked by the custom resources
    ``head_node`` and ``second_node``; yields the GCS and dashboard addresses and node ids."""
    port, dashboard_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    # Ray's socket paths must stay under 107 bytes: a short directory of its own, not tmp_path.
    ray_temp = tempfile.mkdtemp(prefix="lcray-", dir="/tmp")
    nodes = []
    try:
        nodes.append(
            start_node(
                [
                    "--head",
                    "--node-ip-address=127.0.0.1",
                    f"--port={port}",
                    "--num-cpus=2",
                    "--num-gpus=0",
                    '--resources={"head_node": 1}',
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}",
                    f"--ray-client-server-port={free_port()}",
                    "--object-store-memory=200000000",
                    f"--temp-dir={ray_temp}",
                    *node_agent_ports(),
                ],
                tmp_path / "head.log",
            )
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while subprocess.run(
            [str(BIN / "ray"), "status", f"--address={address}"],
            capture_output=True,
            env=ray_env(),
        ).returncode:
            alive = nodes[0].poll() is None and time.monotonic() < deadline
            assert alive, (tmp_path / "head.log").read_text()
            time.sleep(2)
        nodes.append(
            start_node(
                [
                    f"--address={address}",
                    "--node-ip-address=127.0.0.1",
                    "--num-cpus=2",
                    "--num-gpus=0",
                    '--resources={"second_node": 1}',
                    "--object-store-memory=200000000",
                    *node_agent_ports(),
                ],
                tmp_path / "second.log",
            )
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(found := alive_nodes(address)) < 2:
            alive = nodes[1].poll() is None and time.monotonic() < deadline
            assert alive, (tmp_path / "second.log").read_text()
            time.sleep(2)
        by_resource = {
            name: node for node, names in found.items() for name in names if name.endswith("_node")
        }
        yield {
            "address": address,
            "dashboard": f"http://127.0.0.1:{dashboard_port}",
            "head": by_resource["head_node"],
            "second": by_resource["second_node"],
        }
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(ray_temp, ignore_errors=True)


@pytest.mark.heavy
@pytest.mark.slow
def test_two_workers_on_two_nodes_one_each(two_node_cluster: dict, tmp_path: Path):
    run_dir = tmp_path / "run"
    command = [
        str(BIN / "longctx"),
        "train",
        str(TINY),
        "--address",
        two_node_cluster["address"],
        "--workers",
        "2",
        "--placement",
        "STRICT_SPREAD",
    ]
    for override in (
        f"trainer.run_dir={run_dir}",
        "trainer.steps=2",
        "trainer.eval_every=0",
        "trainer.ckpt_every=2",
        "data.tasks={text: 1.0}",
    ):
        command += ["--set", override]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=ray_env()
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Ray cluster at {two_node_cluster['address']} (4 CPUs, 0 GPUs)" in result.stdout
    assert (run_dir / "checkpoints" / "step_000002").is_dir()
    worker_nodes = json.loads(python_in_cluster(WORKER_NODES_CODE, two_node_cluster["dashboard"]))
    assert worker_nodes == sorted([two_node_cluster["head"], two_node_cluster["second"]])
