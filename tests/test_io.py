import pytest

from lorahub_cli.errors import InputError
from lorahub_cli.io import Example, read_examples


def write(tmp_path, content: bytes | str, name="shots.jsonl"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_reads_targets_and_aliases(tmp_path):
    path = write(tmp_path, '{"input": "a", "target": "1"}\n\n{"input": "b", "output": "2"}\n{"input": "c", "completion": "3"}\n')
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
        (b'{"input": "a", "target": "b"}\n{"input": "\xff"}\n', r"shots.jsonl:2: the file is not valid UTF-8 \(byte 0xff\)"),
    ],
)
def test_bad_files_name_the_line_and_the_problem(tmp_path, content, expected):
    with pytest.raises(InputError, match=expected) as info:
        read_examples(write(tmp_path, content))
    assert info.value.hint and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl")
