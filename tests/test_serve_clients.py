"""The APIs clients already speak, through the real clients from PyPI, against a server started on 127.0.0.1:
TGI (`huggingface_hub.InferenceClient.text_generation`), LoRAX (`lorax.Client` with adapter_id and
merged_adapters) and OpenAI completions (`openai.OpenAI`), with and without an API key.

The reference for a named adapter or a LoRAX linear merge is PEFT loading the adapter that `compose`
writes (the elementwise formula with the request's weights), generating on its own.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import lorax
import openai
import pytest
import torch
from conftest import EXAMPLES
from huggingface_hub import InferenceClient
from peft import PeftModel
from test_serve import (  # noqa: F401  (library: a fixture)
    INSTRUCTION,
    decode_ids,
    library,
    library_engine,
    running,
    task_inputs,
)
from tiny_models import one_thread  # noqa: F401  (fixture)
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from lorahub_cli.compose.adapters import load_adapter, save_adapter
from lorahub_cli.compose.formulas import combine
from lorahub_cli.decoding import Sampling
from lorahub_cli.registry import Store
from lorahub_cli.serve.engine import Request
from lorahub_cli.serve.server import create_app

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "s3cret-key-for-tests"
LIMIT = 20  # the server's --max-new-tokens: above OpenAI's default of 16, so that default is what applies


@pytest.fixture(scope="module")
def engine(library):
    return library_engine(library, LIMIT)


@pytest.fixture(scope="module")
def server(engine):
    with running(create_app(engine, window=0.0)) as (url, _):
        yield url


def peft_alone(library, ids: list[str], weights: list[float], text: str, new_tokens: int) -> str:
    """The named adapters merged by `compose` (elementwise: A = sum w A_i, B = sum w B_i), loaded by PEFT."""
    store = Store(library / "home")
    adapters = [load_adapter(store.get(i).path, name=i) for i in ids]
    folder = save_adapter(
        combine(adapters, weights, "elementwise", name="merged"), library / "merged" / "-".join(ids) / str(weights)
    )
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(library / "base"), folder).eval()
    tokenizer = decode_ids(AutoTokenizer.from_pretrained(library / "base"))
    with torch.no_grad():
        out = model.generate(
            **tokenizer([text], return_tensors="pt"),
            do_sample=False,
            num_beams=1,
            max_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.batch_decode(out[:, 1:])[0]


def test_lorax_client_adapter_id_and_linear_merge_equal_peft(library, server):
    client = lorax.Client(server)
    text = task_inputs("capitals", 1)[0]
    one = client.generate(text, adapter_id="addition", max_new_tokens=5)
    assert one.generated_text == peft_alone(library, ["addition"], [1.0], text, 5)
    assert one.details.generated_tokens == len(one.details.tokens) <= 5 and one.details.prompt_tokens > 0
    assert all(t.logprob <= 0 for t in one.details.tokens)
    merged = lorax.types.MergedAdapters(
        ids=["capitals", "sentiment"], weights=[0.7, 0.3], merge_strategy="linear", density=1.0
    )
    both = client.generate(text, merged_adapters=merged, max_new_tokens=5)
    assert both.generated_text == peft_alone(library, ["capitals", "sentiment"], [0.7, 0.3], text, 5)
    assert both.generated_text != one.generated_text, "the adapters change the answer, so equality means something"
    streamed = list(client.generate_stream(text, merged_adapters=merged, max_new_tokens=5))
    assert streamed[-1].generated_text == both.generated_text and len(streamed) == both.details.generated_tokens
    assert [s.token.id for s in streamed] == [t.id for t in both.details.tokens]
    ties = lorax.types.MergedAdapters(
        ids=["capitals", "sentiment"], weights=[0.5, 0.5], merge_strategy="ties", density=0.5
    )
    with pytest.raises(lorax.errors.ValidationError, match="merge_strategy 'ties' is not served per request"):
        client.generate(text, merged_adapters=ties, max_new_tokens=5)
    with pytest.raises(lorax.errors.ValidationError, match="adapter 'nope' is not served here"):
        client.generate(text, adapter_id="nope", max_new_tokens=5)


def test_huggingface_inference_client_text_generation(engine, server):
    client = InferenceClient(base_url=server)
    text = task_inputs("addition", 1)[0]
    expected = engine.run([Request(text, max_new_tokens=4)])[0]  # retrieval with the server's defaults
    assert client.text_generation(text, max_new_tokens=4) == expected.output
    detailed = client.text_generation(text, max_new_tokens=4, details=True)
    assert detailed.generated_text == expected.output and detailed.details.finish_reason == expected.finish_reason
    assert [t.id for t in detailed.details.tokens] == expected.tokens
    assert "".join(client.text_generation(text, max_new_tokens=4, stream=True)) == "".join(
        engine.base.tokenizer.decode([t]) for t in expected.tokens
    )
    single = engine.run([Request(text, adapters=(("weekdays", 1.0),), max_new_tokens=4)])[0]
    assert client.text_generation(text, max_new_tokens=4, adapter_id="weekdays") == single.output != expected.output
    # Sampling with a seed: the answer the engine draws for that seed, every time, the seed in the details.
    drawn = engine.run([Request(text, max_new_tokens=6, sampling=Sampling(temperature=0.9, top_k=20, seed=5))])[0]
    for _ in range(2):
        sampled = client.text_generation(
            text, max_new_tokens=6, do_sample=True, temperature=0.9, top_k=20, seed=5, details=True
        )
        assert [t.id for t in sampled.details.tokens] == drawn.tokens and sampled.details.seed == 5
    assert drawn.tokens != engine.run([Request(text, max_new_tokens=6)])[0].tokens, "it sampled"
    other = client.text_generation(text, max_new_tokens=6, temperature=0.9, top_k=20, seed=6, details=True)
    assert [t.id for t in other.details.tokens] != drawn.tokens, "another seed, another draw"
    streamed = list(client.text_generation(text, max_new_tokens=6, temperature=0.9, top_k=20, seed=5, stream=True))
    assert "".join(streamed) == "".join(engine.base.tokenizer.decode([t]) for t in drawn.tokens)


def test_openai_completions_usage_stop_models_and_refusals(engine, server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    prompts = task_inputs("capitals", 1) + task_inputs("antonyms", 1)
    models = [m.id for m in client.models.list().data]
    assert models[0] == engine.info()["base_model"] and set(models[1:]) == set(engine.bank.names)
    # max_tokens: OpenAI's default, 16; temperature 0 (OpenAI's default is 1: sampling)
    reply = client.completions.create(model=models[0], prompt=prompts, temperature=0)
    expected = engine.run([Request(p, max_new_tokens=16) for p in prompts])
    assert [c.text for c in reply.choices] == [e.output for e in expected]
    assert [c.finish_reason for c in reply.choices] == [
        ("stop" if e.finish_reason != "length" else "length") for e in expected
    ]
    assert all(len(e.tokens) == 16 or e.finish_reason == "eos_token" for e in expected)
    assert reply.usage.completion_tokens == sum(len(e.tokens) for e in expected)
    assert reply.usage.prompt_tokens == sum(e.prompt_tokens for e in expected) > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # stop: a string from the middle of the unstopped answer ends it there.
    full = expected[0].output  # token ids as words (decode_ids): one word per token
    words = full.split()
    stop = " " + words[len(words) // 2]
    ends = next(i for i in range(1, len(words) + 1) if stop in " ".join(words[:i]))  # tokens until the stop shows
    assert 1 < ends < len(words), "the answer is long enough to stop in the middle"
    stopped = client.completions.create(
        model=models[0], prompt=prompts[0], max_tokens=16, stop=[stop, "never-there"], temperature=0
    )
    assert stopped.choices[0].text == full[: full.index(stop)] and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == ends
    # model = an adapter id: that adapter alone.
    alone = client.completions.create(model="capitals", prompt=prompts[1], max_tokens=4, temperature=0)
    assert (
        alone.choices[0].text
        == engine.run([Request(prompts[1], adapters=(("capitals", 1.0),), max_new_tokens=4)])[0].output
    )
    for field, value in [("logprobs", 2), ("echo", True), ("best_of", 2), ("suffix", "!"), ("presence_penalty", 1)]:
        with pytest.raises(openai.BadRequestError, match=f"{field} = .* is not supported"):
            client.completions.create(model=models[0], prompt="hi", **{field: value})


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/generate", {"parameters": {"max_new_tokens": 2}}, "inputs: Field required"),
        ("/generate", {"inputs": "hi", "parameters": {"foo": 1}}, "parameters.foo: Extra inputs are not permitted"),
        (
            "/generate",
            {"inputs": "hi", "parameters": {"temperature": -0.5}},
            "parameters.temperature = -0.5 must be 0 (greedy) or more",
        ),
        ("/generate", {"inputs": "hi", "parameters": {"top_p": 1.5}}, "parameters.top_p = 1.5 must be in (0, 1]"),
        ("/", {"inputs": "hi", "parameters": {"do_sample": True, "top_k": -2}}, "parameters.top_k = -2 must be 0"),
        ("/generate", {"inputs": "hi", "parameters": {"typical_p": 0.5}}, "typical sampling is not supported"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p = 0 must be in (0, 1]"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature = -1 must be 0 (greedy) or more"),
        ("/v1/completions", {"prompt": "hi", "top_k": -1}, "top_k = -1 must be 0 (no cut) or more"),
        ("/v1/completions", {"prompt": "hi", "seed": -3}, "seed = -3 must be in 0..2^64-1"),
        ("/v1/completions", {"prompt": ["a", "b"], "n": 40}, "give 1 to 64 prompts x n, not 2 x 40"),
        ("/v1/completions", {"prompt": "hi", "n": 0}, "n = 0 must be 1 or more"),
        ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "only for stream: true"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "temperature": 0},
            "chat needs a decoder-only base model",
        ),
        ("/v1/chat/completions", {"messages": []}, "messages is empty"),
        ("/generate", {"inputs": "hi", "parameters": {"adapter_id": "capitals", "k": 2}}, "Drop k and compose"),
        ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 500}}, "max_new_tokens = 500 is outside 1..20"),
        (
            "/",
            {"inputs": "hi", "parameters": {"merged_adapters": {"ids": ["capitals"], "weights": [0.5, 0.5]}}},
            "1 ids and 2 weights",
        ),
        (
            "/",
            {"inputs": "hi", "parameters": {"merged_adapters": {"ids": ["capitals", "x"], "weights": [0.5, 0.5]}}},
            "adapter 'x' is not served here",
        ),
        (
            "/generate_stream",
            {
                "inputs": "hi",
                "parameters": {
                    "merged_adapters": {
                        "ids": ["capitals", "addition"],
                        "weights": [0.5, 0.5],
                        "merge_strategy": "dare_ties",
                        "density": 0.3,
                    }
                },
            },
            "merge_strategy 'dare_ties' is not served",
        ),
        ("/generate", b'{"inputs": "\\ud800"}', "lone surrogate"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop sequences"),
        ("/v1/completions", {"prompt": "hi", "model": "capitals", "k": 2}, "Drop them"),
        ("/v1/completions", {"prompt": "hi", "max_tokenz": 3}, "max_tokenz: Extra inputs are not permitted"),
        ("/v1/completions", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
    ],
)
def test_malformed_tgi_lorax_and_openai_requests_get_json_4xx(server, path, body, message):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server + path, data=data, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == 400 and error.value.headers["content-type"] == "application/json"
    reply = json.loads(error.value.read())
    text = reply["error"] if path in ("/", "/generate", "/generate_stream") else reply["error"]["message"]
    assert message in text, reply
    if path in ("/", "/generate", "/generate_stream"):
        assert reply["error_type"] == "validation"  # what TGI's and LoRAX's clients read


def test_api_key_is_required_on_every_route_but_health(engine, caplog):
    caplog.set_level(logging.DEBUG)
    text = task_inputs("weekdays", 1)[0]
    with running(create_app(engine, window=0.0, api_key=KEY)) as (url, _):
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            health = json.loads(response.read())
        assert health["status"] == "ok" and health["auth"] is True and KEY not in json.dumps(health)
        for path in ("/v1/models", "/v1/generate", "/generate", "/"):
            for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                request = urllib.request.Request(
                    url + path, data=None if path == "/v1/models" else b"{}", headers=header
                )
                with pytest.raises(urllib.error.HTTPError) as error:
                    urllib.request.urlopen(request, timeout=10)
                assert error.value.code == 401 and error.value.headers["WWW-Authenticate"] == "Bearer"
                body = json.loads(error.value.read())
                assert "Authorization: Bearer <key>" in json.dumps(body) and KEY not in json.dumps(body)

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).completions.create(
                model="m", prompt=text
            )
        good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert KEY not in json.dumps([m.model_dump() for m in good.models.list().data])
        expected = engine.run([Request(text, max_new_tokens=3)])[0].output
        assert good.completions.create(model="m", prompt=text, max_tokens=3, temperature=0).choices[0].text == expected
        with pytest.raises(Exception, match="no API key"):
            lorax.Client(url).generate(text, max_new_tokens=3)
        authorised = lorax.Client(url, headers={"Authorization": f"Bearer {KEY}"})
        assert authorised.generate(text, max_new_tokens=3).generated_text == expected
        with pytest.raises(Exception, match="no API key"):
            InferenceClient(base_url=url).text_generation(text, max_new_tokens=3)
        assert InferenceClient(base_url=url, api_key=KEY).text_generation(text, max_new_tokens=3) == expected
    assert KEY not in caplog.text, "the key is never logged"


def test_serve_warns_on_a_public_host_without_a_key(cli, monkeypatch):
    """The warning comes before anything is loaded; an empty key is refused."""
    import lorahub_cli.cli.serve as serve_cli

    monkeypatch.setattr(serve_cli, "build_engine", lambda **_: (_ for _ in ()).throw(SystemExit(7)))
    result = cli("serve", "--host", "0.0.0.0", "--port", "0")
    assert result.code == 7 and "no API key is set" in result.stderr and "LORAHUB_API_KEY" in result.stderr
    result = cli("serve", "--host", "0.0.0.0", "--port", "0", "--api-key", KEY)
    assert result.code == 7 and "no API key" not in result.stderr and KEY not in result.stderr
    monkeypatch.setenv("LORAHUB_API_KEY", KEY)
    result = cli("serve", "--host", "0.0.0.0", "--port", "0")
    assert result.code == 7 and "no API key" not in result.stderr
    result = cli("serve", "--api-key", " ")
    assert result.code == 2 and "the API key is empty" in result.stderr


@contextmanager
def slowed(engine, seconds: float):
    """Every forward pass of the engine's model waits `seconds` first; yields the list of their start times."""
    forwards = []

    def slow(module, args, kwargs):
        forwards.append(time.monotonic())
        time.sleep(seconds)

    hook = engine.base.model.register_forward_pre_hook(slow, with_kwargs=True)
    try:
        yield forwards
    finally:
        hook.remove()


