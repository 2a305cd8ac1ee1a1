"""Mixed-task serving: `python bench/serve.py --setting today|library [--requests 256] [--max-new-tokens N]`.

Two settings over the flan-t5-base-shaped random fixture (bench/fixtures.py; LoRA r 16, q and v):

- today: 256 requests drawn evenly from 20 Big-Bench Hard tasks (their real inputs, 11-197
  WordPiece tokens), over 20 random LoRA modules; adapter i's card is built from task i's
  first 50 inputs. 16 new tokens.
- library (LoraRetriever's setting): a library of 118 random modules, one per task text:
  the 27 BBH tasks in three prompt templates each (as FLAN's templates make several
  modules of one dataset), the 29 tasks of lorahub's demo world and the 8 example tasks;
  each module's card is built from the first 50 inputs of its task. Traffic: 256 requests
  evenly from 48 of those tasks (seeded choice among tasks whose inputs fit 512 tokens).
  32 new tokens.

Cards: inputs only, LoraRetriever's instruction; requests come from the tasks' other inputs.
Every request retrieves its own top-3 (k = 3). Side by side, in one run, each in its own
process (so peak memory is its own):

- ours, mixture: `Engine.run` (per-input retrieval included), mixed batches of 32 over
  one LoRA bank of all 20 adapters, the linear formula with w = 1/3.
- (a) load + merge per group, as LoraRetriever's code does: requests grouped by their
  retrieved set; per group the 3 adapters are read from disk, their average delta is
  merged into q and v, the group is generated (batches of up to 32), the weights restored.
- ours, single: as ours, top-1 only (one-hot rows).
- (b) PEFT mixed batch: all 20 adapters loaded in one PeftModel, `generate(adapter_names=
  [top-1 of each row])`, batches of 32: one adapter per row is the most PEFT offers.
- ours over HTTP: `lorahub serve`'s app (uvicorn, batch window 10 ms, mixture). Throughput: every
  request posted at once from one asyncio client (aiohttp, at most --clients connections, default 64). Latency: then
  --rate-requests requests posted at a fixed arrival rate (--rate-share of ours-mixture's
  in-process throughput in this run), p50 / p95 from post to answer.
- the base model alone (no adapter, same batches): the ceiling no adapter method can pass.
- ours-mixture-static, ours-http-static: ours-mixture and ours-http with `--batching static` (whole batches
  through `model.generate`, each until its longest answer is done; nothing joins a running batch), the
  baseline of continuous batching (the default, `lorahub_cli/decoding.py`). Their rows give the ratio
  continuous / static in process and over HTTP (throughput, and p50 / p95 at the same arrival rate).

- ours-scored against merge-per-request: every request with its own weights (compose "scored": its top 3
  weighted by the softmax of its own retrieval scores / 0.1), so merging per group is merging per request:
  the baseline merges each request's weighted delta and decodes it alone (the weights are computed in this
  file, not by lorahub).
- crossover, ours against merge-per-group: the first --crossover-requests requests, request i composed as the
  (i mod C)-th of C scored compositions, for each C in --distinct; both sides given the compositions (ours:
  `generation.generate_tokens` over the bank, batches of 32; merge-per-group: one merge per composition). As
  C grows, merge-per-group's groups shrink and ours stays one batch: where its time passes ours is the
  crossover. Both sides run in one process, which goes first alternating from one C to the next.
- ours-http also posts --alone-requests requests one at a time to the idle server (the latency of a request
  served alone) before its fixed-rate run; the report gives p50 at the fixed rate over that.

Mixed answer lengths (`--answer-lengths 4-64`): request i asks for its own max_new_tokens, drawn
uniformly from the range (seeded, the same in every method); `--eos` lets the end-of-sequence token end
rows (only the other special tokens are suppressed). Static batches then decode each batch to its longest
answer; continuous batching lets each row leave at its end and waiting requests join.

The baselines get the routes for free (computed once beforehand with the same retrieval);
ours pays for its retrieval. Throughput = requests / generation seconds (models loaded
beforehand). To keep the run near ten minutes on two shared cores, the baselines time a
seeded sample of their work (--sample, default 0.25: random whole groups for (a); for (b)
every fourth of the length-sorted batches of 32 that ours runs, from a seeded offset) and their throughput is the
requests they answered over the time they took; ours answers all 256. Greedy decoding; the random model never emits
end-of-sequence, so every
request generates exactly --max-new-tokens tokens. Outputs are compared request by
request: ours-mixture with (a), ours-single with (b). The random model's greedy choice is [PAD]
whatever the adapter, so special tokens are suppressed in every method (outputs then differ by
adapter and input, and equal outputs mean something).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from fixtures import BBH_DIR as BBH  # noqa: E402

CACHE = BENCH / ".cache" / "serve"
CARD_EXAMPLES = 50
LIBRARY_TRAFFIC_TASKS = 48
LIBRARY_SEED = 5000  # library module i: torch seed LIBRARY_SEED + i
TEMPLATES = ("{x}", "Answer the following question.\n{x}", "Q: {x}\nA:")  # three prompt templates per BBH task
K = 3
BATCH = 32
CLIENTS = 64
MAX_INPUT_TOKENS = 512
METHODS = (
    "ours-mixture",
    "merge-per-group",
    "ours-single",
    "peft-adapter-names",
    "ours-http",
    "base-model",
    "ours-mixture-static",
    "ours-http-static",
    "ours-scored",
    "merge-per-request",
    "crossover",
)
CROSSOVER = ("crossover",)
LENGTH_SEED = 12  # request i's max_new_tokens under --answer-lengths: random.Random(LENGTH_SEED), i-th draw


def answer_limits(n: int, spec: str | None, max_new_tokens: int) -> list[int]:
    """Each request's max_new_tokens: --answer-lengths LO-HI drawn seeded, else --max-new-tokens for all."""
    if not spec:
        return [max_new_tokens] * n
    lo, hi = (int(x) for x in spec.split("-"))
    draw = random.Random(LENGTH_SEED)
    return [draw.randint(lo, hi) for _ in range(n)]


