"""Registry data is hostile until checked (issue 22): index rows, each folder's lorahub_adapter.json, adapter
configs and card files may have been edited by anyone who can write the home, or come with a copied one. Nothing
outside the home is read, written or deleted through them; what fails its check is reported and never used."""

import hashlib
import json
import os
import shutil
import sqlite3

import pytest
from conftest import EXAMPLES

from lorahub_cli.cards.card import Card
from lorahub_cli.errors import IntegrityError
from lorahub_cli.io import sha256_file
from lorahub_cli.registry import Store
from lorahub_cli.registry.mirror import add_local
from lorahub_cli.registry.store import COLUMNS, METADATA

ADAPTERS = EXAMPLES / "adapters"
REBUILD = "lorahub registry rebuild"


def two_adapters(home) -> Store:
    store = Store(home)
    add_local(store, ADAPTERS / "sentiment")
    add_local(store, ADAPTERS / "addition")
    return store


def victim(root):
    """A folder of the user's beside the home, with files in it."""
    folder = root / "victim"
    (folder / "deep").mkdir(parents=True)
    (folder / "notes.txt").write_text("the user's notes")
    (folder / "deep" / "data.bin").write_bytes(os.urandom(64))
    return folder


def checksums(folder):
    """Every path under a folder with the sha256 of its bytes: equal before and after means untouched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def set_row(home, adapter_id, **columns):
    with sqlite3.connect(home / "registry.sqlite") as db:
        for column, value in columns.items():
            db.execute(f"UPDATE adapters SET {column} = ? WHERE id = ?", (value, adapter_id))


def one_line_error(result, *needles):
    assert result.code != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "Internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


# --- index rows that name paths outside their folder ---------------------------------------------


def outside_folder(kind, home, tmp_path):
    """The `folder` an edited row holds, pointing at the victim folder beside the home in one way or another."""
    target = victim(tmp_path)
    content = home / "adapters"
    if kind == "dotdot":
        return "../../victim", target
    if kind == "absolute":
        return str(target), target
    if kind == "inside-then-out":
        return "sentiment/../../../victim", target
    if kind == "link":  # a version folder that is a link out of the home
        (content / "sentiment" / "0123456789abcdef-01234567").symlink_to(target)
        return "sentiment/0123456789abcdef-01234567", target
    # an id folder that is a link out of the home, with a well-formed version under it
    shutil.rmtree(content / "sentiment")
    (content / "sentiment").symlink_to(tmp_path)
    return "sentiment/victim", target


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "inside-then-out", "link", "id-link"])
def test_a_row_naming_a_folder_outside_the_home_is_never_removed_or_used(cli, lorahub_home, tmp_path, kind):
    two_adapters(lorahub_home)
    folder, target = outside_folder(kind, lorahub_home, tmp_path)
    set_row(lorahub_home, "sentiment", folder=folder)
    before = checksums(target)
    removed = cli("registry", "remove", "sentiment", "--yes")
    one_line_error(removed, "row for 'sentiment' names folder", REBUILD)
    assert "Removed" not in removed.stderr
    # Re-adding the id replaces its row and removes the old row's folder: never that one.
    one_line_error(cli("registry", "add", ADAPTERS / "sentiment", "--replace"), REBUILD)
    one_line_error(cli("registry", "show", "sentiment"), REBUILD)
    one_line_error(cli("registry", "list"), REBUILD)
    report = cli("registry", "verify", "--prune", "--json")
    assert report.code == 1
    problems = json.loads(report.stdout)["problems"]
    assert [(p["id"], p["file"]) for p in problems] == [("sentiment", None)], problems
    assert "names folder" in problems[0]["problem"]
    assert checksums(target) == before and (tmp_path / "victim").is_dir()
    rebuilt = cli("registry", "rebuild", "--json")
    assert json.loads(rebuilt.stdout)["indexed"] == ["addition"] + (["sentiment"] if kind != "id-link" else [])
    assert cli("registry", "remove", "sentiment", "--yes").code == (0 if kind != "id-link" else 1)
    assert checksums(target) == before


def test_a_row_naming_another_ids_folder_cannot_remove_it(cli, lorahub_home):
    """Two rows for one folder (a duplicated row under another id): removing one must not take the other's files."""
    store = two_adapters(lorahub_home)
    sentiment = store.get("sentiment").path
    before = checksums(sentiment)
    set_row(lorahub_home, "addition", folder=store.get("sentiment").folder)
    one_line_error(cli("registry", "remove", "addition", "--yes"), "row for 'addition' names folder", REBUILD)
    assert checksums(sentiment) == before