def test_stream_events_are_sent_as_each_token_is_decoded(engine):
    """With every decoder forward pass slowed to 0.2 s, each client gets the first token's event before the last
    forward pass starts: events are sent token by token, not when the answer is done."""
    text = task_inputs("sentiment", 1)[0]
    expected = engine.run([Request(text, max_new_tokens=6)])[0]
    assert len(expected.tokens) >= 4, "long enough for the timing to tell"
    with slowed(engine, 0.2) as forwards:
        with running(create_app(engine, window=0.0)) as (url, _):
            hf = InferenceClient(base_url=url)  # held: the client owns the open stream
            clients = {
                "huggingface_hub": lambda: hf.text_generation(text, max_new_tokens=6, stream=True, details=True),
                "lorax": lambda: lorax.Client(url).generate_stream(text, max_new_tokens=6),
            }
            for name, stream in clients.items():
                forwards.clear()
                arrivals = [(time.monotonic(), event) for event in stream()]
                assert [event.token.id for _, event in arrivals] == expected.tokens, name
                assert arrivals[-1][1].generated_text == expected.output and arrivals[0][1].generated_text is None
                assert arrivals[-1][1].details.finish_reason == expected.finish_reason, name
                assert len(forwards) == len(expected.tokens), name
                assert arrivals[0][0] < forwards[-1], (
                    f"{name}: the first event came only after the last forward pass began"
                )


