"""Every output guarded like compose's, and the last unexpected exceptions as one-line errors (issue 22).

Each command that writes a file or a folder refuses, before any work, to write inside the lorahub home or under
a name the file system cannot hold, and replaces only what lorahub wrote, only with --overwrite.
"""

from __future__ import annotations

import errno
import json

import pytest
from conftest import SHOTS

from lorahub_cli.errors import LorahubError

LONG = "a" * 300  # longer than any file system's name limit (255 bytes on ext4, tmpfs, xfs, btrfs)


def one_line_error(result, code: int = 2) -> str:
    assert result.code == code, (result.code, result.stderr)
    assert "Internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def tree(folder):
    return sorted((p.relative_to(folder).as_posix(), p.is_file() and p.read_bytes()) for p in folder.rglob("*"))


def requests_file(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps({"input": "What is the capital of France?"}) + "\n")
    return path


# --- one command per output, each told to write where it may not --------------------------------------

COMMANDS = {
    "compose": lambda out, tmp: (
        ["compose", "--shots", SHOTS, "--modules", "capitals", "--weights", "capitals=1"] + ["--out", out]
    ),
    "compose --tasks": lambda out, tmp: ["compose", "--tasks", SHOTS.parent, "--out", out],
    "generate": lambda out, tmp: ["generate", "--inputs", requests_file(tmp), "--out", out],
    "eval": lambda out, tmp: ["eval", "demo", "--tasks", "larger_option", "--methods", "zero-shot", "--out", out],
    "retriever train": lambda out, tmp: ["retriever", "train", "--out", out],
    "demo": lambda out, tmp: ["demo", "--out", out],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_writes_inside_the_registry_home(cli, t5_home, tmp_path, command):
    home = t5_home[0]
    before = tree(home)
    out = home / "adapters" / "zz--mine" / "v1"
    error = one_line_error(cli(*COMMANDS[command](out, tmp_path)))
    assert f"refusing to write '{out}': it is the lorahub home ({home}) or inside it" in error
    assert tree(home) == before, "nothing was written into the registry"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_name_too_long_for_the_file_system_is_one_line_before_any_work(cli, t5_home, tmp_path, command):
    out = tmp_path / LONG
    error = one_line_error(cli(*COMMANDS[command](out, tmp_path)))
    assert f"cannot write '{out}': the name 'aaaa" in error and "is 300 bytes long" in error
    deeper = tmp_path / LONG / "adapter"
    assert "is 300 bytes long" in one_line_error(cli(*COMMANDS[command](deeper, tmp_path)))


def test_generate_replaces_a_file_only_with_overwrite(cli, t5_home, tmp_path):
    requests = requests_file(tmp_path)
    mine = tmp_path / "answers.jsonl"
    mine.write_text("my own notes\n")
    error = one_line_error(cli("generate", "--inputs", requests, "--out", mine))
    assert f"'{mine}' already exists." in error and "--overwrite" in error
    assert mine.read_text() == "my own notes\n"
    error = one_line_error(cli("generate", "--inputs", requests, "--out", requests, "--overwrite"))
    assert "it is the input" in error and requests.read_text().startswith('{"input"')
    folder = tmp_path / "folder"
    folder.mkdir()
    error = one_line_error(cli("generate", "--inputs", requests, "--out", folder, "--overwrite"))
    assert f"'{folder}' is not a file." in error
    result = cli("generate", "--inputs", requests, "--max-new-tokens", "2", "--dtype", "float32", "--out", mine)
    assert result.code == 2 and mine.read_text() == "my own notes\n"
    result = cli(
        "generate", "--inputs", requests, "--max-new-tokens", "2", "--dtype", "float32", "--out", mine, "--overwrite"
    )
    assert result.code == 0, result.stderr
    assert [json.loads(line)["input"] for line in mine.read_text().splitlines()] == ["What is the capital of France?"]


def test_eval_writes_only_into_a_new_empty_or_run_folder(cli, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "report.md").write_text("my report")
    error = one_line_error(cli(*COMMANDS["eval"](mine, tmp_path)))
    assert f"refusing to write into '{mine}': it holds files but no run.json" in error
    assert tree(mine) == [("report.md", b"my report")]


def test_an_os_error_while_writing_a_folder_is_one_line_naming_it(tmp_path):
    from lorahub_cli.outputs import write_folder

    def fill(tmp):
        (tmp / "part").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    with pytest.raises(LorahubError, match=f"could not write '{out}': No space left on device.") as error:
        write_folder(out, fill)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == [], "neither the output nor its temporary folder is left"


# --- values that ended in an internal error, or were accepted ------------------------------------------


def _compose(cli, tmp_path, *extra):
    return cli("compose", "--shots", SHOTS, "--out", tmp_path / "out", *extra)


def test_compose_model_path_that_is_neither_a_folder_nor_an_id(cli, t5_home, tmp_path):
    result = _compose(cli, tmp_path, "--modules", "capitals", "--weights", "capitals=1", "--model-path", "/no/such/x")
    assert "'/no/such/x' is neither a model folder nor a Hub model id" in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_compose_seed_beyond_32_bits(cli, t5_home, tmp_path):
    error = one_line_error(_compose(cli, tmp_path, "--seed", str(2**70)))
    assert f"--seed {2**70} is out of range" in error and "4294967295" in error


def test_compose_svd_rank_must_be_positive(cli, t5_home, tmp_path):
    error = one_line_error(
        _compose(cli, tmp_path, "--modules", "capitals,addition", "--formula", "svd", "--svd-rank", "-3")
    )
    assert "svd_rank must be a whole number of 1 or more, got -3" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--port", "70000"], "Invalid value for '--port': '70000' is not a whole number from 0 to 65535."),
        (
            ["compose", "--budget", "1e3"],
            "Invalid value for '--budget': '1e3' is not a whole number of 1 or more (write it as 1000).",
        ),
        (["compose", "--density", "half"], "Invalid value for '--density': 'half' is not a number."),
    ],
)
def test_a_bad_number_names_the_value_and_what_is_allowed(cli, args, message):
    result = cli(*args)
    assert result.code == 2 and result.stderr.strip().splitlines()[-1] == f"Error: {message}"


def test_demo_unknown_task_is_a_usage_error(cli, tmp_path):
    error = one_line_error(cli("demo", "--task", "no_such_task", "--out", tmp_path / "out"))
    assert "'no_such_task' is not a held-out task of the demo library" in error