HOSTILE_ROWS = {
    "id ..": {"id": "../../evil"},
    "id with NUL": {"id": "evil\x00"},
    "id too long": {"id": "x" * 300},
    "id a/b/c": {"id": "a/b/c"},
    "id not text": {"id": 7},
    "file ..": {"files": json.dumps({"adapter_config.json": "0" * 64, "../../../victim/..": "0" * 64})},
    "file absolute": {"files": json.dumps({"/etc/passwd": "0" * 64})},
    "files not JSON": {"files": "{not json"},
    "file sha not hex": {"files": json.dumps({"adapter_config.json": "x", "adapter_model.safetensors": "y"})},
    "r text": {"r": "four"},
    "r negative": {"r": -1},
    "alpha zero": {"lora_alpha": 0},
    "no targets": {"target_modules": "[]"},
    "peft type": {"peft_type": "IA3"},
    "source two lines": {"source": "a\nb"},
    "size negative": {"size": -5},
}


@pytest.mark.parametrize("change", HOSTILE_ROWS.values(), ids=HOSTILE_ROWS.keys())
def test_an_untrusted_row_is_reported_by_verify_and_an_error_elsewhere(cli, registry_with_examples, change):
    home = registry_with_examples
    set_row(home, "examples/sentiment", **change)
    for args in (["registry", "list"], ["retrieve", "--query", "I loved it", "-k", "1"]):
        one_line_error(cli(*args), REBUILD)
    verified = cli("registry", "verify", "--json")
    assert verified.code == 1 and verified.stderr.splitlines()[-1].startswith("Error: 1 index row(s) cannot be trusted")
    report = json.loads(verified.stdout)
    untrusted = [p for p in report["problems"] if p["file"] is None]
    assert len(untrusted) == 1 and "index row" in untrusted[0]["problem"], report["problems"]
    assert cli("registry", "rebuild").code == 0
    assert len(json.loads(cli("registry", "list", "--json").stdout)) == 8
    assert cli("registry", "verify").code == 0


# --- an index that is not lorahub's ---------------------------------------------------------------


def foreign_index(path, kind):
    path.unlink()
    with sqlite3.connect(path) as db:
        if kind == "other columns":
            db.execute("CREATE TABLE adapters (name TEXT, size INTEGER)")
            db.execute("INSERT INTO adapters VALUES ('sentiment', 1)")
        elif kind == "other tables":
            db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
            db.execute("INSERT INTO notes VALUES (1, 'someone else''s database')")
        else:  # lorahub's columns without the key on id: rows may repeat
            db.execute(f"CREATE TABLE adapters ({', '.join(f'{c} TEXT' for c in COLUMNS)})")
            for _ in range(2):
                db.execute(f"INSERT INTO adapters (id, folder) VALUES ('dup', 'dup/{'0' * 16}-{'0' * 8}')")