def test_a_stream_whose_client_leaves_stops_costing_work(engine):
    """The client reads one event and closes the connection: the request's row leaves the batch at the next
    step instead of decoding to its limit."""
    import http.client
    from urllib.parse import urlparse

    text = task_inputs("capitals", 1)[0]
    assert len(engine.run([Request(text, max_new_tokens=LIMIT)])[0].tokens) == LIMIT, "it would decode to the limit"
    with slowed(engine, 0.1) as forwards:
        with running(create_app(engine, window=0.0)) as (url, _):
            where = urlparse(url)
            connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
            connection.request(
                "POST",
                "/generate_stream",
                json.dumps({"inputs": text, "parameters": {"max_new_tokens": LIMIT}}),
                {"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            assert response.status == 200 and response.readline().startswith(b"data:")
            connection.close()
            deadline = time.monotonic() + 10
            while (
                len(forwards) < LIMIT
                and time.monotonic() < deadline
                and (not forwards or time.monotonic() - forwards[-1] < 1.0)
            ):
                time.sleep(0.05)
    assert len(forwards) < LIMIT // 2, f"{len(forwards)} forward passes for a request whose client left after the first"


# --- OpenAI streaming, sampling and chat (issue 20) ---------------------------------------------------------


def test_openai_streams_completions_and_draws_repeatable_seeded_samples(engine, server):
    """stream=True: the joined chunks equal the answer not streamed (temperature 0, with a stop string too), usage in
    the last chunk when asked for; seeded samples come back the same, and choice j of n is the request with seed
    + j."""
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    prompts = task_inputs("sentiment", 1) + task_inputs("weekdays", 1)
    plain = client.completions.create(model="m", prompt=prompts, max_tokens=12, temperature=0)
    words = plain.choices[0].text.split()
    assert len(words) >= 4, "long enough to stop in the middle"
    for stop in (None, " " + words[len(words) // 2]):
        expected = client.completions.create(model="m", prompt=prompts, max_tokens=12, temperature=0, stop=stop)
        chunks = list(
            client.completions.create(
                model="m",
                prompt=prompts,
                max_tokens=12,
                temperature=0,
                stop=stop,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == expected.usage.model_dump()
        assert all(c.usage is None for c in chunks[:-1])
        for i, choice in enumerate(expected.choices):
            pieces = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == i]
            assert "".join(p.text for p in pieces) == choice.text, (stop, i)
            assert [p.finish_reason for p in pieces][-1] == choice.finish_reason
            assert all(p.finish_reason is None for p in pieces[:-1])
            assert len(pieces) >= min(3, len(choice.text.split())), "streamed token by token"
    assert expected.choices[0].finish_reason == "stop" and expected.choices[0].text != plain.choices[0].text
    # Sampling: the seed draws the same every time; n choices are seed, seed + 1, ...
    sampled = dict(model="m", prompt=prompts[0], max_tokens=8, temperature=0.9, top_p=0.95)
    first = client.completions.create(**sampled, seed=21, n=3)
    again = client.completions.create(**sampled, seed=21, n=3)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.model_extra["lorahub"]["seed"] for c in first.choices] == [21, 22, 23]
    assert client.completions.create(**sampled, seed=22).choices[0].text == first.choices[1].text
    assert len({c.text for c in first.choices}) == 3 and first.choices[0].text != plain.choices[0].text
    streamed = list(client.completions.create(**sampled, seed=21, n=3, stream=True))
    for i in range(3):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) == first.choices[i].text
    reference = engine.run([Request(prompts[0], max_new_tokens=8, sampling=Sampling(0.9, 0.95, seed=21))])[0]
    assert first.choices[0].text == reference.output, "the engine's own draw for that seed"


@pytest.fixture(scope="module")
def chat_library(tmp_path_factory):
    """A tiny Llama whose tokenizer has a chat template, three adapters with cards, and the same Llama without one."""
    from tiny_models import make_lora_adapter, save_tiny_base
    from transformers import AutoTokenizer

    from lorahub_cli.cards.data import CardOptions
    from lorahub_cli.registry.cards import card_from_source
    from lorahub_cli.registry.mirror import add_local

    root = tmp_path_factory.mktemp("chat-library")
    model = save_tiny_base("llama", root / "plain")
    tokenizer = AutoTokenizer.from_pretrained(root / "plain")
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    homes = {}
    for name in ("base", "plain"):
        store = Store(root / f"home-{name}")
        for seed, task in enumerate(("capitals", "addition", "sentiment")):
            folder = make_lora_adapter(
                model, root / "adapters" / name / task, alpha=64, seed=seed, base_model_name=str(root / name)
            )
            add_local(store, folder, name=task)
            card_from_source(
                store,
                task,
                CardOptions(data=EXAMPLES / "data" / f"{task}.jsonl", inputs_only=True, instruction=INSTRUCTION),
            )
        homes[name] = root / f"home-{name}"
    return root, homes


def chat_engine(home):
    from lorahub_cli.serve.engine import Engine

    engine = Engine.from_registry(Store(home), dtype="float32", device="cpu", max_new_tokens=LIMIT, batch_size=8)
    decode_ids(engine.base.tokenizer)
    return engine


def test_openai_chat_answers_and_streams_as_the_chat_template_renders(chat_library):
    """/v1/chat/completions on a decoder-only base with a chat template: model = an adapter id answers what PEFT
    generates with that adapter from the rendered conversation, alone; the joined stream equals the answer; a
    seeded sample is repeatable; retrieval (no adapter named) reads the last user message."""
    from transformers import AutoModelForCausalLM

    root, homes = chat_library
    engine = chat_engine(homes["base"])
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": task_inputs("capitals", 1)[0]},
    ]
    tokenizer = decode_ids(AutoTokenizer.from_pretrained(root / "base"))
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(root / "base"), Store(homes["base"]).get("addition").path
    ).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=1
        )
    reference = tokenizer.decode(out[0, len(ids) :].tolist()).strip()
    with running(create_app(engine, window=0.0)) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="addition", messages=messages, max_tokens=10, temperature=0)
        assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == reference and reference
        assert reply.usage.prompt_tokens == len(ids)
        chunks = list(
            client.chat.completions.create(
                model="addition",
                messages=messages,
                max_completion_tokens=10,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == len(
            reply.choices[0].message.content.split()
        ) + (reply.choices[0].finish_reason == "stop")
        text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
        assert text == reference and chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
        sampled = dict(model="m", messages=messages, max_tokens=8, temperature=1.0, seed=3)
        first = client.chat.completions.create(**sampled)
        assert first.choices[0].message.content == client.chat.completions.create(**sampled).choices[0].message.content
        assert first.choices[0].model_extra["lorahub"]["adapters"][0]["id"] == "capitals", "retrieved by the question"
        with pytest.raises(openai.BadRequestError, match="the answer follows a user message"):
            client.chat.completions.create(model="m", messages=[{"role": "assistant", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="tools: Extra inputs are not permitted"):
            client.chat.completions.create(
                model="m", messages=messages, tools=[{"type": "function", "function": {"name": "f"}}]
            )
    plain = chat_engine(homes["plain"])
    with running(create_app(plain, window=0.0)) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="has no chat template"):
            client.chat.completions.create(model="m", messages=messages)
