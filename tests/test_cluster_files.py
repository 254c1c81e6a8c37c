"""The cluster launch files in launch/cluster/ (issue 8 item 5):

- ``ray-cluster.yaml`` against Ray's own cluster-config JSON schema (``ray/autoscaler/
  ray-schema.json``, with jsonschema) and Ray's launcher validation after it fills in the AWS
  defaults (``prepare_config`` + ``validate_config``, what ``ray up`` runs first);
- ``rayjob.yaml`` against the field names of KubeRay's RayJob CRD (API ray.io/v1): only known
  fields at each level, the required ones present, string-valued rayStartParams, containers
  with a name and an image; its entrypoint is a ``longctx train ... --address auto`` command line
  that our own parser accepts, for a recipe that exists, run in the Dockerfile's WORKDIR;
- ``slurm.sbatch``: shellcheck-clean, and executed on this machine as a one-node allocation:
  stand-ins for ``srun`` (runs the command here) and ``scontrol show hostnames`` on PATH, the
  SLURM_* variables a real allocation sets; it starts a Ray head, runs the tiny recipe for two
  steps through ``longctx train --address HEAD:PORT`` and stops the head.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from longctx.launch.cli import build_parser
from longctx.parallel.ports import free_port

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "launch" / "cluster"
BIN = Path(sys.executable).parent
TINY = REPO / "recipes" / "tiny.yaml"


# --- ray-cluster.yaml ----------------------------------------------------------------------------


def ray_cluster_config() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_ray_cluster_yaml_matches_rays_schema():
    jsonschema.validate(ray_cluster_config(), ray_schema())


def test_rays_schema_rejects_a_broken_copy():
    """The check above has teeth: an unknown top-level key and a missing provider fail it."""
    broken = copy.deepcopy(ray_cluster_config())
    broken["max_worker"] = broken.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())
    broken = copy.deepcopy(ray_cluster_config())
    del broken["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


def test_ray_cluster_yaml_passes_the_launchers_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(ray_cluster_config())
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


def test_ray_cluster_has_h100_workers_and_installs_this_repository():
    config = ray_cluster_config()
    nodes = config["available_node_types"]
    assert nodes["head"]["resources"] == {"CPU": 0}  # training workers never land on the head
    gpu = nodes["gpu_h100x8"]
    assert gpu["resources"]["GPU"] == 8
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge"
    assert gpu["max_workers"] == config["max_workers"] == 8  # 64 GPUs for llama3-8b-1m
    # The repository root (where `ray up` runs) is copied to the nodes and installed there.
    ((remote, local),) = config["file_mounts"].items()
    assert local == "." and (REPO / local / "pyproject.toml").is_file()
    assert f"python3 -m pip install -q -e {remote}" in config["setup_commands"]
    import ray

    assert f'"ray[default,train]=={ray.__version__}"' in " ".join(config["setup_commands"])


# --- rayjob.yaml ---------------------------------------------------------------------------------
# Field names of the RayJob CRD (ray.io/v1; kuberay ray-operator/apis/ray/v1/rayjob_types.go and
# raycluster_types.go) at each level this manifest uses.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy",
    "entrypoint", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId",
    "managedBy", "metadata", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
    "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend",
    "ttlSecondsAfterFinished",
}  # fmt: skip
RAYCLUSTER_SPEC_FIELDS = {
    "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
    "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP_FIELDS = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts",
    "rayStartParams", "replicas", "scaleStrategy", "suspend", "template",
}  # fmt: skip
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def rayjob() -> dict:
    return yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())


def check_pod_template(template: dict, where: str) -> list[dict]:
    """The containers of a pod template, each with a name and an image."""
    containers = template["spec"]["containers"]
    assert containers, f"{where}: no containers"
    for container in containers:
        assert set(container) >= {"name", "image"}, where
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", container["name"]), where
    return containers


def test_rayjob_has_only_crd_fields_and_the_required_ones():
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert isinstance(spec["shutdownAfterJobFinishes"], bool)
    yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML document inside a string
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, set(cluster) - RAYCLUSTER_SPEC_FIELDS
    import ray

    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS and "template" in head
    groups = [("head", head)] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for name, group in groups:
        # rayStartParams is map[string]string in the CRD: numbers must be quoted.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name
        check_pod_template(group["template"], name)
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_workers_expose_eight_gpus_each():
    (group,) = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == group["rayStartParams"][
        "num-gpus"
    ] == "8"  # fmt: skip


def test_rayjob_entrypoint_is_a_longctx_train_command_our_cli_accepts():
    entrypoint = rayjob()["spec"]["entrypoint"]
    directory_change, _, command = entrypoint.partition(" && ")
    workdir = re.search(r"^WORKDIR (\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    assert directory_change == f"cd {workdir}"
    words = shlex.split(command)
    assert words[:2] == ["longctx", "train"]
    args = build_parser().parse_args(words[1:])
    assert args.address == "auto"
    assert (REPO / args.recipe).is_file()
    # Its overrides point the recipe at the volume mounted in the pods.
    assert "trainer.run_dir=/shared/runs/llama2-7b-yarn-32k" in args.set


# --- slurm.sbatch --------------------------------------------------------------------------------


def test_slurm_script_is_shellcheck_clean():
    result = subprocess.run(
        [str(BIN / "shellcheck"), str(CLUSTER / "slurm.sbatch")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


SRUN_STANDIN = """#!/bin/bash
# Stand-in for SLURM's srun on a one-node allocation: drop srun's options, run the command here.
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "$@"
"""
SCONTROL_STANDIN = """#!/bin/bash
# Stand-in for `scontrol show hostnames LIST`: a comma-separated list, one name per line.
[[ $1 == show && $2 == hostnames ]] || exit 1
tr ',' '\\n' <<<"$3"
"""


def session_processes(session: int, wait_s: float = 0.0) -> dict[int, str]:
    """{pid: command} of the processes still in ``session``, after waiting up to ``wait_s``
    seconds for it to empty."""
    deadline = time.monotonic() + wait_s
    while True:
        listed = subprocess.run(
            ["ps", "-o", "pid=,args=", "-s", str(session)], capture_output=True, text=True
        ).stdout
        found = dict(line.strip().split(" ", 1) for line in listed.splitlines() if line.strip())
        if not found or time.monotonic() >= deadline:
            return {int(pid): command for pid, command in found.items()}
        time.sleep(1)


def write_standin(directory: Path, name: str, text: str) -> None:
    path = directory / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.slow
@pytest.mark.heavy
def test_slurm_script_runs_the_tiny_recipe_on_a_one_node_allocation(tmp_path: Path):
    standins = tmp_path / "bin"
    standins.mkdir()
    write_standin(standins, "srun", SRUN_STANDIN)
    write_standin(standins, "scontrol", SCONTROL_STANDIN)
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PATH": f"{standins}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_CPUS_PER_TASK": "2",
        "LONGCTX_RAY_PORT": str(free_port()),
        "LONGCTX_DASHBOARD_PORT": str(free_port()),
        "LONGCTX_JOIN_TIMEOUT": "600",
        "TORCH_EXTENSIONS_DIR": str(REPO / ".venv" / "torch_extensions"),
        # Other programs' memory on this shared machine must not make Ray kill our workers.
        "RAY_memory_monitor_refresh_ms": "0",
        "RAY_raylet_start_wait_time_s": "300",  # a loaded 2-core machine starts nodes slowly
        "COLUMNS": "200",
    }
    command = ["bash", str(CLUSTER / "slurm.sbatch"), str(TINY), "--workers", "1"]
    for override in (
        f"trainer.run_dir={run_dir}",
        "trainer.steps=2",
        "trainer.eval_every=0",
        "trainer.ckpt_every=2",
        "data.tasks={text: 1.0}",
    ):
        command += ["--set", override]
    script = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = script.communicate(timeout=900)
        # The trap ended the head's `ray start --block`; its Ray processes exit within seconds.
        leftovers = session_processes(script.pid, wait_s=60)
    finally:
        for pid in session_processes(script.pid):  # only after a failure or a timeout
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert script.returncode == 0, output
    # The script's default head address: the node's first address, as srun's hostname says.
    host_ip = subprocess.run(["hostname", "--ip-address"], capture_output=True, text=True)
    address = f"{host_ip.stdout.split()[0]}:{env['LONGCTX_RAY_PORT']}"
    assert f"Ray head on localhost ({address})" in output
    assert f"Ray cluster at {address} (2 CPUs" in output
    assert (run_dir / "checkpoints" / "step_000002").is_dir()
    assert leftovers == {}, f"still running after the script's EXIT trap: {leftovers}"