@pytest.mark.parametrize("kind", ["other columns", "other tables", "no key"])
def test_an_index_that_is_not_lorahubs_is_treated_as_damaged(cli, registry_with_examples, kind):
    index = registry_with_examples / "registry.sqlite"
    for side in ("-wal", "-shm"):
        (registry_with_examples / f"registry.sqlite{side}").unlink(missing_ok=True)
    foreign_index(index, kind)
    foreign = index.read_bytes()
    for args in (
        ["registry", "list"],
        ["registry", "verify"],
        ["retrieve", "--query", "I loved it", "-k", "1"],
        ["registry", "add", ADAPTERS / "sentiment", "--name", "again"],
    ):
        one_line_error(cli(*args), "is not lorahub's", REBUILD)
    assert index.read_bytes() == foreign, "a database that is not lorahub's is never written to"
    assert cli("registry", "rebuild").code == 0
    assert len(json.loads(cli("registry", "list", "--json").stdout)) == 8
    (kept,) = [
        p for p in registry_with_examples.glob("registry.sqlite.damaged-*") if not p.name.endswith(("-wal", "-shm"))
    ]
    assert kept.read_bytes() == foreign, "kept aside, never deleted"


# --- folders' own metadata and configs --------------------------------------------------------------


def edit_metadata(folder, **changes):
    path = folder / METADATA
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


HOSTILE_METADATA = {
    "the issue's case": {"id": "../../evil", "files": {"../../../victim/..": "0" * 64}},
    "another id": {"id": "addition"},
    "files outside": {"files": {"adapter_config.json": "0" * 64, "/etc/passwd": "0" * 64}},
    "r text": {"r": "four"},
    "r negative": {"r": -1},
    "targets empty": {"target_modules": []},
    "id long": {"id": "n/" + "x" * 200},
}


@pytest.mark.parametrize("change", HOSTILE_METADATA.values(), ids=HOSTILE_METADATA.keys())
def test_rebuild_indexes_no_folder_whose_metadata_fails(cli, lorahub_home, tmp_path, change):
    store = two_adapters(lorahub_home)
    folder = store.get("sentiment").path
    edit_metadata(folder, **change)
    before = checksums(folder)
    result = cli("registry", "rebuild")
    assert result.code == 1 and "Internal error" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("Error: 1 folder(s) in "), result.stderr
    assert f"not indexed: {folder} {METADATA}:" in " ".join(result.stderr.split())  # the warning names it
    assert [a["id"] for a in json.loads(cli("registry", "list", "--json").stdout)] == ["addition"]
    assert checksums(folder) == before, "left as it is"
    assert json.loads(cli("registry", "rebuild", "--json").stdout)["skipped"][0]["path"] == str(folder)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "link"])
def test_unreadable_metadata_is_reported_not_replaced_by_a_guess(cli, lorahub_home, tmp_path, content):
    store = two_adapters(lorahub_home)
    metadata = store.get("sentiment").path / METADATA
    metadata.unlink()
    if content == "link":
        (tmp_path / "elsewhere.json").write_text(json.dumps({"id": "sentiment"}))
        metadata.symlink_to(tmp_path / "elsewhere.json")
    else:
        metadata.write_text(content)
    result = cli("registry", "rebuild", "--json")
    assert result.code == 1 and json.loads(result.stdout)["indexed"] == ["addition"]


@pytest.mark.parametrize(
    "change, shown",
    [
        ({"r": "four"}, "r is 'four', not a positive integer"),
        ({"r": -1}, "r is -1, not a positive integer"),
        ({"r": 0}, "r is 0, not a positive integer"),
        ({"r": 2.5}, "r is 2.5, not a positive integer"),
        ({"r": True}, "r is True, not a positive integer"),
        ({"lora_alpha": -16}, "lora_alpha is -16, not a positive number"),
        ({"lora_alpha": "x"}, "lora_alpha is 'x', not a positive number"),
        ({"target_modules": []}, "target_modules is [], not a non-empty list"),
        ({"target_modules": ["q", 3]}, "target_modules is ['q', 3], not a non-empty list"),
        ({"target_modules": ""}, "target_modules is '', not a non-empty list"),
        ({"base_model_name_or_path": 5}, "base_model_name_or_path is 5, not text"),
        ({"base_model_name_or_path": "a\nb"}, "base_model_name_or_path 'a\\nb' holds control characters"),
    ],
)
def test_a_bad_config_is_refused_at_add_naming_the_value(cli, lorahub_home, tmp_path, change, shown):
    folder = tmp_path / "odd"
    shutil.copytree(ADAPTERS / "sentiment", folder)
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    result = cli("registry", "add", folder)
    one_line_error(result, f"{config}: {shown}")
    assert result.code == 2
    assert json.loads(cli("registry", "list", "--json").stdout) == []