# --- the world: fixture, registry with cards, requests, routes (built once, cached) -------------


def tasks() -> list[str]:
    """The 20 BBH tasks with the shortest inputs (mean 11 to 147 tokens): long-context tasks left out."""
    from fixtures import _tokenizer

    tok, lengths = _tokenizer(), {}
    for path in sorted(BBH.glob("*.json")):
        examples = json.loads(path.read_text())["examples"][:60]
        lengths[path.stem] = sum(len(tok(e["input"])["input_ids"]) for e in examples) / len(examples)
    return sorted(lengths, key=lengths.get)[:20]


def build_world(setting: str, n_requests: int) -> dict:
    task_inputs, adapter_dirs, traffic = today_library() if setting == "today" else large_library()
    world_file = CACHE / setting / f"world-{n_requests}.json"
    if world_file.exists():
        world = json.loads(world_file.read_text())
        # A world of another library is built again (the demo world renamed tasks; or it retrieved from modules
        # of another library the registry held then).
        library = set(world["adapter_dirs"])
        if library == set(task_inputs) and all(set(r["routes"]) <= library for r in world["requests"]):
            if "scores" not in world["requests"][0]:  # a world built before the scored setting: add its scores
                world = with_scores(world)
                world_file.write_text(json.dumps(world))
            return world
    world = register(CACHE / setting, task_inputs, adapter_dirs, traffic, n_requests)
    world_file.write_text(json.dumps(world))
    return world


def with_scores(world: dict) -> dict:
    """Each request's retrieval scores of its top K (the same retrieval that chose its routes)."""
    from lorahub_cli import retrieval
    from lorahub_cli.io import Example
    from lorahub_cli.registry import Store

    index = retrieval.CardIndex.from_store(Store(Path(world["home"])))
    texts = [Example(r["input"]) for r in world["requests"]]
    for request, matches in zip(world["requests"], retrieval.per_input(index, index.embedder(), texts, K).inputs):
        assert [m.id for m in matches] == request["routes"], "the same retrieval"
        request["scores"] = [m.score for m in matches]
    return world


def score_weights(scores: list[float]) -> list[float]:
    """compose 'scored': softmax(s / t) over a request's K scores, written out here (not lorahub's code)."""
    from lorahub_cli.settings import SERVE

    exps = [math.exp(x / SERVE["score_temperature"]) for x in scores]
    return [e / sum(exps) for e in exps]


def today_library():
    """The 20 shortest BBH tasks, one fixture module each; traffic from all 20."""
    from fixtures import fixture

    manifest = fixture("base")
    names = tasks()
    task_inputs = {t: [e["input"] for e in json.loads((BBH / f"{t}.json").read_text())["examples"]] for t in names}
    return task_inputs, dict(zip(names, manifest["adapter_dirs"])), names


def large_library():
    """118 task texts (27 BBH tasks x 3 templates, the demo world's 29 tasks, 8 example tasks), one random module
    each (the fixture's recipe, seeds LIBRARY_SEED + i); traffic from 48 of them, seeded."""
    from fixtures import _tokenizer, fixture

    from lorahub_cli.demo import world as demo_world
    from lorahub_cli.examples import tasks as example_tasks

    task_inputs = {}
    for path in sorted(BBH.glob("*.json")):
        examples = [e["input"] for e in json.loads(path.read_text())["examples"]]
        for t, template in enumerate(TEMPLATES):
            task_inputs[f"{path.stem}-t{t}"] = [template.format(x=x) for x in examples]
    for name in demo_world.TASKS:
        task_inputs[f"demo-{name}"] = [r["input"] for r in demo_world.generate(name, 150, seed=0)]
    for name in example_tasks.TASKS:
        task_inputs[f"example-{name}"] = [r["input"] for r in example_tasks.generate(name, 150, seed=0)]
    adapter_dirs = random_modules(fixture("base")["model_dir"], list(task_inputs))
    tok = _tokenizer()
    fits = [
        t
        for t, xs in task_inputs.items()
        if max(len(tok(x)["input_ids"]) for x in xs[CARD_EXAMPLES : CARD_EXAMPLES + 60]) <= MAX_INPUT_TOKENS
    ]
    traffic = sorted(random.Random(1).sample(fits, LIBRARY_TRAFFIC_TASKS))
    return task_inputs, adapter_dirs, traffic


