"""Scale-out on a real local Ray (2 CPUs, no dashboard): the eval grid and batch composition on actors,
lost workers, a killed driver, and the one-line error without the extra."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import EXAMPLES
from tiny_models import one_thread  # noqa: F401  (fixture)

from lorahub_cli.api import evaluate
from lorahub_cli.eval import tasks
from lorahub_cli.eval.methods import EvalConfig
from lorahub_cli.eval.runner import cell_path
from lorahub_cli.registry import Store

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
    ray.init(
        num_cpus=2, include_dashboard=False, _temp_dir=str(root), log_to_driver=False, logging_level=logging.WARNING
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        if own:
            shutil.rmtree(root, ignore_errors=True)


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
    result = cli(
        "eval", "tasks", task_dir, "--base-model", base_dir, "--methods", methods, "--out", local, *QUICK, "--json"
    )
    assert result.code == 0, result.stderr
    result = cli(
        "eval",
        "tasks",
        task_dir,
        "--base-model",
        base_dir,
        "--methods",
        methods,
        "--out",
        remote,
        *QUICK,
        "--ray",
        "--workers",
        "2",
        "--json",
    )
    assert result.code == 0, result.stderr
    expected = cells_of(local)
    assert len(expected) == 2 * 2 * 6 and cells_of(remote) == expected  # predictions, scores, choices, search losses
    assert json.loads(result.stdout)["tasks"] == json.loads((local / "results.json").read_text())["tasks"]


def test_without_ray_the_flag_is_one_line_naming_the_extra(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    result = cli("eval", "demo", "--ray", "--methods", "zero-shot")
    assert result.code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert 'pip install "lorahub-cli[ray]"' in result.stderr and "Traceback" not in result.stderr


def run_api(base_dir, home, task_dir, out, methods, on_event, **config):
    from lorahub_cli.scale.cluster import RayOptions

    config = EvalConfig(
        **{
            "base_model": str(base_dir),
            "num_modules": 2,
            "budget": 3,
            "limit": 3,
            "max_new_tokens": 3,
            "dtype": "float32",
            **config,
        }
    )
    store = Store(home)
    return evaluate(
        tasks.load_task_dir(task_dir),
        methods,
        [1, 2],
        config,
        out,
        store=store,
        ray=RayOptions(workers=2),
        on_event=on_event,
    )


def test_a_cell_lost_with_its_actor_runs_again_and_every_cell_finishes_once(ray_cluster, t5_home, task_dir, tmp_path):
    home, base_dir = t5_home
    events = []

    def on_event(kind, job, actor):
        events.append((kind, job.label))
        # The first cell started after one has finished: its actor is killed while it holds the cell.
        if kind == "started" and any(k == "done" for k, _ in events) and not any(k == "retried" for k, _ in events):
            if sum(k == "started" for k, _ in events) == 3:
                ray_cluster.kill(actor)

    out = tmp_path / "run"
    summary = run_api(base_dir, home, task_dir, out, ["zero-shot", "fft"], on_event, fft_epochs=4)
    done = [label for kind, label in events if kind == "done"]
    assert sorted(done) == sorted(set(done)) and len(done) == 2 * 2 * 2  # each cell finished exactly once
    assert [kind for kind, _ in events].count("retried") == 1 and "failed" not in [kind for kind, _ in events]
    assert len(cells_of(out)) == 8 and set(summary["average"]) == {"zero-shot", "fft"}
    fresh = tmp_path / "local"
    evaluate(
        tasks.load_task_dir(task_dir),
        ["zero-shot", "fft"],
        [1, 2],
        EvalConfig(base_model=str(base_dir), limit=3, max_new_tokens=3, dtype="float32", fft_epochs=4),
        fresh,
    )
    assert cells_of(out) == cells_of(fresh)


def test_a_cell_failing_for_its_own_reason_is_reported_once_not_retried(ray_cluster, t5_home, task_dir, tmp_path):
    home, base_dir = t5_home
    store = Store(home)
    broken = store.get("sentiment").path / "adapter_model.safetensors"
    broken.write_bytes(broken.read_bytes()[:-8])  # every lorahub cell composes all four adapters, this one too
    events = []
    out = tmp_path / "run"
    with pytest.raises(Exception) as failure:
        run_api(
            base_dir,
            home,
            task_dir,
            out,
            ["zero-shot", "lorahub"],
            lambda kind, job, actor: events.append((kind, job.label)),
            num_modules=4,
        )
    message = str(failure.value)
    assert (
        message.startswith("4 of 8 cells failed")
        and "file 'adapter_model.safetensors' of adapter 'sentiment'" in message
    )
    failed = [label for kind, label in events if kind == "failed"]
    assert sorted(failed) == sorted(set(failed)) and len(failed) == 4 and all("lorahub" in f for f in failed)
    assert "retried" not in [kind for kind, _ in events]
    assert sorted(cells_of(out)) == sorted(
        cell_path(out, t, s, "zero-shot").relative_to(out).as_posix() for t in ("capitals", "addition") for s in (1, 2)
    )


def test_a_resumed_run_after_a_driver_kill_computes_only_the_missing_cells(
    cli, ray_cluster, t5_home, task_dir, tmp_path
):
    _, base_dir = t5_home
    out = tmp_path / "run"
    args = [
        "eval",
        "tasks",
        str(task_dir),
        "--base-model",
        str(base_dir),
        "--methods",
        "zero-shot,fft",
        "--seeds",
        "1,2,3",
        "--limit",
        "3",
        "--max-new-tokens",
        "3",
        "--dtype",
        "float32",
        "--out",
        str(out),
        "--workers",
        "2",
    ]
    address = ray_cluster.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, "-m", "lorahub_cli", *args, "--ray", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("cells/*/seed-*/*.json")):
            assert driver.poll() is None, driver.stderr.read()
            assert time.monotonic() < deadline, "no cell finished in time"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    before = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/seed-*/*.json")}
    assert 0 < len(before) < 12
    result = cli(*args, "--ray")
    assert result.code == 0, result.stderr
    after = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/seed-*/*.json")}
    assert len(after) == 12 and all(after[p] == before[p] for p in before)  # finished cells were left alone
    assert not list(out.rglob("*.tmp*"))


# --- batch composition -----------------------------------------------------------------------------


@pytest.fixture
def shots_dir(tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    for task in ("capitals", "addition", "weekdays"):
        shutil.copy(EXAMPLES / "shots" / f"{task}.jsonl", folder)
    return folder


COMPOSE = ["-n", "2", "--budget", "4", "--dtype", "float32", "--json"]


def recipes(out: Path) -> dict:
    found = {}
    for path in sorted(out.glob("*/lorahub_recipe.json")):
        recipe = json.loads(path.read_text())
        found[path.parent.name] = ([(m["id"], m["weight"]) for m in recipe["modules"]], recipe["loss"])
    return found


def test_compose_a_folder_resumes_and_reports_each_task(cli, t5_home, shots_dir, tmp_path):
    _, base_dir = t5_home
    (shots_dir / "broken.jsonl").write_text("not json\n")
    out = tmp_path / "out"
    (out / "weekdays").mkdir(parents=True)
    (out / "weekdays" / "mine.txt").write_text("a user's file")  # not lorahub's: never replaced
    result = cli("compose", "--tasks", shots_dir, "--out", out, "--base-model", base_dir, *COMPOSE)
    assert result.code == 1 and "2 of 4 tasks failed" in result.stderr
    summary = json.loads(result.stdout)
    status = {row["task"]: row["status"] for row in summary["tasks"]}
    assert status == {"addition": "composed", "broken": "failed", "capitals": "composed", "weekdays": "failed"}
    assert summary["composed"] == 2 and summary["failed"] == 2
    assert (out / "weekdays" / "mine.txt").read_text() == "a user's file"
    first = {p: p.stat().st_mtime_ns for p in out.glob("*/adapter_model.safetensors")}
    assert len(first) == 2 and all(row["evaluations"] == 4 for row in summary["tasks"] if row["status"] == "composed")

    (shots_dir / "broken.jsonl").unlink()
    shutil.rmtree(out / "weekdays")
    result = cli("compose", "--tasks", shots_dir, "--out", out, "--base-model", base_dir, *COMPOSE)
    assert result.code == 0, result.stderr
    rows = json.loads(result.stdout)["tasks"]
    assert [(r["task"], r["status"]) for r in rows] == [
        ("addition", "done earlier"),
        ("capitals", "done earlier"),
        ("weekdays", "composed"),
    ]
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # resumed: the finished ones were kept


def test_compose_a_folder_on_ray_gives_the_local_compositions(cli, ray_cluster, t5_home, shots_dir, tmp_path):
    _, base_dir = t5_home
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert cli("compose", "--tasks", shots_dir, "--out", local, "--base-model", base_dir, *COMPOSE).code == 0
    result = cli(
        "compose",
        "--tasks",
        shots_dir,
        "--out",
        remote,
        "--base-model",
        base_dir,
        *COMPOSE,
        "--ray",
        "--workers",
        "2",
        "--ray-data",
        "object-store",
    )
    assert result.code == 0, result.stderr
    assert [r["status"] for r in json.loads(result.stdout)["tasks"]] == ["composed"] * 3
    assert recipes(remote) == recipes(local) and len(recipes(local)) == 3
    for task in ("capitals", "addition", "weekdays"):
        assert (remote / task / "adapter_model.safetensors").read_bytes() == (
            local / task / "adapter_model.safetensors"
        ).read_bytes()
    # The workers read the registry and the model from the copy shipped through the object store.
    from ray._private.worker import global_worker

    shipped = Path(global_worker.node.get_session_dir_path()) / "lorahub-shipped"
    assert len(list(shipped.glob("*/registry.sqlite"))) == 1 and len(list(shipped.glob("*/config.json"))) == 1


def test_a_bare_ray_flag_means_a_local_ray_and_keeps_the_next_argument():
    from lorahub_cli.cli._scale import optional_address

    assert optional_address(["eval", "demo", "--ray"]) == ["eval", "demo", "--ray", "local"]
    assert optional_address(["eval", "demo", "--ray", "--json"]) == ["eval", "demo", "--ray", "local", "--json"]
    assert optional_address(["eval", "tasks", "--ray", "my-tasks/"]) == ["eval", "tasks", "--ray", "local", "my-tasks/"]
    assert optional_address(["--ray", "auto"]) == ["--ray", "auto"]
    assert optional_address(["--ray", "10.0.0.1:6379"]) == ["--ray", "10.0.0.1:6379"]


def test_ray_options_without_ray_are_a_usage_error(cli, tmp_path):
    result = cli("eval", "demo", "--workers", "2", "--out", tmp_path / "run")
    assert result.code == 2 and "--workers and --ray-data apply to Ray runs" in result.stderr


def test_an_address_nothing_answers_on_fails_in_seconds_naming_it():
    from lorahub_cli.errors import LorahubError
    from lorahub_cli.scale.cluster import _check_reachable

    start = time.monotonic()
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1", "no-port"):
        with pytest.raises(LorahubError, match=f"no Ray cluster answers at '{address}'"):
            _check_reachable(address)
    assert time.monotonic() - start < 30
