"""The command line as a user meets it: data on stdout, one-line errors on stderr, exit codes."""

import json
import subprocess
import sys

import pytest
from conftest import EXAMPLES

from lorahub_cli import __version__


def test_version_and_help(cli):
    assert cli("--version").stdout.strip() == f"lorahub {__version__}"
    root = cli("--help")
    assert root.code == 0 and "Getting started" in root.stdout and "walkthrough" in root.stdout
    for command in (["registry", "add"], ["registry", "sync"], ["registry", "list"], ["card", "build"], ["retrieve"]):
        text = cli(*command, "--help").stdout
        assert "Examples:" in text and f"lorahub {' '.join(command)}" in text, command


def test_add_list_show_remove(cli, lorahub_home):
    added = cli(
        "registry",
        "add",
        EXAMPLES / "adapters" / "capitals",
        "--name",
        "caps",
        "--data",
        EXAMPLES / "data" / "capitals.jsonl",
        "--json",
    )
    assert added.code == 0, added.stderr
    assert json.loads(added.stdout)["adapter"]["has_card"] is True
    listed = json.loads(cli("registry", "list", "--json").stdout)
    assert [a["id"] for a in listed] == ["caps"] and listed[0]["r"] == 4 and listed[0]["target_modules"] == ["q", "v"]
    assert listed[0]["source"] == str((EXAMPLES / "adapters" / "capitals").resolve()) and listed[0]["revision"] is None
    assert cli("registry", "list", "--base-model", "other/model", "--json").stdout.strip() == "[]"
    assert "caps" in cli("registry", "list").stdout
    shown = json.loads(cli("registry", "show", "caps", "--json").stdout)
    assert shown["card_embedder"].startswith("sentence-transformers/all-MiniLM-L6-v2@")
    card = json.loads(cli("card", "show", "caps", "--json").stdout)
    assert card["n_examples"] == 80 and card["dim"] == 384 and card["recipe"]["fields"] == "input+target"
    assert cli("registry", "path").stdout.strip() == str(lorahub_home)
    assert cli("registry", "verify").code == 0
    refused = cli("registry", "remove", "caps")
    assert refused.code != 0 and "--yes" in refused.stderr
    assert "Would delete caps" in cli("registry", "remove", "caps", "--dry-run").stderr
    assert cli("registry", "remove", "caps", "--yes").code == 0
    assert cli("registry", "list", "--json").stdout.strip() == "[]"


def test_card_with_loraretriever_recipe(cli, registry_with_examples):
    built = cli(
        "card",
        "build",
        "examples/weekdays",
        "--data",
        EXAMPLES / "data" / "weekdays.jsonl",
        "--inputs-only",
        "--instruction",
        "Represent the sentence for similar task retrieval: ",
        "--json",
    )
    assert built.code == 0, built.stderr
    assert json.loads(built.stdout)["recipe"] == {
        "fields": "input",
        "instruction": "Represent the sentence for similar task retrieval: ",
        "separator": "\n",
    }
    # Cards with different instructions cannot answer one query.
    mixed = cli("retrieve", "--query", "Monday")
    assert mixed.code != 0 and "different instructions" in mixed.stderr
    orphan = cli(
        "card", "build", "examples/weekdays", "--data", EXAMPLES / "data" / "weekdays.jsonl", "--instruction", "x"
    )
    assert orphan.code != 0 and "--instruction goes with --inputs-only" in orphan.stderr


