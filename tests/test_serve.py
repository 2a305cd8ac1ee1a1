"""Mixed-task serving: per-request retrieval and composition in shared batches (generate, the engine, HTTP).

The reference for every row is the request run alone: its adapters retrieved on their own,
composed with the formula by `compose` (not the bank), loaded in PEFT, generated unpadded.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from conftest import EXAMPLES
from peft import PeftModel
from tiny_models import make_lora_adapter, one_thread, save_tiny_base  # noqa: F401  (fixture)
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from lorahub_cli.cards.data import CardOptions
from lorahub_cli.compose.adapters import load_adapter, save_adapter
from lorahub_cli.compose.formulas import combine
from lorahub_cli.io import Example
from lorahub_cli.registry import Store
from lorahub_cli.registry.cards import card_from_source
from lorahub_cli.registry.mirror import add_local
from lorahub_cli.serve.batcher import Batcher, QueueFull, ShuttingDown, Stepper
from lorahub_cli.serve.engine import Answer, Engine, Request, ServingEngine
from lorahub_cli.serve.server import create_app, make_server

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ["capitals", "addition", "sentiment", "antonyms", "weekdays"]
INSTRUCTION = "Represent the sentence for similar task retrieval: "
NEW_TOKENS = 6


def task_inputs(task: str, n: int = 2) -> list[str]:
    lines = (EXAMPLES / "inputs" / f"{task}.jsonl").read_text().splitlines()
    return [json.loads(line)["input"] for line in lines[:n]]


def decode_ids(tokenizer):
    """Token ids as text: a random model's bytes are mostly invalid UTF-8, which decoding would drop."""

    def batch_decode(rows, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in row if int(t) > 2) for row in rows]

    tokenizer.batch_decode = batch_decode
    tokenizer.decode = lambda ids, skip_special_tokens=True: batch_decode([ids])[0]
    return tokenizer


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A tiny T5 and five adapters (non-zero, large B) with LoraRetriever cards (inputs only, instruction prefix)."""
    root = tmp_path_factory.mktemp("serve-library")
    model = save_tiny_base("t5", root / "base")
    store = Store(root / "home")
    for seed, task in enumerate(TASKS):
        # alpha 128: at w = 1/k the composed delta must move a tiny random model off its one repeated token.
        folder = make_lora_adapter(
            model, root / "adapters" / task, alpha=128, seed=seed, base_model_name=str(root / "base")
        )
        add_local(store, folder, name=task)
        card_from_source(
            store,
            task,
            CardOptions(data=EXAMPLES / "data" / f"{task}.jsonl", inputs_only=True, instruction=INSTRUCTION),
        )
    return root


@pytest.fixture
def home(library, lorahub_home):
    shutil.copytree(library / "home", lorahub_home)
    return lorahub_home


def engine_for(home, **options) -> Engine:
    engine = Engine.from_registry(Store(home), dtype="float32", device="cpu", **options)
    decode_ids(engine.base.tokenizer)
    return engine


def alone(library, store, text: str, k: int, mode: str) -> str:
    """One request on its own: retrieval for it alone, `compose` of its modules, PEFT, no padding. `scored`: the
    linear formula with w_i = exp(s_i / t) / sum_j exp(s_j / t) over its k scores, written out here."""
    from lorahub_cli import retrieval
    from lorahub_cli.settings import SERVE

    index = retrieval.CardIndex.from_store(store)
    ranked = retrieval.per_input(index, index.embedder(), [Example(text)], k).inputs[0]
    ids = [m.id for m in ranked][: 1 if mode == "single" else k]
    adapters = [load_adapter(store.get(i).path, name=i) for i in ids]
    formula = {"mixture": "linear", "fusion": "fusion", "single": "elementwise", "scored": "linear"}[mode]
    weights = [1.0 / len(ids)] * len(ids)
    if mode == "scored":
        exps = [math.exp(m.score / SERVE["score_temperature"]) for m in ranked[:k]]
        weights = [e / sum(exps) for e in exps]
    composed = combine(adapters, None if formula == "fusion" else weights, formula, name="alone")
    folder = save_adapter(composed, library / "alone" / f"{abs(hash((text, k, mode)))}")
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(library / "base"), folder).eval()
    tokenizer = decode_ids(AutoTokenizer.from_pretrained(library / "base"))
    ids_in = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids_in,
            do_sample=False,
            num_beams=1,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.batch_decode(out[:, 1:])[0]


def test_mixed_batch_rows_equal_each_request_alone(library, home):
    """Different tasks, k and compose modes in one call; batches of 4 mix them all."""
    engine = engine_for(home, max_new_tokens=NEW_TOKENS, batch_size=4)
    plan = [
        ("capitals", 3, "mixture"),
        ("addition", 1, "mixture"),
        ("sentiment", 2, "fusion"),
        ("antonyms", 3, "fusion"),
        ("weekdays", 2, "single"),
        ("capitals", 2, "mixture"),
        ("antonyms", 3, "scored"),
        ("weekdays", 2, "scored"),
    ]
    requests = [Request(text, k, mode) for (task, k, mode) in plan for text in task_inputs(task, 1)]
    answers = engine.run(requests)
    for request, answer in zip(requests, answers):
        assert answer.route["compose"] == request.compose
        assert len(answer.route["adapters"]) == (1 if request.compose == "single" else request.k)
        assert answer.output == alone(library, Store(home), request.input, request.k, request.compose), request
    assert [a.route["adapters"][0]["id"] for a in answers] == [task for task, _, _ in plan], (
        "each input retrieves its task"
    )
    assert len({a.output for a in answers}) > 2, "the rows differ, so the comparison can fail"
    for answer in answers[-2:]:  # scored: each request's own weights, the softmax of its scores
        weights = [a["weight"] for a in answer.route["adapters"]]
        assert sum(weights) == pytest.approx(1) and len(set(weights)) == len(weights), weights
        assert weights == sorted(weights, reverse=True), "the nearer adapter weighs more"


def test_batching_does_not_change_outputs_and_limits_are_per_request(home):
    engine = engine_for(home, max_new_tokens=NEW_TOKENS, batch_size=8)
    texts = [t for task in TASKS for t in task_inputs(task, 2)]
    limits = [1 + i % NEW_TOKENS for i in range(len(texts))]
    together = engine.run([Request(t, max_new_tokens=m) for t, m in zip(texts, limits)])
    one_by_one = [engine.run([Request(t)])[0] for t in texts]
    for a, b, m in zip(together, one_by_one, limits):
        assert a.output.split() == b.output.split()[:m]
        assert [(x["id"], x["weight"]) for x in a.route["adapters"]] == [
            (x["id"], x["weight"]) for x in b.route["adapters"]
        ]


def test_generate_cli_writes_answers_with_their_adapters(cli, home, tmp_path):
    requests = tmp_path / "requests.jsonl"
    rows = [{"input": t} for t in task_inputs("capitals", 2)] + [
        {"input": task_inputs("addition", 1)[0], "k": 1, "compose": "single"}
    ]
    requests.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    result = cli("generate", "--inputs", requests, "--max-new-tokens", "4", "--dtype", "float32", "--out", out)
    assert result.code == 0, result.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["input"] for a in answers] == [r["input"] for r in rows]
    assert [len(a["adapters"]) for a in answers] == [3, 3, 1] and answers[2]["compose"] == "single"
    assert answers[0]["adapters"][0] == {
        "id": "capitals",
        "weight": pytest.approx(1 / 3),
        "score": pytest.approx(answers[0]["adapters"][0]["score"]),
    }
    assert answers[2]["adapters"][0]["id"] == "addition" and answers[2]["adapters"][0]["weight"] == 1.0
    result = cli(
        "generate",
        "--inputs",
        requests,
        "--max-new-tokens",
        "4",
        "--dtype",
        "float32",
        "--compose",
        "fusion",
        "-k",
        "2",
        "--json",
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["requests"] == 3 and summary["engine"]["adapters"] == len(TASKS)
    assert [a["compose"] for a in summary["answers"]] == ["fusion", "fusion", "single"]


def test_generate_from_an_instance_level_composition(cli, home, library, tmp_path):
    shots = tmp_path / "shots.jsonl"
    shots.write_text(
        "".join(
            (EXAMPLES / "shots" / f"{t}.jsonl").read_text().splitlines(True)[0]
            for t in ("capitals", "addition", "sentiment")
        )
    )
    composition = tmp_path / "instance"
    result = cli(
        "compose",
        "--shots",
        shots,
        "--level",
        "instance",
        "-n",
        "2",
        "--budget",
        "2",
        "--dtype",
        "float32",
        "--out",
        composition,
    )
    assert result.code == 0, result.stderr
    requests = tmp_path / "requests.jsonl"
    texts = [task_inputs(t, 1)[0] for t in ("sentiment", "capitals", "addition")]
    requests.write_text("".join(json.dumps({"input": t}) + "\n" for t in texts))
    result = cli(
        "generate",
        "--inputs",
        requests,
        "--composition",
        composition,
        "--max-new-tokens",
        "4",
        "--dtype",
        "float32",
        "--json",
    )
    assert result.code == 0, result.stderr
    answers = json.loads(result.stdout)["answers"]
    assert [a["shot"] for a in answers] == [2, 0, 1], "each input goes to the shot of its own task"
    recipe = json.loads((composition / "lorahub_recipe.json").read_text())
    for answer in answers:
        entry = recipe["compositions"][answer["shot"]]
        assert answer["composition"] == entry["folder"]
        assert answer["adapters"] == [{"id": m["id"], "weight": m["weight"]} for m in entry["modules"]]
    # Each answer is what PEFT generates with that shot's composition folder, alone.
    # k is not a composition's business: more than its three shots is no error.
    engine = Engine.from_composition(composition, dtype="float32", device="cpu", max_new_tokens=4, k=5)
    decode_ids(engine.base.tokenizer)
    tokenizer = decode_ids(AutoTokenizer.from_pretrained(library / "base"))
    for answer, routed in zip(answers, engine.run([Request(t) for t in texts])):
        model = PeftModel.from_pretrained(
            AutoModelForSeq2SeqLM.from_pretrained(library / "base"), composition / answer["composition"]
        ).eval()
        ids = tokenizer([answer["input"]], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, num_beams=1, max_new_tokens=4, pad_token_id=0, eos_token_id=1)
        assert routed.output == tokenizer.batch_decode(out[:, 1:])[0]
    result = cli("generate", "--inputs", requests, "--composition", composition, "-k", "2")
    assert result.code == 2 and "do not apply" in result.stderr


def test_an_unknown_batching_is_refused_before_loading(cli, home, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"input": "hi"}\n')
    result = cli("generate", "--inputs", requests, "--batching", "dynamic")
    assert result.code == 2 and "batching 'dynamic' is not one of continuous, static" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"input": "hi", "k": "3"}', "requests.jsonl:1: field 'k' must be an integer"),
        ('{"input": "hi", "compose": "blend"}', "compose 'blend' is not one of mixture, fusion, single"),
        ('{"input": "hi", "k": 99}', "k = 99 is outside 1..5"),
        ('{"input": "hi", "max_new_tokens": 500}', "max_new_tokens = 500 is outside 1..128"),
        ('{"text": "hi"}', "missing field 'input'"),
    ],
)
def test_bad_requests_are_one_line_errors(cli, home, tmp_path, line, message):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(line + "\n")
    result = cli("generate", "--inputs", requests, "--dtype", "float32")
    assert result.code == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"input": "hi", "temperature": -1}', "requests.jsonl:1: field 'temperature' = -1 must be 0 (greedy) or more"),
        ('{"input": "hi", "top_p": 0}', "requests.jsonl:1: field 'top_p' = 0 must be in (0, 1]"),
        ('{"input": "hi", "top_k": -2}', "requests.jsonl:1: field 'top_k' = -2 must be 0 (no cut) or more"),
        ('{"input": "hi", "seed": -1}', "requests.jsonl:1: field 'seed' = -1 must be in 0..2^64-1"),
    ],
)
def test_bad_sampling_fields_name_their_line_before_the_model_loads(cli, tmp_path, monkeypatch, line, message):
    from lorahub_cli import api

    def never(**options):
        raise AssertionError("the model was loaded for a bad requests file")

    monkeypatch.setattr(api, "build_engine", never)
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"input": "fine"}\n' + line.replace("hi", "bad") + "\n")
    result = cli("generate", "--inputs", requests)
    assert result.code == 2 and message.replace(":1:", ":2:") in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# --- the HTTP server ---------------------------------------------------------------------------


@contextmanager
def running(app, shutdown_timeout: float = 10, log_level: str = "warning"):
    """The app served as `lorahub serve` serves it, on a free local port, in a thread; stopped (gracefully) on exit."""
    server = make_server(app, host="127.0.0.1", port=0, shutdown_timeout=shutdown_timeout, log_level=log_level)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(15)


def post(url: str, body, content_type: str = "application/json") -> tuple[int, dict]:
    """Status and JSON body; a body that is not JSON fails the test (every answer, errors included, is JSON)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        assert error.headers.get("content-type", "").startswith("application/json"), (error.code, text[:200])
        return error.code, json.loads(text)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def library_engine(library, max_new_tokens: int) -> Engine:
    """An fp32 engine over the test library, batches of 8, decoding ids as text (`decode_ids`)."""
    engine = Engine.from_registry(
        Store(library / "home"),
        dtype="float32",
        device="cpu",
        max_new_tokens=max_new_tokens,
        batch_size=8,
        max_input_tokens=200,
    )
    decode_ids(engine.base.tokenizer)
    return engine


