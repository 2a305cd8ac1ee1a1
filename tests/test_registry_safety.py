"""Nothing stored is lost: damaged indexes, interrupted adds, bad ids, bad weights, read-only homes (issue 11)."""

import json
import os
import shutil
import sqlite3
import time

import pytest
from conftest import EXAMPLES
from safetensors.torch import load_file, save_file

from lorahub_cli.io import sha256_file
from lorahub_cli.registry import Store
from lorahub_cli.registry.mirror import add_local

ADAPTERS = EXAMPLES / "adapters"


def stored_home(home, cli):
    """A home with two adapters, one with a card; returns their stored weight paths."""
    assert cli("registry", "add", ADAPTERS / "sentiment", "--data", EXAMPLES / "data" / "sentiment.jsonl").code == 0
    assert cli("registry", "add", ADAPTERS / "addition").code == 0
    return sorted(home.rglob("adapter_model.safetensors"))


def age(path, seconds=3600):
    """Make a folder look old enough for verify to judge it (it leaves folders younger than a minute alone)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_an_empty_index_is_an_error_naming_rebuild_and_prune_deletes_nothing(cli, lorahub_home):
    weights = stored_home(lorahub_home, cli)
    (lorahub_home / "registry.sqlite").write_bytes(b"")
    for args in (
        ["registry", "verify"],
        ["registry", "verify", "--prune"],
        ["registry", "list"],
        ["registry", "add", ADAPTERS / "capitals"],
    ):
        result = cli(*args)
        assert result.code != 0 and result.stderr.count("\n") == 1, (args, result.stderr)
        assert "is empty (0 bytes), but 2 stored adapter folder(s) exist" in result.stderr
        assert "lorahub registry rebuild" in result.stderr and "Internal error" not in result.stderr
    assert sorted(lorahub_home.rglob("adapter_model.safetensors")) == weights
    rebuilt = cli("registry", "rebuild", "--json")
    assert rebuilt.code == 0 and json.loads(rebuilt.stdout)["indexed"] == ["addition", "sentiment"]
    listed = {a["id"]: a for a in json.loads(cli("registry", "list", "--json").stdout)}
    assert listed["sentiment"]["has_card"] and not listed["addition"]["has_card"]
    assert listed["sentiment"]["source"] == str((ADAPTERS / "sentiment").resolve())
    assert cli("registry", "verify").code == 0
    assert cli("retrieve", "--query", "I loved it", "-k", "1", "--json").code == 0


@pytest.mark.parametrize("damage", ["random", "torn", "missing"])
def test_a_damaged_index_is_one_line_naming_rebuild(cli, lorahub_home, damage):
    stored_home(lorahub_home, cli)
    index = lorahub_home / "registry.sqlite"
    if damage == "random":
        index.write_bytes(os.urandom(index.stat().st_size))
    elif damage == "torn":
        index.write_bytes(index.read_bytes()[:6000])  # a page cut in half
    else:
        index.unlink()
    result = cli("registry", "list")
    assert result.code == 1 and result.stderr.count("\n") == 1 and "Internal error" not in result.stderr
    assert "lorahub registry rebuild" in result.stderr, result.stderr
    assert cli("registry", "rebuild").code == 0
    assert [a["id"] for a in json.loads(cli("registry", "list", "--json").stdout)] == ["addition", "sentiment"]
    kept = [p for p in lorahub_home.glob("registry.sqlite.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(kept) == (0 if damage == "missing" else 1), "the damaged index is kept aside, not deleted"


def test_verify_tells_staging_from_a_stored_adapter_missing_from_the_index(cli, lorahub_home):
    stored_home(lorahub_home, cli)
    store = Store(lorahub_home)
    folder = store.get("addition").path
    with sqlite3.connect(lorahub_home / "registry.sqlite") as db:
        db.execute("DELETE FROM adapters WHERE id = 'addition'")
    staging = lorahub_home / "tmp" / "999999999-deadbeef"  # a pid that cannot be alive
    staging.mkdir()
    (staging / "adapter_config.json").write_text("{}")
    age(folder)
    report = json.loads(cli("registry", "verify", "--prune", "--json").stdout)
    kinds = {item["kind"]: item["path"] for item in report["leftovers"]}
    assert kinds == {"staging": str(staging), "unindexed": str(folder)}
    assert not staging.exists() and folder.is_dir(), "prune removes the staging folder only"
    text = cli("registry", "verify").stderr
    assert "1 stored adapter(s) missing from the index (restore them with: lorahub registry rebuild)" in text
    cli("registry", "rebuild")
    assert store.get("addition").path == folder and store.verify() == ([], [])


def test_superseded_versions_are_pruned(cli, lorahub_home):
    store = Store(lorahub_home)
    add_local(store, ADAPTERS / "addition")
    old = store.get("addition").path
    leftover = old.parent / "0000000000000000-00000000"
    shutil.copytree(old, leftover)
    age(leftover)
    problems, leftovers = store.verify(prune=True)
    assert leftovers == [{"path": leftover, "kind": "superseded"}] and not leftover.exists() and old.is_dir()


def test_add_with_a_bad_card_adds_nothing(cli, lorahub_home, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": \n')
    result = cli("registry", "add", ADAPTERS / "sentiment", "--data", bad)
    assert result.code == 2 and f"{bad}:2: not valid JSON" in result.stderr
    missing = cli(
        "registry",
        "add",
        ADAPTERS / "sentiment",
        "--data",
        EXAMPLES / "data" / "sentiment.jsonl",
        "--embedder",
        str(tmp_path / "no-such-embedder"),
    )
    assert missing.code != 0 and missing.stderr.count("\n") == 1
    assert json.loads(cli("registry", "list", "--json").stdout) == []
    assert not list((lorahub_home / "adapters").iterdir()) and not list((lorahub_home / "tmp").iterdir())


def test_readding_an_id_from_another_source_needs_replace(cli, lorahub_home):
    assert (
        cli(
            "registry", "add", ADAPTERS / "sentiment", "--name", "mine", "--data", EXAMPLES / "data" / "sentiment.jsonl"
        ).code
        == 0
    )
    refused = cli("registry", "add", ADAPTERS / "addition", "--name", "mine")
    assert (
        refused.code == 2 and "'mine' already holds an adapter from" in refused.stderr and "--replace" in refused.stderr
    )
    kept = json.loads(cli("registry", "show", "mine", "--json").stdout)
    assert kept["source"] == str((ADAPTERS / "sentiment").resolve()) and kept["has_card"]
    assert cli("registry", "add", ADAPTERS / "sentiment", "--name", "mine").code == 0, "same source: updated in place"
    assert cli("registry", "add", ADAPTERS / "addition", "--name", "mine", "--replace").code == 0
    assert json.loads(cli("registry", "show", "mine", "--json").stdout)["source"] == str(
        (ADAPTERS / "addition").resolve()
    )


@pytest.mark.parametrize("bad_id", ["..", "../../x", "/abs/path", "a/b/c", "a--b", ".hidden", "x y", "ns/..", ""])
def test_unsafe_ids_are_refused_before_anything_is_written(cli, lorahub_home, tmp_path, bad_id):
    outside = lambda: sorted(p for p in tmp_path.rglob("*") if lorahub_home not in (p, *p.parents))  # noqa: E731
    before = outside()
    result = cli("registry", "add", ADAPTERS / "sentiment", "--name", bad_id)
    assert result.code == 2 and f"'{bad_id}' is not a valid adapter id" in result.stderr, result.stderr
    assert outside() == before
    assert not (lorahub_home / "adapters").exists() or not list((lorahub_home / "adapters").iterdir())


def test_hub_and_local_names_are_accepted(lorahub_home):
    store = Store(lorahub_home)
    for name in ("lorahub/flan_t5_large-ag_news_subset", "my.adapter_2", "x"):
        add_local(store, ADAPTERS / "sentiment", name=name, replace=True)
    assert [r.id for r in store.list()] == ["lorahub/flan_t5_large-ag_news_subset", "my.adapter_2", "x"]


def nan_adapter(tmp_path):
    folder = tmp_path / "nan-adapter"
    shutil.copytree(ADAPTERS / "sentiment", folder)
    state = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in state if "lora_B" in k)
    state[key][0, 0] = float("nan")
    save_file(state, folder / "adapter_model.safetensors")
    return folder, key


def test_nan_weights_are_refused_at_add_and_by_verify(cli, lorahub_home, tmp_path):
    folder, key = nan_adapter(tmp_path)
    result = cli("registry", "add", folder)
    assert result.code == 2 and "holds NaN or inf in 1 tensor(s)" in result.stderr and key in result.stderr
    assert json.loads(cli("registry", "list", "--json").stdout) == []
    # A NaN adapter stored before this check existed: verify finds it.
    store = Store(lorahub_home)
    add_local(store, ADAPTERS / "sentiment", name="old")
    stored = store.get("old").path / "adapter_model.safetensors"
    shutil.copy(folder / "adapter_model.safetensors", stored)
    files = {**store.get("old").files, "adapter_model.safetensors": sha256_file(stored)}
    with sqlite3.connect(lorahub_home / "registry.sqlite") as db:
        db.execute("UPDATE adapters SET files = ? WHERE id = 'old'", (json.dumps(files),))
    problems, _ = store.verify()
    assert problems == [{"id": "old", "file": "adapter_model.safetensors", "problem": f"NaN or inf in {key}"}]


@pytest.mark.parametrize(
    "config, expected", [("[1, 2]", "is not a JSON object (it holds a list)"), ("{not json", "is not valid JSON")]
)
def test_a_bad_config_names_the_users_file(cli, lorahub_home, tmp_path, config, expected):
    folder = tmp_path / "odd"
    shutil.copytree(ADAPTERS / "sentiment", folder)
    (folder / "adapter_config.json").write_text(config)
    result = cli("registry", "add", folder)
    assert result.code == 2 and result.stderr.startswith(f"Error: {folder / 'adapter_config.json'} {expected}")
    assert str(lorahub_home) not in result.stderr and result.stderr.count("\n") == 1


def test_home_that_is_a_file(cli, lorahub_home):
    lorahub_home.parent.mkdir(parents=True, exist_ok=True)
    lorahub_home.write_text("not a folder")
    for args in (["registry", "list"], ["registry", "add", ADAPTERS / "sentiment"]):
        result = cli(*args)
        assert (
            result.code == 1
            and result.stderr
            == f"Error: the lorahub home '{lorahub_home}' is a file, not a folder. Point LORAHUB_HOME at a folder.\n"
        )


def snapshot(home):
    return {
        str(p.relative_to(home)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in home.rglob("*")
        if not p.name.endswith(("-shm", "-wal"))
    }


@pytest.mark.parametrize("writable", [True, False])
def test_reading_commands_never_write(cli, lorahub_home, monkeypatch, writable):
    """Reading commands open the index read-only (immutable when the folder cannot be written, as on a read-only
    mount; this test runs as any user, so a read-only folder is simulated through os.access)."""
    stored_home(lorahub_home, cli)
    before = snapshot(lorahub_home)
    if not writable:
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode & os.W_OK else real(path, mode, **kw))
    for args in (
        ["registry", "list", "--json"],
        ["registry", "show", "sentiment"],
        ["registry", "verify"],
        ["retrieve", "--query", "I loved it", "-k", "1"],
        ["card", "show", "sentiment"],
    ):
        result = cli(*args)
        assert result.code == 0, (args, result.stderr)
    assert snapshot(lorahub_home) == before


def test_reading_an_absent_registry_creates_nothing(cli, lorahub_home):
    assert cli("registry", "list", "--json").stdout.strip() == "[]"
    assert not lorahub_home.exists()


def test_writing_to_a_read_only_index_is_one_line(lorahub_home, monkeypatch):
    store = Store(lorahub_home)
    add_local(store, ADAPTERS / "sentiment")
    readonly = Store(lorahub_home, readonly=True)
    with pytest.raises(Exception) as info:
        with readonly._connect() as db:
            db.execute("DELETE FROM adapters")
    assert "is not writable" in str(info.value) or "cannot open" in str(info.value), info.value
    assert store.find("sentiment") is not None


def test_an_unwritable_staging_folder_is_one_line(cli, lorahub_home, monkeypatch):
    """A home whose folders exist but cannot be written (a read-only mount; simulated, as tests may run as root)."""
    Store(lorahub_home)
    real_mkdir = type(lorahub_home).mkdir

    def refuse(self, *args, **kwargs):
        if self.parent == lorahub_home / "tmp":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(lorahub_home), "mkdir", refuse)
    result = cli("registry", "add", ADAPTERS / "sentiment")
    assert result.code == 1 and result.stderr.startswith(
        f"Error: the registry at '{lorahub_home}' is not writable (Permission denied)."
    )
    assert result.stderr.count("\n") == 1