def test_retrieve_outputs(cli, registry_with_examples):
    shots, inputs = EXAMPLES / "shots" / "addition.jsonl", EXAMPLES / "inputs" / "addition.jsonl"
    task = json.loads(cli("retrieve", "--shots", shots, "-k", "3", "--json").stdout)
    assert task["level"] == "task" and len(task["results"]) == 3
    assert task["results"][0]["id"] == "examples/addition" and set(task["results"][0]) == {"id", "score"}
    instance = json.loads(
        cli("retrieve", "--shots", shots, "--level", "instance", "--inputs", inputs, "-k", "2", "--json").stdout
    )
    assert instance["level"] == "instance" and [s["index"] for s in instance["shots"]] == list(range(5))
    assert len(instance["routes"]) == 10 and all(0 <= r["shot"] < 5 for r in instance["routes"])
    per_input = json.loads(cli("retrieve", "--inputs", inputs, "-k", "1", "--json").stdout)
    assert [row["results"][0]["id"] for row in per_input["inputs"]] == ["examples/addition"] * 10
    query = json.loads(cli("retrieve", "--query", "Sort these words: pear, apple", "-k", "1", "--json").stdout)
    assert query["level"] == "query" and query["results"][0]["id"] == "examples/word_sorting"
    table = cli("retrieve", "--shots", shots, "-k", "2")
    assert "examples/addition" in table.stdout and table.stderr == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["registry", "show", "nope"],
            "Error: adapter 'nope' is not in the registry. Add it with: lorahub registry add nope",
        ),
        (
            ["retrieve", "--query", "x"],
            "Error: the registry has no adapters. Add some with: lorahub registry add SOURCE",
        ),
        (["registry", "sync"], "Error: give exactly one of --catalog NAME or --author ORG."),
        (
            ["registry", "sync", "--catalog", "nope"],
            "Error: catalogue 'nope' does not exist. Available: lorahub-flan-t5-large, loraretriever-llama2-7b.",
        ),
        (["registry", "add", "/no/such/folder"], "Error: '/no/such/folder' has no adapter_config.json."),
        (["card", "build", "nope", "--data", "x.jsonl"], "Error: adapter 'nope' is not in the registry."),
        (
            ["retrieve", "--shots", "missing.jsonl"],
            "Error: file 'missing.jsonl' does not exist. Check the path.",
        ),
        (["retrieve", "--level", "batch", "--query", "x"], "Error: --level must be 'task' or 'instance', not 'batch'."),
    ],
)
def test_errors_are_one_line_and_non_zero(cli, args, message):
    result = cli(*args)
    assert result.code != 0
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_bad_shots_file(cli, registry_with_examples, tmp_path):
    shots = tmp_path / "shots.jsonl"
    shots.write_text('{"input": "a", "target": "b"}\n{"input": "c"}\n')
    result = cli("retrieve", "--shots", shots)
    assert result.code == 2 and result.stderr.startswith(f"Error: {shots}:2: missing field 'target'")
    both = cli("retrieve", "--shots", shots, "--query", "x")
    assert both.code == 2 and "give --shots FILE, --query TEXT or --inputs FILE" in both.stderr


def test_debug_shows_the_traceback(lorahub_home):
    env = {"LORAHUB_HOME": str(lorahub_home), "PATH": "/usr/bin:/bin"}
    quiet = subprocess.run(
        [sys.executable, "-m", "lorahub_cli", "registry", "show", "nope"], env=env, capture_output=True, text=True
    )
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    loud = subprocess.run(
        [sys.executable, "-m", "lorahub_cli", "registry", "show", "nope"],
        env={**env, "LORAHUB_DEBUG": "1"},
        capture_output=True,
        text=True,
    )
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "NotFoundError" in loud.stderr


def test_walkthrough(cli):
    result = cli("walkthrough", "--task", "capitals", "-k", "2", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["adapters"] == 8 and report["task_level"]["results"][0]["id"] == "examples/capitals"
    assert report["per_input"] == {"inputs": 80, "top1_correct": 80}
    assert cli("walkthrough", "--task", "nope").stderr.startswith("Error: --task 'nope' is not an example task.")


@pytest.mark.parametrize(
    "args, message",
    [
        (["registry", "list", "--bogus"], "No such option: --bogus"),
        (["registry", "show"], "Missing argument 'adapter_id'"),
        (["retrieve", "--query", "x", "-k", "0"], "Invalid value for '-k' / '--top-k'"),
    ],
)
def test_usage_errors_exit_2_with_clicks_message(cli, args, message):
    result = cli(*args)
    assert result.code == 2, result.stderr
    assert "Internal error" not in result.stderr and "Usage: lorahub" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith(f"Error: {message}"), result.stderr


@pytest.mark.parametrize("args", [[], ["registry"]])
def test_a_group_without_a_command_shows_its_help_and_exits_2(cli, args):
    result = cli(*args)
    assert result.code == 2 and "Internal error" not in result.stderr
    assert "Usage: lorahub" in result.stdout + result.stderr and "Commands" in result.stdout + result.stderr