@pytest.fixture(scope="module")
def tiny_engine(library):
    return library_engine(library, NEW_TOKENS)


def test_server_routes_concurrent_requests_and_batches_them(tiny_engine):
    plan = [(task, 1 + i % 3, ("mixture", "fusion", "single")[i % 3]) for i, task in enumerate(TASKS * 4)]
    bodies = [{"input": task_inputs(task, 2)[i % 2], "k": k, "compose": mode} for i, (task, k, mode) in enumerate(plan)]
    # Each request alone first: the engine is used by one thread at a time (the batcher's, below).
    expected = [tiny_engine.run([Request(b["input"], b["k"], b["compose"])])[0] for b in bodies]
    with running(create_app(tiny_engine, max_batch=8, window=0.05, max_queue=64)) as (url, _):
        with ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda b: post(url + "/v1/generate", b), bodies))
        health = get(url + "/health")
    for (status, reply), want, (task, k, mode) in zip(replies, expected, plan):
        assert status == 200, reply
        assert reply["output"] == want.output and reply["compose"] == mode
        assert [a["id"] for a in reply["adapters"]] == [a["id"] for a in want.route["adapters"]]
        assert reply["adapters"][0]["id"] == task and len(reply["adapters"]) == (1 if mode == "single" else k)
    assert health["status"] == "ok" and health["requests"] == len(bodies) and health["queued"] == 0
    assert health["largest_batch"] > 1 and health["batches"] < len(bodies), "concurrent requests shared batches"