def random_modules(model_dir: str, names: list[str]) -> dict[str, str]:
    """One random LoRA module per name (r 16, alpha 32, q and v), built as bench/fixtures.py builds its 20."""
    from fixtures import LORA_ALPHA, LORA_DROPOUT, LORA_R, LORA_TARGETS, _random_adapter_state
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import T5ForConditionalGeneration

    root = CACHE / "library" / "modules"
    dirs = {name: str(root / name) for name in names}
    if all((Path(d) / "adapter_model.safetensors").is_file() for d in dirs.values()):
        return dirs
    model = T5ForConditionalGeneration.from_pretrained(model_dir)
    config = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules=list(LORA_TARGETS),
        task_type=TaskType.SEQ_2_SEQ_LM,
        base_model_name_or_path=model_dir,
    )
    peft_model = get_peft_model(model, config)
    for i, name in enumerate(names):
        values = _random_adapter_state(peft_model, LIBRARY_SEED + i)
        with torch.no_grad():
            for key, param in peft_model.named_parameters():
                if key in values:
                    param.copy_(values[key])
        peft_model.save_pretrained(dirs[name])
    return dirs


def register(root: Path, task_inputs: dict, adapter_dirs: dict, traffic: list[str], n_requests: int) -> dict:
    """A registry of the modules with cards from their tasks' first inputs, and requests from the others."""
    from lorahub_cli import retrieval
    from lorahub_cli.cards.data import CardOptions
    from lorahub_cli.io import Example
    from lorahub_cli.registry import Store
    from lorahub_cli.registry.cards import card_from_source
    from lorahub_cli.registry.mirror import add_local
    from lorahub_cli.settings import LORARETRIEVER_INSTRUCTION

    store = Store(root / "home")
    for task, inputs in task_inputs.items():
        if store.find(task) is None:
            data = root / "data" / f"{task}.jsonl"
            data.parent.mkdir(parents=True, exist_ok=True)
            # The card reads inputs only; the file format asks for a target all the same.
            data.write_text("".join(json.dumps({"input": x, "target": "-"}) + "\n" for x in inputs[:CARD_EXAMPLES]))
            add_local(store, Path(adapter_dirs[task]), name=task)
            card_from_source(
                store, task, CardOptions(data=data, inputs_only=True, instruction=LORARETRIEVER_INSTRUCTION)
            )
    for record in store.list():
        if record.id not in task_inputs:  # a module of an earlier library in this cache's own registry
            store.remove(record.id)
    rng = random.Random(0)
    # Evenly over the traffic's tasks, shuffled so every batch mixes them.
    chosen = [
        (t, rng.choice(task_inputs[t][CARD_EXAMPLES:]))
        for t in (traffic * (n_requests // len(traffic) + 1))[:n_requests]
    ]
    rng.shuffle(chosen)
    index = retrieval.CardIndex.from_store(store)
    ranked = retrieval.per_input(index, index.embedder(), [Example(text) for _, text in chosen], K).inputs
    from fixtures import fixture

    return {
        "home": str(root / "home"),
        "model_dir": fixture("base")["model_dir"],
        "adapters": len(task_inputs),
        "traffic_tasks": len(traffic),
        "adapter_dirs": {t: str(store.get(t).path) for t in task_inputs},
        "requests": [
            {
                "task": t,
                "input": text,
                "routes": [m.id for m in matches],
                "scores": [m.score for m in matches],
            }
            for (t, text), matches in zip(chosen, ranked)
        ],
    }


# --- the methods, each run in a worker process -------------------------------------------------


def suppress_special(model, tokenizer, keep_eos: bool = False) -> None:
    """The random model's greedy choice is [PAD] whatever the adapter, which would make every output empty
    and every comparison of outputs vacuous: special tokens are ruled out, so outputs show the adapters.
    `keep_eos`: the end-of-sequence token stays possible (--eos), so rows may end early."""
    kept = {tokenizer.eos_token_id} if keep_eos else set()
    model.generation_config.suppress_tokens = [t for t in tokenizer.all_special_ids if t not in kept]


def ours(world, mode: str, limits: list[int], eos: bool, batching: str = "continuous") -> dict:
    from lorahub_cli.registry import Store
    from lorahub_cli.serve.engine import Engine, Request

    engine = Engine.from_registry(
        Store(Path(world["home"])),
        dtype="float32",
        device="cpu",
        k=K,
        compose=mode,
        max_new_tokens=max(limits),
        batch_size=BATCH,
        max_input_tokens=MAX_INPUT_TOKENS,
        batching=batching,
    )
    suppress_special(engine.base.model, engine.base.tokenizer, eos)
    texts = [r["input"] for r in world["requests"]]
    engine.run([Request(t, max_new_tokens=2) for t in texts[:2]])  # warm-up (first-call allocations)
    start = time.perf_counter()
    answers = engine.run([Request(t, max_new_tokens=m) for t, m in zip(texts, limits)])
    return {
        "seconds": time.perf_counter() - start,
        "outputs": [a.output for a in answers],
        "generated_tokens": sum(len(a.tokens) for a in answers),
        "batching": engine.batching,
        "routes": [[x["id"] for x in a.route["adapters"]] for a in answers],
        **memory(engine, world),
    }


def memory(engine, world) -> dict:
    """The bank's factor buffers against the adapters' own safetensors files, and the base model's parameters."""
    from lorahub_cli.compose.bank import BankedLayer

    bank = sum(
        b.numel() * b.element_size()
        for m in engine.base.model.modules()
        if isinstance(m, BankedLayer)
        for b in (m.lora_A, m.lora_B, m.owner, m.col_scaling)
    )
    files = sum((Path(d) / "adapter_model.safetensors").stat().st_size for d in world["adapter_dirs"].values())
    base = sum(p.numel() * p.element_size() for p in engine.base.model.parameters())
    return {"bank_mb": bank / 2**20, "adapter_files_mb": files / 2**20, "base_mb": base / 2**20}


def sample_units(units: list[list[int]], fraction: float) -> list[list[int]]:
    """A seeded random subset of work units covering at least `fraction` of the requests."""
    shuffled = units[:]
    random.Random(0).shuffle(shuffled)
    total, chosen = sum(map(len, units)), []
    while shuffled and sum(map(len, chosen)) < fraction * total:
        chosen.append(shuffled.pop())
    return chosen


def base_model(world, limits: list[int], eos: bool) -> dict:
    from lorahub_cli.generation import generate
    from lorahub_cli.models import load_base_model

    base = load_base_model(world["model_dir"], dtype="float32", device="cpu")
    suppress_special(base.model, base.tokenizer, eos)
    texts = [r["input"] for r in world["requests"]]
    generate(base, texts[:2], max_new_tokens=2, batching="static")  # warm-up
    start = time.perf_counter()
    outputs = generate(
        base, texts, max_new_tokens=limits, batch_size=BATCH, max_input_length=MAX_INPUT_TOKENS, batching="static"
    )
    return {"seconds": time.perf_counter() - start, "outputs": outputs}


def compositions(world, weighting: str) -> list[tuple[tuple[str, float], ...]]:
    """Each request's composition, (adapter, weight) pairs: its K routes at 1/K (mixture), or weighted by its own
    scores (scored; no two requests share one)."""
    out = []
    for r in world["requests"]:
        weights = score_weights(r["scores"]) if weighting == "scored" else [1 / len(r["routes"])] * len(r["routes"])
        out.append(tuple(sorted(zip(r["routes"], weights))))
    return out


def merge_per_group(world, limits: list[int], eos: bool, fraction: float, weighting: str = "mixture", base=None):
    """LoraRetriever's reference approach, made as fast as it goes: per group of requests with the same
    composition, read the adapters from disk and merge their weighted delta into the base weights (1/K each for
    mixture: a group per retrieved set; scored: a group per request). `world["compositions"]`, when given,
    replaces the requests' own (the crossover run)."""
    from safetensors.torch import load_file

    from lorahub_cli.generation import generate
    from lorahub_cli.models import load_base_model

    if base is None:
        base = load_base_model(world["model_dir"], dtype="float32", device="cpu")
        suppress_special(base.model, base.tokenizer, eos)
    own = world.get("compositions") or compositions(world, weighting)
    groups = defaultdict(list)
    for i, composition in enumerate(own):
        groups[tuple(composition)].append(i)
    generate(base, [world["requests"][0]["input"]], max_new_tokens=2, batching="static")  # warm-up
    outputs = [None] * len(world["requests"])
    chosen = sample_units(list(groups.values()), fraction)
    start = time.perf_counter()
    for rows in chosen:
        deltas = defaultdict(float)
        for adapter, w in own[rows[0]]:
            folder = Path(world["adapter_dirs"][adapter])
            config = json.loads((folder / "adapter_config.json").read_text())
            scaling = config["lora_alpha"] / config["r"]
            state = load_file(folder / "adapter_model.safetensors")
            for key, A in state.items():
                if ".lora_A." in key:
                    module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                    B = state[key.replace(".lora_A.", ".lora_B.")]
                    deltas[module] = deltas[module] + (w * scaling) * (B @ A)  # (d_out, d_in)
        saved = {}
        with torch.no_grad():
            for module, delta in deltas.items():
                weight = base.model.get_submodule(module).weight
                saved[module] = weight.clone()
                weight += delta
        texts = generate(
            base,
            [world["requests"][i]["input"] for i in rows],
            max_new_tokens=[limits[i] for i in rows],
            batch_size=BATCH,
            batching="static",
        )
        with torch.no_grad():
            for module, weight in saved.items():
                base.model.get_submodule(module).weight.copy_(weight)
        for i, text in zip(rows, texts):
            outputs[i] = text
    return {
        "seconds": time.perf_counter() - start,
        "outputs": outputs,
        "answered": sum(map(len, chosen)),
        "units": f"{len(chosen)} of {len(groups)} groups",
    }


def crossover_world(world, distinct: int, n: int) -> dict:
    """The first n requests, request i composed as the (i mod distinct)-th of the first `distinct` requests' own
    scored compositions: `distinct` compositions in the traffic, evenly."""
    own = compositions(world, "scored")[:distinct]
    return {**world, "requests": world["requests"][:n], "compositions": [own[i % distinct] for i in range(n)]}


def crossover(world, limits: list[int], eos: bool, distinct: list[int], n: int) -> dict:
    """For each number of distinct compositions in n requests, both sides in this one process, which goes first
    alternating (so a change in the machine's load falls on both): ours (the grouped bank, per-row weights,
    through `generation.generate_tokens`: the library path, routes given, as the baseline gets them) and
    merge-per-group on the same traffic."""
    from lorahub_cli.compose.bank import SparseRow
    from lorahub_cli.generation import generate_tokens
    from lorahub_cli.models import load_base_model
    from lorahub_cli.registry import Store
    from lorahub_cli.serve.engine import Engine

    plain = load_base_model(world["model_dir"], dtype="float32", device="cpu")
    engine = Engine.from_registry(Store(Path(world["home"])), dtype="float32", device="cpu", batch_size=BATCH)
    base, column = engine.base, {name: i for i, name in enumerate(engine.bank.names)}
    for model in (plain, base):
        suppress_special(model.model, model.tokenizer, eos)
    options = dict(bank=engine.bank, mode="linear", batch_size=BATCH)

    def ours(sub) -> dict:
        ids = base.tokenizer([r["input"] for r in sub["requests"]])["input_ids"]
        rows = [SparseRow(tuple(column[a] for a, _ in c), tuple(w for _, w in c)) for c in sub["compositions"]]
        generate_tokens(base, ids[:2], weights=rows[:2], max_new_tokens=2, **options)  # warm-up
        start = time.perf_counter()
        generated = generate_tokens(base, ids, weights=rows, max_new_tokens=limits[:n], **options)
        return {"seconds": time.perf_counter() - start, "outputs": [g.text for g in generated]}

    sides = {"ours": ours, "merge": lambda sub: merge_per_group(sub, limits, eos, 1.0, base=plain)}
    runs = {"ours": {}, "merge": {}}
    for j, d in enumerate(distinct):
        sub = crossover_world(world, d, n)
        for side in ("ours", "merge") if j % 2 == 0 else ("merge", "ours"):
            r = sides[side](sub)
            runs[side][d] = {"seconds": r["seconds"], "outputs": r["outputs"]}
            print(f"  crossover {side}, {d} distinct: {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    seconds = sum(r["seconds"] for side in runs.values() for r in side.values())
    return {"seconds": seconds, "outputs": [], "crossover": runs}


def peft_adapter_names(world, limits: list[int], eos: bool, fraction: float) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["model_dir"])
    model = AutoModelForSeq2SeqLM.from_pretrained(world["model_dir"], dtype=torch.float32)
    names = list(world["adapter_dirs"])
    model = PeftModel.from_pretrained(model, world["adapter_dirs"][names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(world["adapter_dirs"][name], adapter_name=name)
    model.eval()
    suppress_special(model.get_base_model(), tok, eos)
    requests = world["requests"]
    order = sorted(range(len(requests)), key=lambda i: -len(tok(requests[i]["input"])["input_ids"]))
    outputs = [None] * len(requests)
    # The batches ours forms (all requests sorted by length, 32 a batch), every step-th from a seeded offset:
    # the sample spans short and long inputs and pads exactly as ours does.
    batches = [order[b : b + BATCH] for b in range(0, len(order), BATCH)]
    step = max(1, round(1 / fraction))
    chosen = batches[random.Random(0).randrange(step) :: step]

    def run(rows):
        batch = tok(
            [requests[i]["input"] for i in rows],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=MAX_INPUT_TOKENS,
        )
        with torch.no_grad():
            out = model.generate(
                **batch,
                adapter_names=[requests[i]["routes"][0] for i in rows],
                do_sample=False,
                num_beams=1,
                max_new_tokens=max(limits[i] for i in rows),
                pad_token_id=tok.pad_token_id,
            )
        # Each row up to its own limit (greedy: the same as stopping there) and its first end-of-sequence.
        cut = [row[1 : 1 + limits[i]] for i, row in zip(rows, out.tolist())]
        cut = [row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row for row in cut]
        return tok.batch_decode(cut, skip_special_tokens=True)

    run(order[:2])  # warm-up
    start = time.perf_counter()
    for rows in chosen:
        for i, text in zip(rows, run(rows)):
            outputs[i] = text.strip()
    return {
        "seconds": time.perf_counter() - start,
        "outputs": outputs,
        "answered": sum(map(len, chosen)),
        "units": f"{len(chosen)} of {len(batches)} batches",
    }


def ours_http(
    world,
    limits: list[int],
    eos: bool,
    rate: float,
    rate_requests: int,
    batching: str = "continuous",
    clients: int = CLIENTS,
    alone_requests: int = 8,
) -> dict:
    """The served app under uvicorn; one asyncio client (no thread per client competing for the cores)."""
    import asyncio
    import threading

    import aiohttp
    import uvicorn

    from lorahub_cli.registry import Store
    from lorahub_cli.serve.engine import Engine, Request
    from lorahub_cli.serve.server import create_app

    engine = Engine.from_registry(
        Store(Path(world["home"])),
        dtype="float32",
        device="cpu",
        k=K,
        compose="mixture",
        max_new_tokens=max(limits),
        batch_size=BATCH,
        max_input_tokens=MAX_INPUT_TOKENS,
        batching=batching,
    )
    suppress_special(engine.base.model, engine.base.tokenizer, eos)
    engine.run([Request(r["input"], max_new_tokens=2) for r in world["requests"][:2]])  # warm-up
    app = create_app(engine, max_batch=BATCH, window=0.01, max_queue=1024)
    # Keep-alive longer than the client's pauses: a connection uvicorn closes as aiohttp reuses it is reset.
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_keep_alive=600)
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1/generate"
    texts = [r["input"] for r in world["requests"]]
    stats = app.state.batcher.stats

    async def post(session, text, limit, delay=0.0):
        await asyncio.sleep(delay)
        begin = time.perf_counter()
        async with session.post(url, json={"input": text, "max_new_tokens": limit}) as response:
            output = (await response.json())["output"]
        return output, time.perf_counter() - begin

    async def all_at_once():
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=clients), timeout=aiohttp.ClientTimeout(total=3600)
        ) as session:
            return await asyncio.gather(*(post(session, t, m) for t, m in zip(texts, limits)))

    async def fixed_rate():
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=3600)
        ) as session:
            return await asyncio.gather(
                *(post(session, t, limits[i], i / rate) for i, t in enumerate(texts[:rate_requests]))
            )

    start = time.perf_counter()
    results = asyncio.run(all_at_once())
    seconds = time.perf_counter() - start
    batches = {
        "clients": clients,
        "batches": stats.batches,
        "largest_batch": stats.largest_batch,
        "busy_seconds": stats.busy_seconds,
        "steps": stats.steps,
        "batching": engine.batching,
    }

    async def one_at_a_time():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
            return [await post(session, texts[i], limits[i]) for i in range(alone_requests)]

    # Latency of a request served alone (the idle server), for the requests the fixed-rate run starts with.
    alone = sorted(latency for _, latency in asyncio.run(one_at_a_time())) if rate_requests else []
    timed = asyncio.run(fixed_rate()) if rate_requests else []
    server.should_exit = True
    latencies = sorted(latency for _, latency in timed)
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {
        "seconds": seconds,
        "outputs": [o for o, _ in results],
        **batches,
        **({"p50": pick(0.5), "p95": pick(0.95), "rate": rate, "rate_requests": rate_requests} if latencies else {}),
        **({"alone_p50": alone[len(alone) // 2], "alone_requests": len(alone)} if alone else {}),
    }


def worker(
    method: str,
    world_file: Path,
    max_new_tokens: int,
    fraction: float,
    peft_fraction: float,
    out: Path,
    rate: float,
    rate_requests: int,
    answer_lengths: str | None,
    eos: bool,
    threads: int,
    clients: int,
    distinct: list[int],
    crossover_requests: int,
    alone_requests: int,
) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    world = json.loads(world_file.read_text())
    limits = answer_limits(len(world["requests"]), answer_lengths, max_new_tokens)
    run = {
        "ours-mixture": lambda: ours(world, "mixture", limits, eos),
        "ours-mixture-static": lambda: ours(world, "mixture", limits, eos, batching="static"),
        "ours-single": lambda: ours(world, "single", limits, eos),
        "merge-per-group": lambda: merge_per_group(world, limits, eos, fraction),
        "peft-adapter-names": lambda: peft_adapter_names(world, limits, eos, peft_fraction),
        "ours-http": lambda: ours_http(
            world, limits, eos, rate, rate_requests, clients=clients, alone_requests=alone_requests
        ),
        "ours-http-static": lambda: ours_http(
            world, limits, eos, rate, rate_requests, batching="static", clients=clients
        ),
        "base-model": lambda: base_model(world, limits, eos),
        "ours-scored": lambda: ours(world, "scored", limits, eos),
        "merge-per-request": lambda: merge_per_group(world, limits, eos, fraction, weighting="scored"),
        "crossover": lambda: crossover(world, limits, eos, distinct, crossover_requests),
    }[method]
    began, cpu = time.perf_counter(), time.process_time()
    result = run()
    # The share of one core this process had (loading included): below 1 per thread, others took the cores.
    result["cpu_share"] = (time.process_time() - cpu) / (time.perf_counter() - began) / threads
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps(result))


# --- the side-by-side run ----------------------------------------------------------------------


def same(a: list, b: list) -> str:
    """Equal outputs among the requests both answered."""
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return f"{sum(x == y for x, y in both)}/{len(both)}"


def cpu_flags() -> str:
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
    )
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"]
    return f"{model}; " + " ".join(f for f in wanted if f in flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=("today", "library"), default="library")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, help="Default: 16 (today), 32 (library).")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sample", type=float, default=0.25, help="Share of the traffic the baselines answer.")
    parser.add_argument("--peft-sample", type=float, help="Share PEFT answers (default: --sample).")
    parser.add_argument(
        "--rate-share",
        type=float,
        default=0.7,
        help="HTTP latency run: arrival rate as a share of ours-mixture's in-process throughput.",
    )
    parser.add_argument("--rate-requests", type=int, default=64, help="Requests of the fixed-rate latency run.")
    parser.add_argument(
        "--reuse", action="store_true", help="Take the results of methods not in --methods from the last run."
    )
    parser.add_argument(
        "--answer-lengths",
        metavar="LO-HI",
        help="Each request's own max_new_tokens, drawn seeded from LO..HI (default: --max-new-tokens for all).",
    )
    parser.add_argument(
        "--eos", action="store_true", help="Let the end-of-sequence token end answers (default: suppressed)."
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per method process.")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="HTTP throughput run: requests in flight at once.")
    parser.add_argument(
        "--distinct",
        default="1,2,4,8,16,32,64",
        help="Crossover: numbers of distinct compositions among --crossover-requests requests.",
    )
    parser.add_argument("--crossover-requests", type=int, default=64, help="Crossover: requests per run.")
    parser.add_argument(
        "--alone-requests", type=int, default=8, help="HTTP latency: requests posted one at a time to the idle server."
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_new_tokens = args.max_new_tokens or (16 if args.setting == "today" else 32)
    args.peft_sample = args.peft_sample or args.sample
    if args.worker:
        return worker(
            args.worker,
            args.world,
            args.max_new_tokens,
            args.sample,
            args.peft_sample,
            args.out,
            args.rate,
            args.rate_requests,
            args.answer_lengths,
            args.eos,
            args.threads,
            args.clients,
            [int(d) for d in args.distinct.split(",")],
            args.crossover_requests,
            args.alone_requests,
        )
    if args.answer_lengths and not re.fullmatch(r"\d+-\d+", args.answer_lengths):
        parser.error(f"--answer-lengths {args.answer_lengths}: give LO-HI, e.g. 4-64.")
    began_all, load_start = time.perf_counter(), open("/proc/loadavg").read().split()[:3]
    world = build_world(args.setting, args.requests)
    root = CACHE / args.setting
    world_file = root / f"world-{args.requests}.json"
    results = {}
    setting = {
        "setting": args.setting,
        "requests": args.requests,
        "max_new_tokens": args.max_new_tokens,
        "sample": args.sample,
        "peft_sample": args.peft_sample,
        "answer_lengths": args.answer_lengths,
        "eos": args.eos,
        "threads": args.threads,
        "distinct": args.distinct,
        "crossover_requests": args.crossover_requests,
    }
    for method in METHODS if args.reuse else ():
        cached = root / f"result-{method}.json"
        if method not in args.methods.split(",") and cached.exists():
            result = json.loads(cached.read_text())
            if result.get("setting") == setting:
                results[method] = result
    for method in filter(None, args.methods.split(",")):
        out = root / f"result-{method}.json"
        began = time.perf_counter()
        rate = (
            args.rate_share * args.requests / results["ours-mixture"]["seconds"] if "ours-mixture" in results else 1.0
        )
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                method,
                "--world",
                str(world_file),
                "--setting",
                args.setting,
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--sample",
                str(args.sample),
                "--peft-sample",
                str(args.peft_sample),
                "--out",
                str(out),
                "--threads",
                str(args.threads),
                "--clients",
                str(args.clients),
                *(["--answer-lengths", args.answer_lengths] if args.answer_lengths else []),
                *(["--eos"] if args.eos else []),
                "--rate",
                str(rate),
                "--rate-requests",
                str(args.rate_requests if "ours-mixture" in results else 0),
                "--distinct",
                args.distinct,
                "--crossover-requests",
                str(args.crossover_requests),
                "--alone-requests",
                str(args.alone_requests),
            ],
            check=True,
        )
        results[method] = r = {**json.loads(out.read_text()), "setting": setting}
        out.write_text(json.dumps(r))
        print(
            f"{method}: {r['seconds']:.1f} s generating, {time.perf_counter() - began:.1f} s in all, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB, {r['cpu_share']:.0%} of its cores' time",
            file=sys.stderr,
            flush=True,
        )
    # The sampled baselines answer a sample whose inputs may be shorter or longer than the traffic's: the ratios
    # are given per request and per input token (the encoder's work is linear in input tokens).
    from fixtures import _tokenizer

    tok = _tokenizer()
    lengths = [len(tok(r["input"])["input_ids"]) for r in world["requests"]]
    flat = {m: r for m, r in results.items() if m not in CROSSOVER}
    tokens = {m: sum(n for n, o in zip(lengths, r["outputs"]) if o is not None) for m, r in flat.items()}
    token_rate = {m: tokens[m] / r["seconds"] for m, r in flat.items()}
    request_rate = {m: r.get("answered", args.requests) / r["seconds"] for m, r in flat.items()}
    sets = len({tuple(sorted(r["routes"])) for r in world["requests"]})
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores ({cpu_flags()}), torch {torch.__version__}, "
        f"{args.threads} threads; /proc/loadavg at the start {' '.join(load_start)}, at the end "
        f"{' '.join(open('/proc/loadavg').read().split()[:3])}; {time.perf_counter() - began_all:.0f} s in all"
    )
    print(
        f"setting {args.setting}: {args.requests} requests from {world.get('traffic_tasks', 20)} tasks over "
        f"{world.get('adapters', 20)} adapters ({sets} distinct retrieved sets), k = {K}, batch {BATCH}, "
        + (
            f"max_new_tokens per request from {args.answer_lengths} (seeded)"
            if args.answer_lengths
            else f"{args.max_new_tokens} new tokens each"
        )
        + (", EOS ends answers" if args.eos else "")
        + " (greedy)"
    )
    print(
        "| method | requests answered | input tokens | seconds | requests/s | input tokens/s | p50 / p95 latency (s) "
        "| peak RSS (MB) | CPU share | vs its baseline (requests/s, input tokens/s) | outputs equal to |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    pairs = {
        "ours-mixture": "merge-per-group",
        "ours-single": "peft-adapter-names",
        "ours-http": "ours-mixture",
        "ours-mixture-static": "ours-mixture",
        "ours-http-static": "ours-http",
        "ours-scored": "merge-per-request",
    }
    table = {m: r for m, r in results.items() if m not in CROSSOVER}
    for method, r in sorted(table.items(), key=lambda item: METHODS.index(item[0])):
        latency = f"{r['p50']:.1f} / {r['p95']:.1f} at {r['rate']:.2f}/s" if "p50" in r else "–"
        baseline = pairs.get(method)
        ratio = (
            f"{request_rate[method] / request_rate[baseline]:.2f}x, {token_rate[method] / token_rate[baseline]:.2f}x"
            if baseline in results
            else "–"
        )
        equal = f"{same(r['outputs'], results[baseline]['outputs'])} of {baseline}" if baseline in results else "–"
        answered = f"{r['answered']} ({r['units']})" if "units" in r else str(args.requests)
        share = f"{r['cpu_share']:.0%}" if "cpu_share" in r else "–"
        print(
            f"| {method} | {answered} | {tokens[method]} | {r['seconds']:.1f} | {request_rate[method]:.2f} "
            f"| {token_rate[method]:.0f} | {latency} | {r['peak_rss_mb']:.0f} | {share} | {ratio} | {equal} |"
        )
    for method in ("ours-http", "ours-http-static"):
        if "batches" in results.get(method, {}):
            r = results[method]
            steps = f", {r['steps']} decoding steps" if r.get("steps") else ""
            clients = f"{r['clients']} requests in flight, " if r.get("clients") else ""
            print(
                f"{method}: {clients}{r['batches']} batches (largest {r['largest_batch']}{steps}), the model busy "
                f"{r['busy_seconds']:.1f} s of the {r['seconds']:.1f} s"
            )
    for continuous, static in (("ours-mixture", "ours-mixture-static"), ("ours-http", "ours-http-static")):
        if continuous in results and static in results:
            a, b = results[continuous], results[static]
            line = (
                f"continuous / static batching, {continuous}: {request_rate[continuous] / request_rate[static]:.2f}x "
                f"requests/s ({a['seconds']:.1f} s against {b['seconds']:.1f} s)"
            )
            if "p50" in a and "p50" in b:
                line += (
                    f"; p50 {a['p50']:.2f} s against {b['p50']:.2f} s, p95 {a['p95']:.2f} s against {b['p95']:.2f} s"
                )
            if "generated_tokens" in a:
                line += f"; {a['generated_tokens']} tokens generated"
            print(line + f"; outputs equal {same(a['outputs'], b['outputs'])}")
    r = results.get("ours-http", {})
    if "alone_p50" in r:
        print(
            f"ours-http latency: p50 {r['p50']:.2f} s at {r['rate']:.2f} requests/s ({args.rate_share:.0%} of "
            f"ours-mixture's throughput), one request served alone {r['alone_p50']:.2f} s (p50 of "
            f"{r['alone_requests']} posted one at a time): {r['p50'] / r['alone_p50']:.1f}x (target: at most 5x)"
        )
    if "crossover" in results:
        ours_x, merge_x = results["crossover"]["crossover"]["ours"], results["crossover"]["crossover"]["merge"]
        print(
            f"\ncrossover: {args.crossover_requests} requests (the first of the traffic), request i composed as the "
            "(i mod C)-th of C scored compositions; both sides given the compositions (no retrieval)"
        )
        print(
            "| distinct compositions C | at most per batch of 32 | ours (s) | merge-per-group (s) | speed-up "
            "(merge s / ours s) | outputs equal |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | --- |")
        for d in sorted(ours_x, key=int):
            a, b = ours_x[d], merge_x.get(d)
            if b is None:
                continue
            print(
                f"| {d} | {min(int(d), BATCH)} | {a['seconds']:.1f} | {b['seconds']:.1f} "
                f"| {b['seconds'] / a['seconds']:.2f}x | {same(a['outputs'], b['outputs'])} |"
            )
    for method in ("ours-mixture", "ours-single"):
        if "bank_mb" in results.get(method, {}):
            r = results[method]
            print(
                f"{method}: bank {r['bank_mb']:.0f} MB for adapter files of {r['adapter_files_mb']:.0f} MB; "
                f"base model {r['base_mb']:.0f} MB; peak RSS {r['peak_rss_mb']:.0f} MB"
            )


if __name__ == "__main__":
    main()
