"""Security: nothing longctx reads can run code, and its Ray cluster is not reachable from
the network.

- Checkpoint files are never unpickled: weights come from safetensors, the RNG files through
  ``torch.load(weights_only=True)``. A pickle whose unpickling would run code (it would create a
  marker file) put in their place, with a manifest whose sha256 matches it (an attacker who can
  write the checkpoint can rewrite the manifest too), is refused and the marker never appears.
  (Hugging Face ``.bin`` weights: ``test_hf_io.test_a_pickle_that_is_not_weights_only_is_refused``.)
- Recipes are read with a safe YAML loader: a ``!!python/object/apply`` tag is refused.
- The embedded Ray cluster (``launch.ray_cluster``) listens on 127.0.0.1 only, dashboard
  included: every listening socket of its processes is checked.
- With ``--address`` longctx sets nothing that would turn Ray's authentication off: the variables
  and runtime environment it passes to a joined cluster are inspected.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from longctx.checkpoint.full_state import rng_state_to_plain
from longctx.checkpoint.sharded_state import INDEX_FILE, STATE_FORMAT, part_file
from longctx.checkpoint.store import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    capture_rng_state,
    load_model_state_dict,
    read_rng_file,
    restore_rng_state,
)
from longctx.config.recipe import load_recipe
from longctx.errors import LongctxError
from longctx.launch import ray_cluster

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this object calls ``Path(marker).touch()``: code run by loading a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _write_pickle_bomb(path: Path, marker: Path) -> None:
    with path.open("wb") as handle:
        pickle.dump({"state": _Payload(marker)}, handle)


def test_the_payload_does_run_code_when_unpickled_unsafely(tmp_path):
    """Control: the bomb is real (plain pickle.load runs it)."""
    bomb, marker = tmp_path / "bomb.pt", tmp_path / "marker"
    _write_pickle_bomb(bomb, marker)
    with bomb.open("rb") as handle:
        pickle.load(handle)
    assert marker.exists()


def test_an_rng_file_round_trips_through_weights_only_loading(tmp_path):
    random.seed(4), np.random.seed(4), torch.manual_seed(4)
    torch.save(rng_state_to_plain(capture_rng_state()), tmp_path / "rng_rank_00000.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    restore_rng_state(read_rng_file(tmp_path, {"rng_states": ["rng_rank_00000.pt"]}, rank=0))
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_a_pickle_bomb_rng_file_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    _write_pickle_bomb(tmp_path / "rng_rank_00000.pt", marker)
    with pytest.raises(LongctxError, match="is not a plain tensor file") as caught:
        read_rng_file(tmp_path, {"rng_states": ["rng_rank_00000.pt"]}, rank=0)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def _checkpoint_around(directory: Path, files: dict[str, bytes]) -> None:
    """A checkpoint directory whose manifest lists ``files`` with their true sha256."""
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    manifest = {
        "format": MANIFEST_FORMAT,
        "rng_states": ["rng_rank_00000.pt"],
        "step": 1,
        "tokens_seen": 64,
        "data_cursor": {},
        "world_size": 1,
        "zero_stage": 0,
        "recipe_hash": "0" * 16,
        "counters": {},
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_pickle_bomb_in_place_of_the_weights_is_refused_and_never_run(tmp_path):
    """Every file of a sharded checkpoint is a pickle bomb with its true sha256 (a shard, the
    RNG file, and a DCP-style ``.metadata``), the JSON index pointing at the bomb shard: the
    load refuses with one line and the payload never runs."""
    marker = tmp_path / "marker"
    _write_pickle_bomb(tmp_path / "bomb.pt", marker)
    bomb = (tmp_path / "bomb.pt").read_bytes()
    shard = part_file(0, 0)
    index = {
        "format": STATE_FORMAT,
        "checkpoint_id": "0" * 32,
        "world_size": 1,
        "moments": False,
        "files": [[shard]],
        "tensors": {"embed.weight": {"kind": "param", "shape": [2], "fragments": [[shard, 0, 2]]}},
    }
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000001"
    files = {
        INDEX_FILE: json.dumps(index).encode(),
        shard: bomb,
        "rng_rank_00000.pt": bomb,
        ".metadata": bomb,
    }
    _checkpoint_around(checkpoint, files)
    with pytest.raises(LongctxError) as caught:
        load_model_state_dict(checkpoint)
    assert "\n" not in str(caught.value) and f"shard {shard} is truncated or unreadable" in str(
        caught.value
    )
    assert not marker.exists()


def test_a_recipe_with_a_python_object_tag_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
        f"['{marker}']]\n"
    )
    with pytest.raises(LongctxError) as caught:
        load_recipe(recipe)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


EMBEDDED_PROBE = """
import json, sys, psutil
from longctx.launch.ray_cluster import ray_cluster
with ray_cluster(None, 1) as resources:
    import ray
    me = psutil.Process()
    listening = set()
    for process in [me, *me.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening.update(c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN)
    context = ray.get_runtime_context()
    print(json.dumps({
        "listening": sorted(listening),
        "gcs": context.gcs_address,
        "node": ray.nodes()[0]["NodeManagerAddress"],
        "dashboard": ray.worker.get_dashboard_url(),
        "processes": len(me.children(recursive=True)),
    }))
"""


@pytest.mark.slow
def test_embedded_ray_cluster_and_dashboard_listen_on_loopback_only(tmp_path):
    """Started in a fresh interpreter (Ray reads its single-machine switch when first
    imported), as ``longctx train`` starts it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    result = subprocess.run(
        [sys.executable, "-c", EMBEDDED_PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["processes"] > 0 and seen["listening"], seen  # Ray's servers were found
    for address in seen["listening"]:  # IPv4 loopback, also as an IPv4-mapped IPv6 address
        ip = ipaddress.ip_address(address)
        assert (getattr(ip, "ipv4_mapped", None) or ip).is_loopback, seen
    assert seen["gcs"].startswith("127.0.0.1:") and seen["node"] == "127.0.0.1"
    assert seen["dashboard"].startswith("127.0.0.1:"), seen


def test_a_joined_cluster_gets_no_setting_that_disables_authentication():
    """What ``ray_cluster(address=...)`` sets in the driver's environment, passes to the job's
    processes and gives each worker: no authentication switch at all (Ray's own settings, and
    whatever the user exported, stay in force). Only the embedded cluster, reachable from this
    machine alone, turns token authentication off."""
    address = "10.1.2.3:6379"
    gcs = ray_cluster._gcs_address(address)
    driver_env = {**ray_cluster._DRIVER_ENV, "RAY_ADDRESS": gcs}
    runtime_env = ray_cluster._joined_runtime_env(address)
    worker_env = ray_cluster._worker_env(use_gpu=False, embedded=False)
    for settings in (driver_env, runtime_env.get("env_vars", {}), worker_env):
        assert not [key for key in settings if "AUTH" in key.upper() or "TOKEN" in key.upper()]
    assert runtime_env == {"env_vars": {"RAY_ADDRESS": address}}
    assert set(ray_cluster._joined_runtime_env("ray://10.1.2.3:10001")) == set()
    assert ray_cluster._EMBEDDED_ENV["RAY_AUTH_MODE"] == "disabled"  # the embedded one only


def test_no_module_of_longctx_sets_ray_authentication_outside_the_embedded_settings():
    """A source scan of the package: the only mention of Ray's auth switch is the embedded
    cluster's environment table."""
    hits = []
    for path in REPO.rglob("*.py"):
        if {".venv", "tests"} & set(path.relative_to(REPO).parts):
            continue
        for line in path.read_text().splitlines():
            if "RAY_AUTH" in line:
                hits.append((path.relative_to(REPO).as_posix(), line.strip()))
    assert hits == [("launch/ray_cluster.py", '"RAY_AUTH_MODE": "disabled",')]