def test_a_regex_target_string_is_a_valid_config(cli, lorahub_home, tmp_path):
    """PEFT takes target_modules as a list of names or one regex string."""
    folder = tmp_path / "regex"
    shutil.copytree(ADAPTERS / "sentiment", folder)
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": ".*\\.(q|v)$"}))
    assert cli("registry", "add", folder).code == 0


@pytest.mark.parametrize("r", ["four", -1])
def test_rebuild_reports_a_stored_config_it_cannot_use(cli, lorahub_home, r):
    """Folders stored before lorahub_adapter.json existed are re-read from their config: a bad one is reported."""
    store = two_adapters(lorahub_home)
    legacy, good = store.get("sentiment").path, store.get("addition").path
    for folder in (legacy, good):
        (folder / METADATA).unlink()
    config = legacy / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": r}))
    result = cli("registry", "rebuild", "--json")
    assert result.code == 1 and "Internal error" not in result.stderr
    report = json.loads(result.stdout)
    assert report["indexed"] == ["addition"], "the good folder without metadata is still re-read"
    assert report["skipped"] == [
        {"path": str(legacy), "problem": f"adapter_config.json: r is {r!r}, not a positive integer"}
    ]


# --- what lorahub did not store inside its content folder ------------------------------------------


def composition(folder):
    """What `compose --out` writes: a PEFT folder with a recipe, and no lorahub_adapter.json."""
    folder.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(ADAPTERS / "capitals" / name, folder / name)
    (folder / "lorahub_recipe.json").write_text('{"format": 1}')
    (folder / "README.md").write_text("# a composition\n")
    return folder


def test_a_composition_inside_the_home_is_never_indexed_or_pruned(cli, lorahub_home):
    store = two_adapters(lorahub_home)
    mine = composition(lorahub_home / "adapters" / "zz--mine" / "v1")
    beside = composition(lorahub_home / "adapters" / "sentiment" / "v1")  # under an indexed id's folder
    for folder in (mine, beside):
        os.utime(folder, (0, 0))  # old enough for verify to judge
    before = {folder: checksums(folder) for folder in (mine, beside)}
    report = json.loads(cli("registry", "verify", "--prune", "--json").stdout)
    assert {(item["path"], item["kind"]) for item in report["leftovers"]} == {
        (str(mine), "foreign"),
        (str(beside), "foreign"),
    }
    rebuilt = cli("registry", "rebuild", "--json")
    assert rebuilt.code == 1 and json.loads(rebuilt.stdout)["indexed"] == ["addition", "sentiment"]
    assert {item["path"] for item in json.loads(rebuilt.stdout)["skipped"]} == {str(mine), str(beside)}
    assert {folder: checksums(folder) for folder in (mine, beside)} == before
    assert store.verify()[0] == []


# --- links ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tmp", "adapters", "registry.sqlite"])
def test_a_link_in_place_of_the_homes_own_folders_is_refused(cli, lorahub_home, tmp_path, name):
    two_adapters(lorahub_home)
    target = victim(tmp_path)
    (target / "999999999-deadbeef").mkdir()  # looks like a dead add's staging folder
    before = checksums(target)
    shutil.move(lorahub_home / name, tmp_path / f"moved-{name}")
    (lorahub_home / name).symlink_to(target)
    for args in (["registry", "add", ADAPTERS / "capitals"], ["registry", "verify", "--prune"], ["registry", "list"]):
        one_line_error(cli(*args), f"'{lorahub_home / name}' is a symbolic link")
    assert checksums(target) == before


