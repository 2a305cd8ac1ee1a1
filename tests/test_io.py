import pytest

from lorahub_cli.errors import InputError
from lorahub_cli.io import Example, read_examples


def write(tmp_path, content: bytes | str, name="shots.jsonl"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_reads_targets_and_aliases(tmp_path):
    path = write(
        tmp_path, '{"input": "a", "target": "1"}\n\n{"input": "b", "output": "2"}\n{"input": "c", "completion": "3"}\n'
    )
    assert read_examples(path) == [Example("a", "1"), Example("b", "2"), Example("c", "3")]


def test_inputs_may_lack_targets(tmp_path):
    path = write(tmp_path, '{"input": "a"}\n')
    assert read_examples(path, require_target=False) == [Example("a", None)]


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"input": "a", "target": "1"}\n{"input": "b", "target": \n', r"shots.jsonl:2: not valid JSON"),
        ('{"input": "a"}\n', r"shots.jsonl:1: missing field 'target' or 'output' or 'completion'"),
        ('{"target": "a"}\n', r"shots.jsonl:1: missing field 'input'"),
        ('["input", "a"]\n', r"shots.jsonl:1: expected a JSON object, got list"),
        ('{"input": 3, "target": "a"}\n', r"shots.jsonl:1: field 'input' must be a string, got int"),
        ('{"input": "  ", "target": "a"}\n', r"shots.jsonl:1: field 'input' is empty"),
        ("\n\n", r"shots.jsonl is empty"),
        (
            b'{"input": "a", "target": "b"}\n{"input": "\xff"}\n',
            r"shots.jsonl:2: the file is not valid UTF-8 \(byte 0xff\)",
        ),
    ],
)
def test_bad_files_name_the_line_and_the_problem(tmp_path, content, expected):
    with pytest.raises(InputError, match=expected) as info:
        read_examples(write(tmp_path, content))
    assert info.value.hint and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"input": "' + "[" * 100_000 + '", "target": "a"}\n', None),  # deep nesting inside a string is fine
        (
            '{"input": ' + "[" * 100_000 + "]" * 100_000 + ', "target": "a"}\n',
            r"shots.jsonl:1: the JSON is nested too deeply",
        ),
        ('{"input": "\\ud800", "target": "a"}\n', r"shots.jsonl:1: field 'input' holds a lone surrogate \(\\ud800\)"),
        ('{"input": "a", "target": "\\udfff"}\n', r"shots.jsonl:1: field 'target' holds a lone surrogate \(\\udfff\)"),
        (
            '{"input": "a", "target": "b"}\n{"input": "' + "x" * (2 << 20) + '", "target": "b"}\n',
            r"shots.jsonl:2: the line has 2,097,\d+ characters; one example may have at most 1,048,576",
        ),
    ],
    ids=["brackets-in-a-string", "deep-nesting", "surrogate-input", "surrogate-target", "huge-line"],
)
def test_hostile_files_are_one_line_errors(tmp_path, content, expected):
    path = write(tmp_path, content)
    if expected is None:
        assert len(read_examples(path)) == 1
        return
    with pytest.raises(InputError, match=expected) as info:
        read_examples(path)
    assert "\n" not in str(info.value)


def test_a_directory_and_a_huge_file(tmp_path):
    with pytest.raises(InputError, match=f"'{tmp_path}' is a directory, not a file"):
        read_examples(tmp_path)
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as handle:
        handle.truncate((64 << 20) + 1)  # sparse: no real memory or disk
    with pytest.raises(InputError, match=r"big.jsonl is 64 MiB; a shots or inputs file may hold at most 64 MiB"):
        read_examples(big)