def test_openai_completions_route(tiny_engine):
    prompts = task_inputs("capitals", 1) + task_inputs("addition", 1)
    with running(create_app(tiny_engine)) as (url, _):
        status, reply = post(
            url + "/v1/completions", {"model": "x", "prompt": prompts, "max_tokens": 3, "k": 2, "temperature": 0}
        )
        # `curl -d` labels JSON as a form; the body is read as JSON all the same.
        form_status, form_reply = post(
            url + "/v1/generate",
            {"input": prompts[0], "k": 2, "max_new_tokens": 3},
            content_type="application/x-www-form-urlencoded",
        )
    assert status == 200 and reply["object"] == "text_completion"
    expected = tiny_engine.run([Request(p, 2, max_new_tokens=3) for p in prompts])
    assert [c["text"] for c in reply["choices"]] == [e.output for e in expected]
    assert [c["lorahub"]["adapters"][0]["id"] for c in reply["choices"]] == ["capitals", "addition"]
    assert form_status == 200 and form_reply["output"] == expected[0].output


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/generate", b'{"input": "hi"', 400, "the body is not valid JSON"),
        ("/v1/generate", b"[1, 2]", 400, "Input should be a valid dictionary"),
        ("/v1/generate", {"k": 2}, 400, "input: Field required"),
        ("/v1/generate", {"input": "hi", "k": "2"}, 400, "k: Input should be a valid integer"),
        (
            "/v1/generate",
            {"input": "hi", "compose": "blend"},
            400,
            "compose: Input should be 'mixture', 'fusion', 'single', 'scored' or 'arrow'",
        ),
        ("/v1/generate", {"input": "hi", "typical_p": 0.5}, 400, "typical_p: Extra inputs are not permitted"),
        ("/v1/generate", {"input": "  "}, 400, "the input is empty"),
        ("/v1/generate", {"input": "hi", "k": 9}, 400, "k = 9 is outside 1..5"),
        ("/v1/generate", {"input": "hi", "max_new_tokens": 7}, 400, "max_new_tokens = 7 is outside 1..6"),
        ("/v1/generate", {"input": "x" * 300}, 413, "the input is 301 tokens, more than the limit of 200"),
        ("/v1/generate", {"input": "x" * 20_000}, 413, "20000 characters, more than the limit of 16000"),
        ("/v1/generate", {"input": "hi", "temperature": -1}, 400, "temperature = -1 must be 0 (greedy) or more"),
        ("/v1/generate", {"input": "hi", "temperature": 0.5, "top_p": 0}, 400, "top_p = 0 must be in (0, 1]"),
        ("/v1/generate", {"input": "hi", "temperature": 0.5, "top_p": 1.5}, 400, "top_p = 1.5 must be in (0, 1]"),
        ("/v1/generate", {"input": "hi", "top_k": -1}, 400, "top_k = -1 must be 0 (no cut) or more"),
        ("/v1/generate", {"input": "hi", "repetition_penalty": 0}, 400, "repetition_penalty = 0 must be more than 0"),
        ("/v1/generate", {"input": "hi", "temperature": "hot"}, 400, "temperature: Value error, give a number"),
        ("/v1/generate", b'{"input": "hi", "temperature": NaN}', 400, "temperature = nan must be 0 (greedy) or more"),
        (
            "/v1/completions",
            {"prompt": "hi", "temperature": -0.5},
            400,
            "temperature = -0.5 must be 0 (greedy) or more",
        ),
        ("/v1/completions", {"prompt": []}, 400, "give 1 to 64 prompts"),
        ("/v1/generate", b'{"input": "\\ud800"}', 400, "lone surrogate"),
        ("/v1/generate", b'{"input": "\\udc00 and more"}', 400, "lone surrogate"),
        pytest.param("/v1/generate", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply", id="deep-list"),
        pytest.param(
            "/v1/generate",
            b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            400,
            "nested too deeply",
            id="deep-field",
        ),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_message(tiny_engine, path, body, status, message):
    with running(create_app(tiny_engine)) as (url, _):
        got, reply = post(url + path, body)
        health = get(url + "/health")
    assert got == status and message in reply["error"]["message"], reply
    assert health["requests"] == 0, "nothing bad was queued"


class GatedEngine(ServingEngine):
    """Answers with the upper-cased input once `gate` is set, in static batches; counts its calls."""

    batching, max_new_tokens, base_model, names, tokenizer = "static", 16, "lorahub", [], None

    def __init__(self, delay: float = 0.0):
        self.started, self.gate, self.delay, self.calls = threading.Event(), threading.Event(), delay, 0

    def check(self, request):
        return request

    def run(self, requests):
        self.started.set()
        self.gate.wait(10)
        time.sleep(self.delay)
        self.calls += 1
        return [Answer(r.input, r.input.upper(), {"compose": "single", "adapters": []}) for r in requests]

    def info(self):
        return {}


def test_the_queue_is_bounded_and_every_accepted_request_is_answered():
    engine = GatedEngine()
    batcher = Batcher(engine.run, max_batch=2, window=0.0, max_queue=2).start()
    first = batcher.submit(Request("a"))
    engine.started.wait(10)  # the worker holds "a", blocked on the gate; the queue is empty again
    waiting = [batcher.submit(Request(t)) for t in "bc"]
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        batcher.submit(Request("d"))
    engine.gate.set()
    batcher.close()
    with pytest.raises(ShuttingDown):
        batcher.submit(Request("e"))
    assert [f.result(0).output for f in [first, *waiting]] == ["A", "B", "C"]
    assert engine.calls == 2 and batcher.stats.largest_batch == 2


def test_waiting_requests_are_batched_by_length_oldest_first():
    engine = GatedEngine()
    batches = []
    run = engine.run
    engine.run = lambda requests: batches.append([r.input for r in requests]) or run(requests)
    batcher = Batcher(engine.run, max_batch=3, window=0.0, max_queue=16, size=lambda r: len(r.input)).start()
    futures = [batcher.submit(Request("held"))]
    engine.started.wait(10)
    texts = ["x" * n for n in (50, 1, 49, 2, 48, 3, 47)]
    futures += [batcher.submit(Request(t)) for t in texts]
    engine.gate.set()
    batcher.close()
    assert [f.result(0).output for f in futures] == [t.upper() for t in ["held", *texts]]
    assert [sorted(map(len, b)) for b in batches] == [[4], [48, 49, 50], [1, 2, 3], [47]]


def hold_one_and_queue_one(pool, url: str, engine):
    """Request "a" running inside the gated engine and request "b" waiting in the queue: their futures."""
    held = pool.submit(post, url + "/v1/generate", {"input": "a"})
    engine.started.wait(10)
    queued = pool.submit(post, url + "/v1/generate", {"input": "b"})
    while get(url + "/health")["queued"] < 1:
        time.sleep(0.01)
    return held, queued


def test_server_sheds_load_with_503_and_drains_on_shutdown():
    engine = GatedEngine(delay=0.2)
    with running(create_app(engine, max_batch=1, window=0.0, max_queue=1)) as (url, server):
        with ThreadPoolExecutor(3) as pool:
            held, queued = hold_one_and_queue_one(pool, url, engine)
            status, reply = post(url + "/v1/generate", {"input": "c"})
            assert status == 503 and "already waiting" in reply["error"]["message"]
            server.should_exit = True  # graceful: open requests finish before the server stops
            engine.gate.set()
            assert held.result(10) == (200, {"input": "a", "output": "A", "compose": "single", "adapters": []})
            assert queued.result(10)[1]["output"] == "B"


def test_unknown_routes_and_methods_get_json_errors(tiny_engine):
    with running(create_app(tiny_engine)) as (url, _):
        missing = post(url + "/v2/nothing", {"input": "hi"})
        request = urllib.request.Request(url + "/v1/generate", method="GET")
        with pytest.raises(urllib.error.HTTPError) as wrong_method:
            urllib.request.urlopen(request, timeout=10)
    assert missing[0] == 404 and "/v2/nothing" in missing[1]["error"]["message"]
    assert wrong_method.value.code == 405 and "error" in json.loads(wrong_method.value.read())


class FailingEngine(GatedEngine):
    def check(self, request):
        raise RuntimeError("a bug in check")


def test_an_unexpected_failure_is_a_json_500():
    with running(create_app(FailingEngine())) as (url, _):
        status, reply = post(url + "/v1/generate", {"input": "a"})
    assert status == 500 and reply["error"]["type"] == "server_error" and "a bug in check" in reply["error"]["message"]


def test_requests_still_open_when_the_shutdown_timeout_expires_get_a_json_503():
    """The engine never finishes: the request it holds and the one queued behind it hear 503, not a dropped
    connection or uvicorn's plain-text 500."""
    engine = GatedEngine()
    try:
        with running(create_app(engine, max_batch=1, window=0.0, max_queue=4), shutdown_timeout=0.5) as (url, server):
            with ThreadPoolExecutor(2) as pool:
                held, queued = hold_one_and_queue_one(pool, url, engine)
                began = time.monotonic()
                server.should_exit = True
                for future in (held, queued):
                    status, reply = future.result(10)
                    assert status == 503 and "shutting down" in reply["error"]["message"], reply
                assert time.monotonic() - began < 5
    finally:
        engine.gate.set()


def test_serve_on_a_port_in_use_is_a_one_line_error(cli):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--port", port)
    assert result.code == 2 and f"127.0.0.1:{port} is in use" in result.stderr, result.stderr
    assert (
        "Serving" not in result.stderr
        and "Traceback" not in result.stderr
        and len(result.stderr.strip().splitlines()) <= 2
    )


# --- continuous batching in the server -------------------------------------------------------------


class SteppedEngine(ServingEngine):
    """A continuous-batching engine for the batcher tests: a request "abc" decodes "A", "B", "C", one letter a
    step; every step first takes a permit from `permits` (a semaphore the test releases). At most `max_batch` rows
    run (as a Decoder's batch): the others wait in the session and join, in order, at a step with room. Logs each
    step's rows."""

    batching, max_new_tokens, base_model, names, tokenizer = "continuous", 16, "lorahub", [], None

    def __init__(self, max_batch: int = 2):
        self.permits, self.started, self.log, self.max_batch = threading.Semaphore(0), threading.Event(), [], max_batch

    def check(self, request):
        return request

    def info(self):
        return {}

    def session(self):
        engine = self

        class Session(Stepper):
            rows: list = []
            waiting: list = []
            prefills = 0

            running = property(lambda self: len(self.rows))
            load = property(lambda self: len(self.rows) + len(self.waiting))
            busy = property(lambda self: bool(self.rows or self.waiting))

            def add(self, requests, keys, on_token=None, cancelled=None):
                self.waiting = self.waiting + [[r, key, cb, 0] for r, key, cb in zip(requests, keys, on_token)]

            def step(self):
                engine.started.set()
                assert engine.permits.acquire(timeout=10)
                room = engine.max_batch - len(self.rows)
                joining, self.waiting = self.waiting[:room], self.waiting[room:]
                self.rows, self.prefills = self.rows + joining, self.prefills + bool(joining)
                engine.log.append([r.input for r, *_ in self.rows])
                done = []
                for row in self.rows:
                    request, key, callback, n = row
                    row[3] = n + 1
                    final = Answer(request.input, request.input.upper(), {}) if n + 1 == len(request.input) else None
                    if callback is not None:
                        callback(request.input[n].upper(), -0.5, final)
                    if final is not None:
                        done.append((key, final))
                self.rows = [row for row in self.rows if row[3] < len(row[0].input)]
                return done

            def abandon(self):
                keys, self.rows, self.waiting = [row[1] for row in self.rows + self.waiting], [], []
                return keys

        return Session()


def test_continuous_batcher_joins_waiting_requests_at_a_step_and_answers_each_when_it_ends():
    engine = SteppedEngine()
    batcher = Batcher(session=engine.session, max_batch=2, window=0.0, max_queue=2).start()
    streamed = []
    first = batcher.submit(Request("abc"), on_token=lambda *event: streamed.append(event))
    engine.started.wait(10)  # the worker holds "abc" in its first step
    waiting = [batcher.submit(Request(t)) for t in ("de", "f")]
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        batcher.submit(Request("g"))
    engine.permits.release(10)
    assert [f.result(10).output for f in [first, *waiting]] == ["ABC", "DE", "F"]
    # Both move into the session; "de" joins the running "abc" at the next step (room for one), "f" when both left.
    assert engine.log == [["abc"], ["abc", "de"], ["abc", "de"], ["f"]]
    assert [token for token, _, _ in streamed] == ["A", "B", "C"] and streamed[-1][2].output == "ABC"
    assert [final for _, _, final in streamed[:2]] == [None, None]
    batcher.close()
    assert batcher.stats.steps == 4 and batcher.stats.requests == 3 and batcher.stats.largest_batch == 2
    assert batcher.stats.batches == 3, "three groups joined: abc, de, f"


def test_continuous_server_sheds_load_and_answers_open_requests_503_at_the_shutdown_deadline():
    engine = SteppedEngine(max_batch=1)
    try:
        with running(create_app(engine, max_batch=1, window=0.0, max_queue=1), shutdown_timeout=0.5) as (url, server):
            with ThreadPoolExecutor(2) as pool:
                held, queued = hold_one_and_queue_one(pool, url, engine)
                status, reply = post(url + "/v1/generate", {"input": "c"})
                assert status == 503 and "already waiting" in reply["error"]["message"]
                assert get(url + "/health")["batching"] == "continuous"
                server.should_exit = True
                for future in (held, queued):
                    status, reply = future.result(10)
                    assert status == 503 and "shutting down" in reply["error"]["message"], reply
    finally:
        engine.permits.release(100)


def test_continuous_server_drains_open_requests_on_shutdown():
    engine = SteppedEngine(max_batch=1)
    with running(create_app(engine, max_batch=1, window=0.0, max_queue=1)) as (url, server):
        with ThreadPoolExecutor(2) as pool:
            held, queued = hold_one_and_queue_one(pool, url, engine)
            server.should_exit = True  # graceful: open requests finish before the server stops
            engine.permits.release(100)
            assert held.result(10) == (200, {"input": "a", "output": "A"})
            assert queued.result(10)[1]["output"] == "B"


def test_static_and_continuous_batching_give_the_same_answers(home):
    texts = [t for task in TASKS for t in task_inputs(task, 2)]
    requests = [
        Request(t, k=1 + i % 3, compose=("mixture", "fusion", "single")[i % 3], max_new_tokens=1 + i % NEW_TOKENS)
        for i, t in enumerate(texts)
    ]
    continuous = engine_for(home, max_new_tokens=NEW_TOKENS, batch_size=3)
    static = engine_for(home, max_new_tokens=NEW_TOKENS, batch_size=3, batching="static")
    assert (continuous.batching, static.batching) == ("continuous", "static")
    for a, b in zip(continuous.run(requests), static.run(requests)):
        assert (a.output, a.tokens, a.finish_reason, a.route) == (b.output, b.tokens, b.finish_reason, b.route)


def test_each_request_is_tokenised_once_in_process_and_over_http(tiny_engine, monkeypatch):
    """The check tokenises a request (to count its tokens) and its ids go on to the decoder: no second pass
    through the tokenizer, with either batching and over HTTP."""
    texts = [task_inputs(task, 1)[0] for task in TASKS]
    tokenizer = type(tiny_engine.base.tokenizer)
    real, seen = tokenizer.__call__, []

    def counting(self, text, *args, **kwargs):
        seen.extend([text] if isinstance(text, str) else text)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "__call__", counting)
    for batching in ("continuous", "static"):
        monkeypatch.setattr(tiny_engine, "batching", batching)
        seen.clear()
        answers = tiny_engine.run([Request(t) for t in texts])
        assert sorted(seen) == sorted(texts), batching
        assert all(a.prompt_tokens == len(real(tiny_engine.base.tokenizer, a.input)["input_ids"]) for a in answers)
        with running(create_app(tiny_engine, window=0.0)) as (url, _):
            seen.clear()
            for text in texts[:2]:
                assert post(url + "/v1/generate", {"input": text})[0] == 200
        assert seen == texts[:2], batching


