"""Mirroring from a Hub: the real huggingface_hub client against the loopback server of tests/hubserver.py."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from urllib.parse import unquote

import pytest
import torch
from conftest import EXAMPLES
from hubserver import TOKEN
from safetensors.torch import load_file

from lorahub_cli.errors import HubError, InputError, NotFoundError
from lorahub_cli.io import sha256_file
from lorahub_cli.registry import Store
from lorahub_cli.registry.mirror import add_hub


def adapter_files(task: str, pickle: bool = False) -> dict[str, bytes]:
    folder = EXAMPLES / "adapters" / task
    files = {"adapter_config.json": (folder / "adapter_config.json").read_bytes()}
    if pickle:
        buffer = io.BytesIO()
        torch.save(load_file(folder / "adapter_model.safetensors"), buffer)
        files["adapter_model.bin"] = buffer.getvalue()
    else:
        files["adapter_model.safetensors"] = (folder / "adapter_model.safetensors").read_bytes()
    return files


@pytest.fixture
def online(hub, monkeypatch, tmp_path):
    """Point this process's huggingface_hub at the loopback server (it read HF_ENDPOINT at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub


def test_mirror_pins_the_commit_and_skips_a_rerun(online, lorahub_home):
    sha = online.commit("lib/sentiment", adapter_files("sentiment"))
    store = Store(lorahub_home)
    result = add_hub(store, "lib/sentiment")
    record = store.get("lib/sentiment")
    assert result.status == "added" and record.revision == sha and record.source == "lib/sentiment"
    assert record.files["adapter_model.safetensors"] == sha256_file(
        EXAMPLES / "adapters/sentiment/adapter_model.safetensors"
    )
    assert add_hub(store, "lib/sentiment").status == "skipped"
    new_sha = online.commit("lib/sentiment", {"README.md": b"---\nlibrary_name: peft\n---\nhello\n"})
    assert add_hub(store, "lib/sentiment").status == "updated" and store.get("lib/sentiment").revision == new_sha
    # Pinning an older commit brings that commit back.
    add_hub(store, "lib/sentiment", revision=sha)
    assert store.get("lib/sentiment").revision == sha and "README.md" not in store.get("lib/sentiment").files
    assert any(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h in online.requests)


def test_pickle_adapter_from_the_hub_is_converted(online, lorahub_home):
    files = adapter_files("addition", pickle=True)
    online.commit("lorahub/flan_t5_large-addition", files)
    store = Store(lorahub_home)
    add_hub(store, "lorahub/flan_t5_large-addition")
    record = store.get("lorahub/flan_t5_large-addition")
    assert set(record.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert record.converted_from["sha256"] == __import__("hashlib").sha256(files["adapter_model.bin"]).hexdigest()
    original = load_file(EXAMPLES / "adapters/addition/adapter_model.safetensors")
    converted = load_file(record.path / "adapter_model.safetensors")
    assert all(torch.equal(original[k], converted[k]) for k in original)


def test_hub_errors_are_one_line_with_a_fix(online, lorahub_home, monkeypatch):
    store = Store(lorahub_home)
    with pytest.raises(NotFoundError, match="repository 'lib/missing' was not found"):
        add_hub(store, "lib/missing")
    online.commit("lib/model", {"config.json": b"{}", "model.safetensors": b"x"})
    with pytest.raises(InputError, match="Hub repo 'lib/model' is not a LoRA adapter: it has no adapter_config.json"):
        add_hub(store, "lib/model")
    online.commit("lib/sentiment", adapter_files("sentiment"))
    with pytest.raises(NotFoundError, match="revision 'nope' of 'lib/sentiment' was not found"):
        add_hub(store, "lib/sentiment", revision="nope")
    with pytest.raises(InputError, match="trained on 'lorahub-examples/tiny-t5', not 'google/flan-t5-large'"):
        add_hub(store, "lib/sentiment", base_model="google/flan-t5-large")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubError, match="cannot reach the Hub at http://127.0.0.1:9") as info:
        add_hub(store, "lib/sentiment")
    assert "HF_ENDPOINT" in info.value.hint and "HF_HUB_OFFLINE" in info.value.hint
    assert store.list() == []


def test_a_card_travels_with_its_adapter(online, lorahub_home, registry_with_examples, tmp_path):
    card_dir = Store(registry_with_examples).get("examples/capitals").path
    files = adapter_files("capitals")
    for name in ("lorahub_card.json", "lorahub_card.safetensors"):
        files[name] = (card_dir / name).read_bytes()
    online.commit("lib/capitals", files)
    store = Store(lorahub_home)
    record = add_hub(store, "lib/capitals").record
    assert record.has_card and record.card_embedder.startswith("sentence-transformers/all-MiniLM-L6-v2@")
    # A damaged card is dropped with a warning; the adapter itself is still mirrored.
    files["lorahub_card.safetensors"] = b"garbage"
    online.commit("lib/capitals-broken", files)
    warnings = []
    record = add_hub(store, "lib/capitals-broken", warn=warnings.append).record
    assert not record.has_card and "ignoring its embedding card" in warnings[0]


