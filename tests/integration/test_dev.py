"""`make dev` brings up a kubetask of its own and runs the example task; `make down` ends it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kubetask_cli import cluster

from .conftest import REPO, run_command

pytestmark = pytest.mark.integration


def make(target: str, cluster_dir: Path) -> subprocess.CompletedProcess[str]:
    # The session's cluster stays out of it: make dev finds its own through CLUSTER_DIR.
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "MAKEFLAGS")}
    return run_command(
        ["make", "-s", target, f"CLUSTER_DIR={cluster_dir}"], env=env, timeout=240, cwd=REPO
    )


@pytest.mark.timeout(300)
def test_make_dev_runs_the_example_task_and_make_down_stops_everything(tmp_path: Path) -> None:
    cluster_dir = tmp_path / "dev"
    try:
        dev = make("dev", cluster_dir)
        assert dev.returncode == 0, dev.stdout + dev.stderr
        assert '"greeting": "Hello, kubetask!"' in dev.stdout, dev.stdout
        assert "make down" in dev.stdout
        state = cluster.ClusterState.load(cluster_dir)
        assert state is not None
        started = [
            int((tmp_path / f"dev-{name}.pid").read_text()) for name in ("operator", "worker")
        ]
        assert all(cluster.pid_alive(pid) for pid in started)
    finally:
        down = make("down", cluster_dir)

    assert down.returncode == 0, down.stdout + down.stderr
    assert not any(cluster.pid_alive(pid) for pid in [*started, *state.pids.values()])
    assert not cluster_dir.exists()