# --- bounds on every field, the body as it arrives, the log (issue 22) ------------------------------------


@pytest.mark.parametrize(
    "path, body, message",
    [
        (
            "/v1/completions",
            {"prompt": "hi", "stop": "x" * 1_000_000},
            "stop is 1000000 characters, more than the limit of 256",
        ),
        (
            "/v1/completions",
            {"prompt": "hi", "stop": ["\n", "y" * 257]},
            "stop[1] is 257 characters, more than the limit of 256",
        ),
        (
            "/v1/completions",
            {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]},
            "stop: give at most 4 stop sequences, not 5",
        ),
        ("/generate", {"inputs": "hi", "parameters": {"stop": ["z" * 300]}}, "parameters.stop[0] is 300 characters"),
        (
            "/generate",
            {"inputs": "hi", "parameters": {"stop": ["a"] * 5}},
            "parameters.stop: give at most 4 stop sequences",
        ),
        ("/v1/completions", {"prompt": "hi", "model": "m" * 5000}, "model: String should have at most 4096 characters"),
        ("/v1/completions", {"prompt": "hi", "user": "u" * 300}, "user: String should have at most 256 characters"),
        (
            "/generate",
            {"inputs": "hi", "parameters": {"adapter_id": "a" * 300}},
            "parameters.adapter_id: String should have at most 256",
        ),
        (
            "/generate",
            {"inputs": "hi", "parameters": {"merged_adapters": {"ids": ["i" * 300], "weights": [1.0]}}},
            "parameters.merged_adapters.ids.0: String should have at most 256",
        ),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, "max_tokens = -5 is outside 1..6"),
        (
            "/generate",
            {"inputs": "hi", "parameters": {"max_new_tokens": 0}},
            "parameters.max_new_tokens = 0 is outside 1..6",
        ),
        ("/generate", {"inputs": "hi", "parameters": {"k": 99}}, "parameters.k = 99 is outside 1..5"),
        pytest.param(
            "/v1/completions",
            b'{"prompt": "hi", "seed": ' + b"7" * 5000 + b"}",
            "the body is not valid JSON",
            id="huge-int",
        ),
        ("/v1/completions", {"prompt": "hi", "suffix": "s" * 100_000}, 'suffix = "ssssssssss'),
    ],
)
def test_every_field_is_bounded_and_named_as_the_client_sent_it(tiny_engine, path, body, message):
    with running(create_app(tiny_engine, window=0.0)) as (url, _):
        got, reply = post(url + path, body)
        health = get(url + "/health")
    assert got == 400, reply
    text = reply["error"] if path == "/generate" else reply["error"]["message"]
    assert message in text, reply
    assert len(text) < 400, "an error never echoes a huge value"
    if path == "/v1/completions":
        assert "max_new_tokens" not in text, "the field is named as the client sent it"
    assert health["requests"] == 0, "nothing bad was queued"