def dataset_repo(hub):
    """A multi-task dataset like lorahub/flanv2: one row per example with a task column, JSONL and Parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"inputs": r["input"], "targets": r["target"], "task": task}
        for task in ("addition", "capitals", "sentiment")
        for r in map(json.loads, (EXAMPLES / "data" / f"{task}.jsonl").read_text().splitlines())
    ]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows[80:]), buffer)
    hub.commit(
        "lib/flan",
        {
            "data/train-00000.jsonl": "".join(json.dumps(r) + "\n" for r in rows[:80]).encode(),
            "data/train-00001.parquet": buffer.getvalue(),
            "data/validation-00000.jsonl": b'{"inputs": "x", "targets": "y", "task": "addition"}\n',
        },
        repo_type="dataset",
    )
    return rows


def test_cards_from_a_hub_dataset(online, lorahub_home, cli):
    rows = dataset_repo(online)
    online.commit("lib/capitals", adapter_files("capitals"))
    result = cli(
        "registry",
        "add",
        "lib/capitals",
        "--dataset",
        "lib/flan",
        "--filter",
        "task=capitals",
        "--max-examples",
        "50",
        "--json",
    )
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["adapter"]["has_card"] is True
    card = json.loads(cli("card", "show", "lib/capitals", "--json").stdout)
    assert card["n_examples"] == 50 and card["source"]["type"] == "hub-dataset"
    assert card["source"]["revision"] == online.head("lib/flan", repo_type="dataset")
    assert card["source"]["filters"] == {"task": "capitals"}
    capitals = {r["inputs"] for r in rows if r["task"] == "capitals"}
    assert all(e["input"] in capitals for e in card["nearest_examples"]), "rows come from the Parquet shard"
    bad = cli("card", "build", "lib/capitals", "--dataset", "lib/flan", "--filter", "task=nope")
    assert bad.code != 0 and "no rows of dataset 'lib/flan' match {'task': 'nope'}" in bad.stderr
    bad = cli("card", "build", "lib/capitals", "--dataset", "lib/flan@test")
    assert bad.code != 0 and "split 'test'" in bad.stderr


def write_catalog(tmp_path, repos, dataset=None):
    path = tmp_path / "catalog.json"
    path.write_text(
        json.dumps(
            {
                "name": "test",
                "base_model": "lorahub-examples/tiny-t5",
                "training_data": {"hub_dataset": dataset} if dataset else {},
                "modules": [{"repo_id": r, "task": r.split("-")[-1]} for r in repos],
            }
        )
    )
    return path


def test_catalog_sync_survives_a_broken_repo_and_builds_cards(online, lorahub_home, tmp_path, cli):
    dataset_repo(online)
    tasks = ["addition", "capitals", "sentiment"]
    for task in tasks:
        online.commit(f"lib/t5-{task}", adapter_files(task, pickle=task == "addition"))
    online.commit("lib/t5-broken", adapter_files("weekdays"))
    online.fail("lib/t5-broken", status=403)
    catalog = write_catalog(tmp_path, [f"lib/t5-{t}" for t in tasks] + ["lib/t5-broken", "lib/t5-missing"], "lib/flan")
    result = cli("registry", "sync", "--catalog", str(catalog), "--cards", "--json")
    assert result.code == 1, "a failed entry makes the exit non-zero"
    report = {r["id"]: r for r in json.loads(result.stdout)["results"]}
    assert [report[f"lib/t5-{t}"]["status"] for t in tasks] == ["added"] * 3
    assert report["lib/t5-broken"]["status"] == "failed" and "HTTP 403" in report["lib/t5-broken"]["message"]
    assert report["lib/t5-missing"]["status"] == "failed" and "was not found" in report["lib/t5-missing"]["message"]
    listed = json.loads(cli("registry", "list", "--json").stdout)
    assert [(a["id"], a["has_card"]) for a in listed] == [(f"lib/t5-{t}", True) for t in tasks]
    assert all(a["has_weight_card"] for a in listed), "sync makes every adapter's weight card, pickles included"
    assert {"id", "source", "revision", "base_model", "r", "target_modules", "has_card"} <= set(listed[0])
    ranked = json.loads(cli("retrieve", "--query", "What is 12 plus 30?", "-k", "1", "--json").stdout)
    assert ranked["results"][0]["id"] == "lib/t5-addition"
    # Re-running skips what is mirrored; the repaired repo is now added.
    online.unfail("lib/t5-broken")
    again = {
        r["id"]: r["status"]
        for r in json.loads(cli("registry", "sync", "--catalog", str(catalog), "--json").stdout)["results"]
    }
    assert again == {**{f"lib/t5-{t}": "skipped" for t in tasks}, "lib/t5-broken": "added", "lib/t5-missing": "failed"}


def test_sync_by_author_and_search(online, lorahub_home, cli):
    online.page_size = 2  # the listing spans several pages
    for task in ("addition", "capitals", "sentiment", "weekdays"):
        online.commit(f"lib/t5-{task}", adapter_files(task))
    online.commit("other/t5-antonyms", adapter_files("antonyms"))
    result = cli("registry", "sync", "--author", "lib", "--search", "t5-", "--json")
    assert result.code == 0, result.stderr
    assert sorted(r["id"] for r in json.loads(result.stdout)["results"]) == [
        "lib/t5-addition",
        "lib/t5-capitals",
        "lib/t5-sentiment",
        "lib/t5-weekdays",
    ]


def test_shipped_catalogues_load():
    from lorahub_cli.registry.catalog import Catalog, available

    assert {"lorahub-flan-t5-large", "loraretriever-llama2-7b"} <= set(available())
    catalog = Catalog.load("lorahub-flan-t5-large")
    assert len(catalog.entries) == 196 and catalog.base_model == "google/flan-t5-large"
    assert catalog.dataset == "lorahub/flanv2" and all(e.task for e in catalog.entries)


SYNC = "from lorahub_cli.cli.app import main; main()"


def test_sigkill_during_sync_then_rerun_completes(hub, hub_env, tmp_path):
    repos = [f"lib/t5-{i:03d}" for i in range(40)]
    for i, repo in enumerate(repos):
        hub.commit(repo, adapter_files(sorted(os.listdir(EXAMPLES / "adapters"))[i % 8], pickle=i % 2 == 0))
    catalog = write_catalog(tmp_path, repos)
    env = {**hub_env, "LORAHUB_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-c", SYNC, "registry", "sync", "--catalog", str(catalog), "--workers", "4"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = Store(tmp_path / "home")
    deadline = time.time() + 120
    while len(store.list()) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(store.list())
    assert 5 <= done < 40, done
    assert store.verify()[0] == []
    rerun = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    statuses = [r["status"] for r in json.loads(rerun.stdout)["results"]]
    assert statuses.count("skipped") == done and statuses.count("added") == 40 - done
    assert len(store.list()) == 40 and store.verify()[0] == []


TASKS = ("addition", "capitals", "sentiment")


def example_rows(task):
    return [
        {"inputs": r["input"], "targets": r["target"]}
        for r in map(json.loads, (EXAMPLES / "data" / f"{task}.jsonl").read_text().splitlines())
    ]


def flanv2_per_task_repo(hub, repo="lib/flanv2"):
    """Built like lorahub/flanv2 as public code reads it: one `.json` file per task at the top level, holding
    JSON Lines with `inputs`/`targets` and no task column; a file's stem up to any ':' is the task."""
    names = {
        "addition": "addition.json",
        "capitals": "capitals:1.0.0.json",
        "sentiment": "sentiment.json",
        "capitals_extra": "capitals_extra.json",
    }
    files = {}
    for task, name in names.items():
        rows = example_rows(task if task in TASKS else "weekdays")
        files[name] = "".join(json.dumps(r) + "\n" for r in rows).encode()
    hub.commit(repo, files, repo_type="dataset")
    return names


