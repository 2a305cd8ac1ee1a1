"""Answering with one adapter: a folder `lorahub compose` wrote (or any PEFT LoRA folder, or a registry id) through
`generate --adapter` and `serve --adapter`, token for token what PEFT generates loading that folder (fp32)."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from peft import PeftModel
from test_serve import decode_ids, home, library, post, running, task_inputs  # noqa: F401  (fixtures)
from tiny_models import one_thread  # noqa: F401  (fixture)
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from lorahub_cli.serve.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_TOKENS = 5
TEXTS = task_inputs("capitals", 2) + task_inputs("sentiment", 1)


def peft_answers(library, folder, texts: list[str], adapter: bool = True) -> list[str]:
    """What PEFT generates, greedy and unpadded, loading `folder` onto the base (or the base alone)."""
    model = AutoModelForSeq2SeqLM.from_pretrained(library / "base")
    model = (PeftModel.from_pretrained(model, folder) if adapter else model).eval()
    tokenizer = decode_ids(AutoTokenizer.from_pretrained(library / "base"))
    answers = []
    for text in texts:
        with torch.no_grad():
            out = model.generate(
                **tokenizer([text], return_tensors="pt"),
                do_sample=False,
                num_beams=1,
                max_new_tokens=NEW_TOKENS,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        answers.append(tokenizer.batch_decode(out[:, 1:])[0])
    return answers


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def composed(cli, home, tmp_path):  # noqa: F811
    """A task-level composition written by `lorahub compose` (fixed weights: large deltas, no search)."""
    shots = write_jsonl(tmp_path / "shots.jsonl", [{"input": t, "target": "x"} for t in TEXTS])
    out = tmp_path / "my-lora"
    weights = "capitals=1.0,sentiment=0.7"
    result = cli("compose", "--shots", shots, "--modules", "capitals,sentiment", "--weights", weights, "--out", out)
    assert result.code == 0, result.stderr
    return out


@pytest.fixture
def token_text(monkeypatch):
    """Engines built by the commands decode ids as numbers (`decode_ids`), so equal text is equal tokens."""
    original = Engine.from_adapter.__func__

    def from_adapter(cls, *args, **kwargs):
        engine = original(cls, *args, **kwargs)
        decode_ids(engine.base.tokenizer)
        return engine

    monkeypatch.setattr(Engine, "from_adapter", classmethod(from_adapter))


def test_generate_answers_with_a_composition_as_peft_does(cli, library, composed, token_text, tmp_path):  # noqa: F811
    expected = peft_answers(library, composed, TEXTS)
    assert expected != peft_answers(library, composed, TEXTS, adapter=False), "the adapter must change the answers"
    requests = write_jsonl(tmp_path / "requests.jsonl", [{"input": t} for t in TEXTS])
    result = cli(
        "generate",
        "--inputs",
        requests,
        "--adapter",
        composed,
        "--max-new-tokens",
        NEW_TOKENS,
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--json",
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [a["output"] for a in summary["answers"]] == expected
    assert all(a["adapters"] == [{"id": "my-lora", "weight": 1.0}] for a in summary["answers"])
    assert summary["engine"]["source"] == "adapter" and summary["engine"]["adapters"] == 1
    # Static batches of two, padded: the same tokens.
    static = cli(
        "generate", "--inputs", requests, "--adapter", composed, "--max-new-tokens", NEW_TOKENS,
        "--dtype", "float32", "--batching", "static", "--batch-size", "2", "--json",
    )  # fmt: skip
    assert [a["output"] for a in json.loads(static.stdout)["answers"]] == expected


def test_serve_answers_with_a_composition_as_peft_does(cli, library, composed, token_text, monkeypatch):  # noqa: F811
    from lorahub_cli.serve import server

    apps = []
    monkeypatch.setattr(server, "run", lambda app, **kwargs: apps.append(app))
    result = cli("serve", "--adapter", composed, "--dtype", "float32", "--device", "cpu", "--port", "0")
    assert result.code == 0, result.stderr
    assert "Serving the adapter my-lora on" in result.stderr
    expected = peft_answers(library, composed, TEXTS)
    with running(apps[0]) as (url, _):
        replies = [post(url + "/v1/generate", {"input": t, "max_new_tokens": NEW_TOKENS}) for t in TEXTS]
        status, completion = post(
            url + "/v1/completions",
            # OpenAI's default temperature is 1 (it samples): 0 asks for the greedy answer PEFT's is compared with
            {"model": "my-lora", "prompt": TEXTS[0], "max_tokens": NEW_TOKENS, "temperature": 0},
        )
        # The one adapter streams and samples as retrieval does: the joined stream is the greedy answer, a seed
        # draws the same sample on every route.
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        asked = dict(model="my-lora", prompt=TEXTS[0], max_tokens=NEW_TOKENS)
        streamed = "".join(c.choices[0].text for c in client.completions.create(**asked, temperature=0, stream=True))
        sampled = [client.completions.create(**asked, temperature=1.0, seed=7).choices[0].text for _ in range(2)]
        drawn = post(
            url + "/v1/generate", {"input": TEXTS[0], "max_new_tokens": NEW_TOKENS, "temperature": 1, "seed": 7}
        )
    assert [status for status, _ in replies] == [200] * len(TEXTS)
    assert [reply["output"] for _, reply in replies] == expected
    assert status == 200 and completion["choices"][0]["text"] == expected[0]
    assert streamed == expected[0]
    assert sampled[0] == sampled[1] == drawn[1]["output"] and sampled[0] != expected[0]


def test_any_peft_folder_and_a_registry_id_answer_too(cli, home, library, token_text, tmp_path):  # noqa: F811
    from lorahub_cli.registry import Store

    requests = write_jsonl(tmp_path / "requests.jsonl", [{"input": t} for t in TEXTS])
    plain = library / "adapters" / "addition"  # a PEFT folder lorahub did not write
    expected = peft_answers(library, plain, TEXTS)
    for adapter, name in ((plain, "addition"), ("addition", "addition")):
        result = cli("generate", "--inputs", requests, "--adapter", adapter, "--max-new-tokens", NEW_TOKENS,
                     "--dtype", "float32", "--json")  # fmt: skip
        assert result.code == 0, result.stderr
        answers = json.loads(result.stdout)["answers"]
        assert [a["output"] for a in answers] == expected and answers[0]["adapters"][0]["id"] == name
    stored = Store(home).get("addition")
    (stored.path / "adapter_model.safetensors").write_bytes(b"damaged")
    result = cli("generate", "--inputs", requests, "--adapter", "addition")
    assert result.code != 0 and "adapter_model.safetensors" in result.stderr and "corrupted" in result.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-k", "2"], "--adapter chooses the adapters; -k, --compose and --base-model do not apply"),
        (["--composition", "x"], "Give one of them"),
    ],
)
def test_adapter_options_that_do_not_apply_are_refused(cli, home, composed, tmp_path, extra, message):  # noqa: F811
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"input": "hi"}\n')
    result = cli("generate", "--inputs", requests, "--adapter", composed, *extra)
    assert result.code == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_the_wrong_kind_of_folder_names_the_right_option(cli, home, composed, tmp_path):  # noqa: F811
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"input": "hi"}\n')
    result = cli("generate", "--inputs", requests, "--composition", composed)
    assert result.code == 2 and f"--adapter {composed}" in result.stderr
    result = cli("generate", "--inputs", requests, "--adapter", tmp_path / "nowhere")
    assert result.code == 2 and "neither a folder nor an adapter id" in result.stderr
    shots = write_jsonl(tmp_path / "two.jsonl", [{"input": t, "target": "x"} for t in TEXTS[:2]])
    instance = tmp_path / "instance"
    result = cli("compose", "--shots", shots, "--level", "instance", "-n", "2", "--budget", "1", "--out", instance)
    assert result.code == 0, result.stderr
    result = cli("generate", "--inputs", requests, "--adapter", instance)
    assert result.code == 2 and f"--composition {instance}" in result.stderr


def test_the_model_card_names_the_commands_that_answer_with_it(composed):
    card = (composed / "README.md").read_text()
    assert "lorahub generate --adapter PATH --inputs requests.jsonl" in card
    assert "lorahub serve --adapter PATH" in card and "PeftModel.from_pretrained" in card