class Received:
    """Outermost ASGI middleware: the request-body bytes the app read, and the status it answered with."""

    def __init__(self, app, log):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            with self.log["changed"]:
                self.log["bytes"] += len(message.get("body", b""))
                self.log["changed"].notify_all()
            return message

        async def answered(message):
            if message["type"] == "http.response.start":
                with self.log["changed"]:
                    self.log["status"] = message["status"]
                    self.log["changed"].notify_all()
            elif message["type"] == "http.response.body":
                self.log["body"] += message.get("body", b"")
            await send(message)

        await self.app(scope, counted, answered)


def test_a_chunked_body_is_counted_as_it_arrives_and_refused_at_the_limit():
    """No Content-Length: the server reads the body as it comes and answers 413 at the limit, instead of
    holding the whole body first. The client sends a chunk only once the server has read the one before
    (or answered), so what the server read is measured, not timed."""
    import socket
    from urllib.parse import urlparse

    log = {"bytes": 0, "status": None, "body": b"", "changed": threading.Condition()}
    app = create_app(GatedEngine(), max_input_chars=100, max_prompts=1)  # a body limit of 4 * 100 + 65536
    limit = 4 * 100 + 65_536
    app.add_middleware(Received, log=log)
    chunk, total = b"x" * 65_536, 8 * 1024 * 1024
    with running(app) as (url, _):
        where = urlparse(url)
        with socket.create_connection((where.hostname, where.port)) as client:
            client.sendall(
                b"POST /v1/generate HTTP/1.1\r\nHost: lorahub\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            sent = 0
            for data in [b'{"input": "'] + [chunk] * (total // len(chunk)) + [b'"}']:
                try:
                    client.sendall(b"%x\r\n%s\r\n" % (len(data), data))
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += len(data)
                with log["changed"]:
                    log["changed"].wait_for(lambda sent=sent: log["bytes"] >= sent or log["status"] is not None)
                if log["status"] is not None:
                    break
            else:
                client.sendall(b"0\r\n\r\n")
                with log["changed"]:
                    log["changed"].wait_for(lambda: log["status"] is not None)
    assert log["bytes"] <= limit + len(chunk), f"the server read {log['bytes']} bytes of a body over {limit}"
    assert log["status"] == 413, log
    assert f"more than the limit of {limit}" in json.loads(log["body"])["error"]["message"]


def test_the_access_log_shows_no_credential(tiny_engine, capfd):
    """A key in the query string (`?api_key=`) or a Bearer token: never in the log, at info or trace level."""
    secret, key = "query-secret-0123", "header-secret-4567"
    for level in ("info", "trace"):
        with running(create_app(tiny_engine, window=0.0, api_key=key), log_level=level) as (url, _):
            request = urllib.request.Request(
                url + f"/v1/models?api_key={secret}&limit=3&access_token={secret}",
                headers={"Authorization": f"Bearer {key}"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200
        logged = capfd.readouterr().err
        assert "/v1/models?api_key=<redacted>&limit=3&access_token=<redacted>" in logged, logged[-2000:]
        assert secret not in logged and key not in logged, level


# --- sampling per request (issue 20) -------------------------------------------------------------------


def test_sampled_requests_are_repeatable_alone_and_among_others(tiny_engine):
    """Seeded requests draw the same answer alone and in a batch mixed with greedy and other sampled requests, with
    either batching; an unseeded one gets a seed in its answer that draws it again."""
    from lorahub_cli.decoding import Sampling

    texts = [t for task in TASKS for t in task_inputs(task, 2)]
    samplings = [
        Sampling(temperature=0.9, seed=i) if i % 3 else Sampling(repetition_penalty=1.3 if i % 2 else 1.0)
        for i in range(len(texts))
    ]
    requests = [Request(t, sampling=s) for t, s in zip(texts, samplings)]
    together = tiny_engine.run(requests)
    for request, answer in zip(requests, together):
        assert tiny_engine.run([request])[0].tokens == answer.tokens, request
        assert answer.seed == (None if request.sampling.greedy else request.sampling.seed)
    greedy = tiny_engine.run([Request(t) for t in texts])
    drawn = [i for i, s in enumerate(samplings) if not s.greedy]
    assert sum(together[i].tokens != greedy[i].tokens for i in drawn) >= len(drawn) - 1, "sampling samples"
    try:
        tiny_engine.batching = "static"
        assert [a.tokens for a in tiny_engine.run(requests)] == [a.tokens for a in together], "static: the same"
    finally:
        tiny_engine.batching = "continuous"
    (unseeded,) = tiny_engine.run([Request(texts[0], sampling=Sampling(temperature=1.0))])
    assert unseeded.seed is not None
    again = tiny_engine.run([Request(texts[0], sampling=Sampling(temperature=1.0, seed=unseeded.seed))])[0]
    assert again.tokens == unseeded.tokens


def test_generate_cli_samples_with_a_seed_per_line(cli, home, tmp_path):
    requests = tmp_path / "requests.jsonl"
    texts = task_inputs("capitals", 2) + task_inputs("addition", 1)
    requests.write_text(
        "".join(json.dumps({"input": t}) + "\n" for t in texts[:2])
        + json.dumps({"input": texts[2], "seed": 40, "temperature": 1.5})
        + "\n"
    )
    options = ("--max-new-tokens", "5", "--dtype", "float32", "--temperature", "0.8", "--seed", "7", "--json")

    def answers():
        result = cli("generate", "--inputs", requests, *options)
        assert result.code == 0, result.stderr
        return json.loads(result.stdout)["answers"]

    first = answers()
    assert [a["seed"] for a in first] == [7, 8, 40], "line i gets seed + i; a line's own seed wins"
    assert answers() == first, "the same seeds draw the same answers"
    result = cli("generate", "--inputs", requests, "--temperature", "-1")
    assert result.code == 2 and "--temperature -1.0 must be 0 (greedy) or more" in result.stderr
    requests.write_text(json.dumps({"input": "hi", "top_p": "high"}) + "\n")
    result = cli("generate", "--inputs", requests)
    assert result.code == 2 and "field 'top_p' must be a number" in result.stderr
