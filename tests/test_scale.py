"""Scale-out on a real local Ray (2 CPUs, no dashboard): the eval grid and batch composition on actors,
lost workers, a killed driver, and the one-line error without the extra."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES
from lorahub_cli.eval import tasks
from lorahub_cli.eval.api import evaluate
from lorahub_cli.eval.methods import EvalConfig
from lorahub_cli.eval.runner import cell_path
from lorahub_cli.registry import Store
from tiny_models import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
NO_RAY = "the ray extra is not installed (pip install -e '.[ray]'); CI installs it"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray with 2 CPUs and no dashboard, its files under the test tmp path, shut down afterwards."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    root = tmp_path_factory.mktemp("ray")
    # Ray's sockets live under its temp dir, and a Unix socket path has at most 107 bytes.
    own = len(str(root)) > 45
    if own:
        root = Path(tempfile.mkdtemp(prefix="lhray-"))
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(root), log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()
        if own:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def task_dir(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    for task in ("capitals", "addition"):
        rows = (EXAMPLES / "data" / f"{task}.jsonl").read_text().splitlines(True)[:12]
        (folder / f"{task}.jsonl").write_text("".join(rows))
    return folder


QUICK = ["--seeds", "1,2", "-n", "2", "--budget", "3", "--limit", "3", "--max-new-tokens", "3", "--dtype", "float32"]


def cells_of(out: Path) -> dict[str, dict]:
    found = {}
    for path in sorted(out.glob("cells/*/seed-*/*.json")):
        cell = json.loads(path.read_text())
        cell.pop("seconds")
        found[path.relative_to(out).as_posix()] = cell
    return found


def test_the_grid_on_ray_matches_the_local_run_cell_by_cell(cli, ray_cluster, t5_home, task_dir, tmp_path):
    _, base_dir = t5_home
    methods = "zero-shot,icl,lorahub,batchcomp,instance,fft"
    local, remote = tmp_path / "local", tmp_path / "ray"
    result = cli("eval", "tasks", task_dir, "--base-model", base_dir, "--methods", methods, "--out", local, *QUICK, "--json")
    assert result.code == 0, result.stderr
    result = cli("eval", "tasks", task_dir, "--base-model", base_dir, "--methods", methods, "--out", remote, *QUICK,
                 "--ray", "--workers", "2", "--json")
    assert result.code == 0, result.stderr
    expected = cells_of(local)
    assert len(expected) == 2 * 2 * 6 and cells_of(remote) == expected  # predictions, scores, choices, search losses
    assert json.loads(result.stdout)["tasks"] == json.loads((local / "results.json").read_text())["tasks"]


def test_without_ray_the_flag_is_one_line_naming_the_extra(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    result = cli("eval", "demo", "--ray", "--methods", "zero-shot")
    assert result.code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert 'pip install "lorahub-cli[ray]"' in result.stderr and "Traceback" not in result.stderr