def test_links_inside_the_content_folder_are_reported_and_never_followed(cli, lorahub_home, tmp_path):
    two_adapters(lorahub_home)
    target = victim(tmp_path)
    os.utime(target / "deep", (0, 0))
    before = checksums(target)
    (lorahub_home / "adapters" / "sentiment" / "fedcba9876543210-76543210").symlink_to(target / "deep")
    (lorahub_home / "adapters" / "outside").symlink_to(target)
    report = json.loads(cli("registry", "verify", "--prune", "--json").stdout)
    assert sorted(item["kind"] for item in report["leftovers"]) == ["foreign", "foreign"]
    rebuilt = cli("registry", "rebuild", "--json")
    assert rebuilt.code == 1 and json.loads(rebuilt.stdout)["indexed"] == ["addition", "sentiment"]
    assert checksums(target) == before


def test_an_add_never_stores_through_a_link_in_the_content_folder(cli, lorahub_home, tmp_path):
    Store(lorahub_home)
    target = victim(tmp_path)
    before = checksums(target)
    (lorahub_home / "adapters" / "sentiment").symlink_to(target)  # where `add` would put the id 'sentiment'
    one_line_error(cli("registry", "add", ADAPTERS / "sentiment"), "lorahub stores nothing through a link")
    assert checksums(target) == before and json.loads(cli("registry", "list", "--json").stdout) == []


def test_a_stored_file_linked_outside_is_reported_and_never_read(cli, lorahub_home, tmp_path):
    store = two_adapters(lorahub_home)
    record = store.get("sentiment")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(record.path / "adapter_model.safetensors", outside)  # same bytes: only the link is wrong
    (record.path / "adapter_model.safetensors").unlink()
    (record.path / "adapter_model.safetensors").symlink_to(outside)
    problems, _ = store.verify()
    assert [(p["id"], p["file"]) for p in problems] == [("sentiment", "adapter_model.safetensors")]
    assert "outside the adapter's folder; not read" in problems[0]["problem"]
    with pytest.raises(IntegrityError, match="outside the adapter's folder; not read"):
        store.check_file(record, "adapter_model.safetensors")
    # Every reader gets its records from the store: none is handed a record with a file linked out.
    one_line_error(cli("registry", "show", "sentiment"), "names file 'adapter_model.safetensors', which is a link")
    composed = cli("compose", "--shots", EXAMPLES / "shots" / "capitals.jsonl", "--out", tmp_path / "c")
    assert composed.code == 1 and REBUILD in composed.stderr.splitlines()[-1] and not (tmp_path / "c").exists()


@pytest.mark.parametrize("name", ["lorahub_card.json", "lorahub_card.safetensors"])
def test_card_files_linked_outside_are_refused(cli, registry_with_examples, tmp_path, name):
    record = Store(registry_with_examples).get("examples/sentiment")
    outside = tmp_path / name
    shutil.copy(record.path / name, outside)  # a faithful copy: the hash inside the card still matches
    (record.path / name).unlink()
    (record.path / name).symlink_to(outside)
    assert sha256_file(record.path / name) == sha256_file(outside)
    for args in (["card", "show", "examples/sentiment"], ["retrieve", "--query", "I loved it", "-k", "1"]):
        one_line_error(cli(*args), f"names file '{name}', which is a link to '{outside}', outside the adapter's")
    with pytest.raises(IntegrityError, match=f"{name} is a link to '{outside}', outside the adapter's folder"):
        Card.load(record.path, record.id)  # on its own too: a card is also read from folders outside a registry


def test_an_edited_config_is_refused_before_its_adapter_is_used(lorahub_home):
    """A config's alpha scales the adapter's delta as much as its weights do: it is hash-checked like them."""
    from lorahub_cli.compose.pipeline import load_modules

    store = two_adapters(lorahub_home)
    record = store.get("sentiment")
    config = record.path / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": 512}))
    with pytest.raises(
        IntegrityError, match="file 'adapter_config.json' of adapter 'sentiment' is missing or corrupted"
    ):
        load_modules(store, [record])
    assert [a.name for a in load_modules(store, [store.get("addition")])] == ["addition"]
