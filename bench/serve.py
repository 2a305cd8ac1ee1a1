"""Mixed-task serving: `python bench/serve.py [--requests 256] [--max-new-tokens 16]`.

256 requests drawn evenly from 20 Big-Bench Hard tasks (their real inputs, 11-197
WordPiece tokens), over the 20 random LoRA modules of the flan-t5-base-shaped fixture
(bench/fixtures.py; r 16, q and v). Adapter i's card is built from task i's first 50
inputs (inputs only, LoraRetriever's instruction); requests come from the other inputs.
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
- ours over HTTP: `lorahub serve`'s app (uvicorn, batch window 10 ms), 64 concurrent
  clients posting the 256 requests; latency per request, p50 / p95.
- the base model alone (no adapter, same batches): the ceiling no adapter method can pass.

The baselines get the routes for free (computed once beforehand with the same retrieval);
ours pays for its retrieval. Throughput = requests / generation seconds (models loaded
beforehand). To keep the run near ten minutes on two shared cores, the baselines time a
seeded sample of their work (--sample, default 0.25: random whole groups for (a); for (b)
every fourth of the length-sorted batches of 32 that ours runs, from a seeded offset) and their throughput is the requests
they answered over the time they took; ours answers all 256. Greedy decoding; the random model never emits end-of-sequence, so every
request generates exactly --max-new-tokens tokens. Outputs are compared request by
request: ours-mixture with (a), ours-single with (b). The random model's greedy choice is [PAD]
whatever the adapter, so special tokens are suppressed in every method (outputs then differ by
adapter and input, and equal outputs mean something).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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

BBH = BENCH.parent.parent / "shared" / "data" / "bbh"
CACHE = BENCH / ".cache" / "serve"
CARD_EXAMPLES = 50
K = 3
BATCH = 32
CLIENTS = 64
MAX_INPUT_TOKENS = 512
METHODS = ("ours-mixture", "merge-per-group", "ours-single", "peft-adapter-names", "ours-http", "base-model")


# --- the world: fixture, registry with cards, requests, routes (built once, cached) -------------


def tasks() -> list[str]:
    """The 20 BBH tasks with the shortest inputs (mean 11 to 147 tokens): long-context tasks left out."""
    from fixtures import _tokenizer

    tok, lengths = _tokenizer(), {}
    for path in sorted(BBH.glob("*.json")):
        examples = json.loads(path.read_text())["examples"][:60]
        lengths[path.stem] = sum(len(tok(e["input"])["input_ids"]) for e in examples) / len(examples)
    return sorted(lengths, key=lengths.get)[:20]


def build_world(n_requests: int) -> dict:
    from fixtures import fixture

    from lorahub_cli import retrieval
    from lorahub_cli.io import Example
    from lorahub_cli.registry import Store
    from lorahub_cli.registry.cards import card_from_source
    from lorahub_cli.registry.mirror import add_local
    from lorahub_cli.settings import LORARETRIEVER_INSTRUCTION

    manifest = fixture("base")
    world_file = CACHE / f"world-{n_requests}.json"
    if world_file.exists():
        return json.loads(world_file.read_text())
    home = CACHE / "home"
    store = Store(home)
    names = tasks()
    rng = random.Random(0)
    requests = []
    for i, (task, adapter_dir) in enumerate(zip(names, manifest["adapter_dirs"])):
        examples = json.loads((BBH / f"{task}.json").read_text())["examples"]
        data = CACHE / "data" / f"{task}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps({"input": e["input"], "target": e["target"]}) + "\n" for e in examples[:CARD_EXAMPLES]))
        if store.find(task) is None:
            add_local(store, Path(adapter_dir), name=task)
            card_from_source(store, task, data=data, inputs_only=True, instruction=LORARETRIEVER_INSTRUCTION)
        requests += [(task, e["input"]) for e in examples[CARD_EXAMPLES:]]
    # Evenly over tasks, shuffled so every batch mixes them.
    by_task = defaultdict(list)
    for task, text in requests:
        by_task[task].append(text)
    chosen = [(t, rng.choice(by_task[t])) for t in (names * (n_requests // len(names) + 1))[:n_requests]]
    rng.shuffle(chosen)
    index = retrieval.CardIndex.from_store(store)
    ranked = retrieval.per_input(index, index.embedder(), [Example(text) for _, text in chosen], K)["inputs"]
    world = {"home": str(home), "model_dir": manifest["model_dir"],
             "adapter_dirs": {t: str(store.get(t).path) for t in names},
             "requests": [{"task": t, "input": text, "routes": [r["id"] for r in entry["results"]]}
                          for (t, text), entry in zip(chosen, ranked)]}
    world_file.write_text(json.dumps(world))
    return world


# --- the methods, each run in a worker process -------------------------------------------------


def suppress_special(model, tokenizer) -> None:
    """The random model's greedy choice is [PAD] whatever the adapter, which would make every output empty
    and every comparison of outputs vacuous: special tokens are ruled out, so outputs show the adapters."""
    model.generation_config.suppress_tokens = list(tokenizer.all_special_ids)


def ours(world, mode: str, max_new_tokens: int) -> dict:
    from lorahub_cli.registry import Store
    from lorahub_cli.serve.engine import Engine, Request

    engine = Engine.from_registry(Store(Path(world["home"])), dtype="float32", device="cpu", k=K, compose=mode,
                                  max_new_tokens=max_new_tokens, batch_size=BATCH, max_input_tokens=MAX_INPUT_TOKENS)
    suppress_special(engine.base.model, engine.base.tokenizer)
    texts = [r["input"] for r in world["requests"]]
    engine.run([Request(t) for t in texts[:2]])  # warm-up (first-call allocations)
    start = time.perf_counter()
    answers = engine.run([Request(t) for t in texts])
    return {"seconds": time.perf_counter() - start, "outputs": [a.output for a in answers],
            "routes": [[x["id"] for x in a.route["adapters"]] for a in answers]}


def sample_units(units: list[list[int]], fraction: float) -> list[list[int]]:
    """A seeded random subset of work units covering at least `fraction` of the requests."""
    shuffled = units[:]
    random.Random(0).shuffle(shuffled)
    total, chosen = sum(map(len, units)), []
    while shuffled and sum(map(len, chosen)) < fraction * total:
        chosen.append(shuffled.pop())
    return chosen


def base_model(world, max_new_tokens: int) -> dict:
    from lorahub_cli.generation import generate
    from lorahub_cli.models import load_base_model

    base = load_base_model(world["model_dir"], dtype="float32", device="cpu")
    suppress_special(base.model, base.tokenizer)
    texts = [r["input"] for r in world["requests"]]
    generate(base, texts[:2], max_new_tokens=2)  # warm-up
    start = time.perf_counter()
    outputs = generate(base, texts, max_new_tokens=max_new_tokens, batch_size=BATCH, max_input_length=MAX_INPUT_TOKENS)
    return {"seconds": time.perf_counter() - start, "outputs": outputs}


def merge_per_group(world, max_new_tokens: int, fraction: float) -> dict:
    """LoraRetriever's reference approach, made as fast as it goes: per group of requests with the same
    retrieved set, read the adapters from disk and merge their average delta into the base weights."""
    from safetensors.torch import load_file

    from lorahub_cli.generation import generate
    from lorahub_cli.models import load_base_model

    base = load_base_model(world["model_dir"], dtype="float32", device="cpu")
    suppress_special(base.model, base.tokenizer)
    groups = defaultdict(list)
    for i, r in enumerate(world["requests"]):
        groups[tuple(sorted(r["routes"]))].append(i)
    generate(base, [world["requests"][0]["input"]], max_new_tokens=2)  # warm-up
    outputs = [None] * len(world["requests"])
    chosen = sample_units(list(groups.values()), fraction)
    start = time.perf_counter()
    for rows in chosen:
        ids = tuple(sorted(world["requests"][rows[0]]["routes"]))
        deltas = defaultdict(float)
        for adapter in ids:
            folder = Path(world["adapter_dirs"][adapter])
            config = json.loads((folder / "adapter_config.json").read_text())
            scaling = config["lora_alpha"] / config["r"]
            state = load_file(folder / "adapter_model.safetensors")
            for key, A in state.items():
                if ".lora_A." in key:
                    module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                    B = state[key.replace(".lora_A.", ".lora_B.")]
                    deltas[module] = deltas[module] + (scaling / len(ids)) * (B @ A)  # (d_out, d_in)
        saved = {}
        with torch.no_grad():
            for module, delta in deltas.items():
                weight = base.model.get_submodule(module).weight
                saved[module] = weight.clone()
                weight += delta
        texts = generate(base, [world["requests"][i]["input"] for i in rows], max_new_tokens=max_new_tokens, batch_size=BATCH)
        with torch.no_grad():
            for module, weight in saved.items():
                base.model.get_submodule(module).weight.copy_(weight)
        for i, text in zip(rows, texts):
            outputs[i] = text
    return {"seconds": time.perf_counter() - start, "outputs": outputs, "answered": sum(map(len, chosen)),
            "units": f"{len(chosen)} of {len(groups)} groups"}


def peft_adapter_names(world, max_new_tokens: int, fraction: float) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["model_dir"])
    model = AutoModelForSeq2SeqLM.from_pretrained(world["model_dir"], dtype=torch.float32)
    names = list(world["adapter_dirs"])
    model = PeftModel.from_pretrained(model, world["adapter_dirs"][names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(world["adapter_dirs"][name], adapter_name=name)
    model.eval()
    suppress_special(model.get_base_model(), tok)
    requests = world["requests"]
    order = sorted(range(len(requests)), key=lambda i: -len(tok(requests[i]["input"])["input_ids"]))
    outputs = [None] * len(requests)
    # The batches ours forms (all requests sorted by length, 32 a batch), every step-th from a seeded offset:
    # the sample spans short and long inputs and pads exactly as ours does.
    batches = [order[b:b + BATCH] for b in range(0, len(order), BATCH)]
    step = max(1, round(1 / fraction))
    chosen = batches[random.Random(0).randrange(step)::step]

    def run(rows):
        batch = tok([requests[i]["input"] for i in rows], return_tensors="pt", padding=True, truncation=True,
                    max_length=MAX_INPUT_TOKENS)
        with torch.no_grad():
            out = model.generate(**batch, adapter_names=[requests[i]["routes"][0] for i in rows], do_sample=False,
                                 num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        return tok.batch_decode(out[:, 1:], skip_special_tokens=True)

    run(order[:2])  # warm-up
    start = time.perf_counter()
    for rows in chosen:
        for i, text in zip(rows, run(rows)):
            outputs[i] = text.strip()
    return {"seconds": time.perf_counter() - start, "outputs": outputs, "answered": sum(map(len, chosen)),
            "units": f"{len(chosen)} of {len(batches)} batches"}


def ours_http(world, max_new_tokens: int) -> dict:
    import threading
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    from lorahub_cli.registry import Store
    from lorahub_cli.serve.engine import Engine, Request
    from lorahub_cli.serve.server import create_app

    engine = Engine.from_registry(Store(Path(world["home"])), dtype="float32", device="cpu", k=K, compose="mixture",
                                  max_new_tokens=max_new_tokens, batch_size=BATCH, max_input_tokens=MAX_INPUT_TOKENS)
    suppress_special(engine.base.model, engine.base.tokenizer)
    engine.run([Request(r["input"]) for r in world["requests"][:2]])  # warm-up
    server = uvicorn.Server(uvicorn.Config(create_app(engine, max_batch=BATCH, window=0.01, max_queue=1024),
                                           host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1/generate"

    def post(text):
        begin = time.perf_counter()
        request = urllib.request.Request(url, data=json.dumps({"input": text}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            output = json.loads(response.read())["output"]
        return output, time.perf_counter() - begin

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(post, [r["input"] for r in world["requests"]]))
    seconds = time.perf_counter() - start
    server.should_exit = True
    latencies = sorted(latency for _, latency in results)
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"seconds": seconds, "outputs": [o for o, _ in results], "p50": pick(0.5), "p95": pick(0.95)}


def worker(method: str, world_file: Path, max_new_tokens: int, fraction: float, out: Path) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    world = json.loads(world_file.read_text())
    run = {"ours-mixture": lambda: ours(world, "mixture", max_new_tokens),
           "ours-single": lambda: ours(world, "single", max_new_tokens),
           "merge-per-group": lambda: merge_per_group(world, max_new_tokens, fraction),
           "peft-adapter-names": lambda: peft_adapter_names(world, max_new_tokens, fraction),
           "ours-http": lambda: ours_http(world, max_new_tokens),
           "base-model": lambda: base_model(world, max_new_tokens)}[method]
    result = run()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps(result))


# --- the side-by-side run ----------------------------------------------------------------------


def same(a: list, b: list) -> str:
    """Equal outputs among the requests both answered."""
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return f"{sum(x == y for x, y in both)}/{len(both)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sample", type=float, default=0.25, help="Share of the traffic the baselines answer.")
    parser.add_argument("--reuse", action="store_true", help="Take the results of methods not in --methods from the last run.")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.world, args.max_new_tokens, args.sample, args.out)
    world = build_world(args.requests)
    world_file = CACHE / f"world-{args.requests}.json"
    results = {}
    setting = {"requests": args.requests, "max_new_tokens": args.max_new_tokens, "sample": args.sample}
    for method in METHODS if args.reuse else ():
        cached = CACHE / f"result-{method}.json"
        if method not in args.methods.split(",") and cached.exists():
            result = json.loads(cached.read_text())
            if result.get("setting") == setting:
                results[method] = result
    for method in filter(None, args.methods.split(",")):
        out = CACHE / f"result-{method}.json"
        began = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--worker", method, "--world", str(world_file),
                        "--max-new-tokens", str(args.max_new_tokens), "--sample", str(args.sample), "--out", str(out)],
                       check=True)
        results[method] = r = {**json.loads(out.read_text()), "setting": setting}
        out.write_text(json.dumps(r))
        print(f"{method}: {r['seconds']:.1f} s generating, {time.perf_counter() - began:.1f} s in all, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    # The sampled baselines answer a sample whose inputs may be shorter or longer than the traffic's, and the
    # work is mostly the encoder's, linear in input tokens: the ratios compare input tokens per second.
    from fixtures import _tokenizer

    tok = _tokenizer()
    lengths = [len(tok(r["input"])["input_ids"]) for r in world["requests"]]
    tokens = {m: sum(n for n, o in zip(lengths, r["outputs"]) if o is not None) for m, r in results.items()}
    rate = {m: tokens[m] / r["seconds"] for m, r in results.items()}
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 2 threads; "
          f"load average at the end {load:.1f}")
    print(f"{args.requests} requests over 20 adapters, k = {K}, batch {BATCH}, {args.max_new_tokens} new tokens each (greedy)")
    print("| method | requests answered | input tokens | seconds | requests/s | input tokens/s | p50 / p95 latency (s) | peak RSS (MB) | tokens/s vs its baseline | outputs equal to |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    pairs = {"ours-mixture": "merge-per-group", "ours-single": "peft-adapter-names", "ours-http": "merge-per-group"}
    for method, r in sorted(results.items(), key=lambda item: METHODS.index(item[0])):
        latency = f"{r['p50']:.1f} / {r['p95']:.1f}" if "p50" in r else "–"
        baseline = pairs.get(method)
        ratio = f"{rate[method] / rate[baseline]:.2f}x" if baseline in results else "–"
        equal = f"{same(r['outputs'], results[baseline]['outputs'])} of {baseline}" if baseline in results else "–"
        answered = f"{r['answered']} ({r['units']})" if "units" in r else str(args.requests)
        per_second = r.get("answered", args.requests) / r["seconds"]
        print(f"| {method} | {answered} | {tokens[method]} | {r['seconds']:.1f} | {per_second:.2f} | {rate[method]:.0f} | {latency} "
              f"| {r['peak_rss_mb']:.0f} | {ratio} | {equal} |")


if __name__ == "__main__":
    main()