def table_repo(hub, column, repo="lib/flan-table"):
    rows = [{**r, column: task} for task in TASKS for r in example_rows(task)]
    hub.commit(repo, {"train.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode()}, repo_type="dataset")


def downloads(hub, repo):
    return {
        unquote(path.split("/resolve/", 1)[1].split("/", 1)[1])
        for method, path, _ in hub.requests
        if method == "GET" and f"/datasets/{repo}/resolve/" in path
    }


def test_cards_from_a_per_task_layout_download_only_that_tasks_file(online, lorahub_home, cli):
    names = flanv2_per_task_repo(online)
    online.commit("lib/capitals", adapter_files("capitals"))
    result = cli("registry", "add", "lib/capitals", "--dataset", "lib/flanv2", "--filter", "task=capitals", "--json")
    assert result.code == 0, result.stderr
    card = json.loads(cli("card", "show", "lib/capitals", "--json").stdout)
    assert card["n_examples"] == 80 and card["source"]["layout"] == "per-task file"
    assert card["source"]["files"] == [names["capitals"]] and card["source"]["filters"] == {"task": "capitals"}
    capitals = {r["inputs"] for r in example_rows("capitals")}
    assert all(e["input"] in capitals for e in card["nearest_examples"])
    assert downloads(online, "lib/flanv2") == {names["capitals"]}, "no other task's file is downloaded"
    missing = cli("card", "build", "lib/capitals", "--dataset", "lib/flanv2", "--filter", "task=nope")
    assert missing.code == 2 and "no data file is named after 'nope'" in missing.stderr
    assert len(downloads(online, "lib/flanv2")) == 2, "a task without a file stops after one file"


@pytest.mark.parametrize("column", ["task", "task_name"])
def test_cards_from_a_table_with_a_task_column(online, lorahub_home, cli, column):
    table_repo(online, column)
    online.commit("lib/sentiment", adapter_files("sentiment"))
    result = cli(
        "registry", "add", "lib/sentiment", "--dataset", "lib/flan-table", "--filter", "task=sentiment", "--json"
    )
    assert result.code == 0, result.stderr
    card = json.loads(cli("card", "show", "lib/sentiment", "--json").stdout)
    sentiment = {r["inputs"] for r in example_rows("sentiment")}
    assert card["source"]["layout"] == "table" and all(e["input"] in sentiment for e in card["nearest_examples"])


def test_a_card_download_is_bounded(online):
    from lorahub_cli.cards.data import DatasetSpec, from_hub_dataset

    flanv2_per_task_repo(online)
    with pytest.raises(InputError, match=r"would download more than 0 MiB of 'lib/flanv2' \(next: addition.json"):
        from_hub_dataset(DatasetSpec("lib/flanv2"), {"task": "addition"}, None, None, 10, max_download_bytes=100)


def test_sync_cards_from_the_per_task_layout_and_failed_cards_fail(online, lorahub_home, tmp_path, cli):
    names = flanv2_per_task_repo(online)
    for task in ("addition", "capitals", "weekdays"):
        online.commit(f"lib/t5-{task}", adapter_files(task))
    catalog = write_catalog(tmp_path, [f"lib/t5-{t}" for t in ("addition", "capitals", "weekdays")], "lib/flanv2")
    result = cli("registry", "sync", "--catalog", str(catalog), "--cards", "--json")
    assert result.code == 1, "weekdays has no data file: its card fails, and so does the sync"
    report = json.loads(result.stdout)
    statuses = {r["id"]: (r["status"], r["message"]) for r in report["results"]}
    assert statuses["lib/t5-addition"] == ("added", "card built") and statuses["lib/t5-capitals"] == (
        "added",
        "card built",
    )
    assert statuses["lib/t5-weekdays"][0] == "failed" and "card failed" in statuses["lib/t5-weekdays"][1]
    assert report["failed"] == 1
    assert downloads(online, "lib/flanv2") <= {names["addition"], names["capitals"], names["sentiment"]}
    assert names["capitals_extra"] not in downloads(online, "lib/flanv2")
    listed = {a["id"]: a["has_card"] for a in json.loads(cli("registry", "list", "--json").stdout)}
    assert listed == {"lib/t5-addition": True, "lib/t5-capitals": True, "lib/t5-weekdays": False}
    shown = cli("registry", "sync", "--catalog", str(catalog), "--cards")
    assert shown.code == 1 and "card failed" in shown.stderr and "1 failed" in shown.stderr


def test_sync_with_the_hub_unreachable_stops_early_with_one_line(online, lorahub_home, tmp_path, cli, monkeypatch):
    from huggingface_hub import constants

    catalog = write_catalog(tmp_path, [f"lib/t5-{i:03d}" for i in range(196)])
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    result = cli("registry", "sync", "--catalog", str(catalog), "--workers", "4")
    assert result.code == 1 and "Internal error" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Mirroring" not in line]
    assert len(lines) == 1 and lines[0].startswith("Error: cannot reach the Hub at http://127.0.0.1:9"), result.stderr


def test_repeated_sync_errors_are_summarised(online, lorahub_home, tmp_path, cli):
    online.commit("lib/t5-addition", adapter_files("addition"))
    catalog = write_catalog(tmp_path, ["lib/t5-addition"] + [f"lib/t5-missing{i}" for i in range(20)])
    result = cli("registry", "sync", "--catalog", str(catalog))
    assert result.code == 1
    assert (
        result.stderr.count("was not found") == 1 and "failed ×20" in result.stderr and "and 17 more" in result.stderr
    )
    assert "Fetching" not in result.stderr, "one progress display: huggingface_hub's own bars are off"
