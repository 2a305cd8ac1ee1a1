"""How well the registry finds the right adapter of a demo library by data cards, by weight cards and by both.

    python bench/retrieval_weights.py [--library registry/demo] [--seeds 1,2,3] [--shots 5] [--json OUT]

Three scratch registries are made from the library's adapters with `api.add` (what `lorahub registry add` runs):
- weights: every adapter added without data (its folder copied without its data card): weight cards only;
- data:    every adapter with its data card (the library's, as `lorahub demo` mirrors them);
- half:    the data card on every other adapter (sorted ids), none on the others: a registry of both kinds.
Card cost: every add timed with its weight card and without (a registry with no card builder), alternating
which runs first; the card's bytes against the adapter's weights file.
Queries: the task level of `lorahub retrieve --shots` with its defaults (api.retriever_of, the command's code):
- held-out: each held-out task's shots per seed (eval.tasks.split); a hit is a skill the task reuses (the
  manifest's `skills`) at rank 1 / in the top 3; a task counts when hit in the top 3 for most seeds;
- upstream: --shots examples of each upstream task's own data per seed; a hit is that task's own adapter.
Rankings: data (--by data on `data`), weights (--by auto on `weights`, i.e. weight cards alone), auto on `half`
(data cosines and weight scores, each standardised over its own adapters), and both (on `data`: the sum of each
adapter's z-scores under --by data and --by weights, z over the library per query); and, as routed serving
ranks a request, data and weights on the first shot's input alone (no target); and the two stages a registry
above 256 adapters runs, with a shortlist of --shortlist (default 4 of the 12): the first stage's recall.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lorahub_cli import api
from lorahub_cli.demo import library
from lorahub_cli.eval.tasks import split
from lorahub_cli.io import Example, read_examples
from lorahub_cli.models import load_base_model
from lorahub_cli.registry import Store
from lorahub_cli.registry.store import CONFIG_FILE, SAFETENSORS_FILE, WEIGHT_CARD
from lorahub_cli.spectral import card as _card  # noqa: F401  (imported here: an add times the card, not imports)


def add_all(root: Path, work: Path) -> tuple[dict[str, Store], dict]:
    """The three registries, and the card's cost at add."""
    folders = sorted((root / library.ADAPTERS_DIR).iterdir())
    bare = work / "bare"
    stores = {kind: Store(work / kind, weight_card=api._weight_card) for kind in ("weights", "data", "half")}
    plain = Store(work / "plain")  # the same adds without a weight card: what the card costs
    seconds, without, sizes = [], [], []
    for i, folder in enumerate(folders):
        copy = bare / folder.name
        copy.mkdir(parents=True)
        for name in (CONFIG_FILE, SAFETENSORS_FILE):
            shutil.copy2(folder / name, copy / name)
        name = library.adapter_id(folder.name)
        for with_card in (i % 2 == 0, i % 2 == 1):  # alternate which runs first
            store = stores["weights"] if with_card else plain
            start = time.perf_counter()
            api.add(str(copy), name=name, base_model=library.BASE_MODEL, store=store)
            (seconds if with_card else without).append(time.perf_counter() - start)
        api.add(str(folder), name=name, base_model=library.BASE_MODEL, store=stores["data"])
        api.add(str(folder if i % 2 == 0 else copy), name=name, base_model=library.BASE_MODEL, store=stores["half"])
        record = stores["weights"].get(name)
        sizes.append(((record.path / WEIGHT_CARD).stat().st_size, (record.path / SAFETENSORS_FILE).stat().st_size))
    extra = [a - b for a, b in zip(seconds, without)]
    cost = {
        "adapters": len(folders),
        "add_seconds_median": statistics.median(seconds),
        "add_seconds_without_card_median": statistics.median(without),
        "card_seconds_median": statistics.median(extra),
        "card_seconds_max": max(extra),
        "card_bytes": sizes[0][0],
        "adapter_bytes": sizes[0][1],
        "ratio_max": max(c / a for c, a in sizes),
    }
    return stores, cost


def zscore(values: torch.Tensor) -> torch.Tensor:
    return (values - values.mean()) / values.std(unbiased=False).clamp_min(1e-12)


def scores_of(retriever, shots, n: int) -> dict[str, float]:
    return {m.id: m.score for m in retriever.task(shots, n).results}


def run(root: Path, seeds: list[int], n_shots: int, shortlist: int = 4) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    try:
        stores, cost = add_all(root, work)
        base = load_base_model(str(library.base_model_path(root)), dtype="float32", device="cpu")
        retrievers = {
            "data": api.retriever_of(stores["data"], "data", base=base),
            "weights": api.retriever_of(stores["weights"], "auto", base=base),
            "auto (half the data cards)": api.retriever_of(stores["half"], "auto", base=base),
            "weights of `data`": api.retriever_of(stores["data"], "weights", base=base),
        }
        # the two stages of a large registry, on this small one: a shortlist of `shortlist` adapters
        small = f"weights, two stages (shortlist {shortlist})"
        retrievers[small] = api.retriever_of(stores["weights"], "auto", base=base)
        retrievers[small].weights.shortlist = shortlist
        kinds = {name: r.kind for name, r in retrievers.items()}
        n = cost["adapters"]
        rows, seconds = [], []
        for kind, tasks in (("held-out", library.heldout_tasks(root)), ("upstream", library.upstream_tasks(root))):
            for task in tasks:
                if kind == "held-out":
                    examples = library.heldout_examples(task["name"], root)
                    wanted = {library.adapter_id(s) for s in task["skills"]}
                else:
                    examples = read_examples(root / library.DATA_DIR / f"{task['name']}.jsonl")
                    wanted = {library.adapter_id(task["name"])}
                for seed in seeds:
                    shots = [examples[i] for i in split(examples, seed, n_shots)[0]]
                    found = {}
                    for name, retriever in retrievers.items():
                        start = time.perf_counter()
                        found[name] = scores_of(retriever, shots, n)
                        if name == "weights":
                            seconds.append(time.perf_counter() - start)
                    for name in ("data", "weights"):  # one request: the first shot's input alone, as routed serving
                        request = [Example(shots[0].input)]
                        ranked = retrievers[name].per_input(request, n).inputs[0]
                        found[f"{name}, one request's input"] = {m.id: m.score for m in ranked}
                    ids = sorted(found["data"])
                    both = zscore(torch.tensor([found["data"][i] for i in ids])) + zscore(
                        torch.tensor([found["weights of `data`"][i] for i in ids])
                    )
                    found["both (z-sum)"] = dict(zip(ids, both.tolist()))
                    del found["weights of `data`"]
                    for name, values in found.items():
                        order = sorted(values, key=lambda i: -values[i])
                        rows.append(
                            {
                                "kind": kind,
                                "task": task["name"],
                                "seed": seed,
                                "ranking": name,
                                "top1": order[0] in wanted,
                                "top3": bool(wanted & set(order[:3])),
                                "top": order[:3],
                            }
                        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = {}
    for name in dict.fromkeys(r["ranking"] for r in rows):
        for kind in ("held-out", "upstream"):
            chosen = [r for r in rows if r["kind"] == kind and r["ranking"] == name]
            per_task = {}
            for r in chosen:
                per_task.setdefault(r["task"], []).append(r["top3"])
            table.setdefault(name, {})[kind] = {
                "top1": sum(r["top1"] for r in chosen) / len(chosen),
                "top3": sum(r["top3"] for r in chosen) / len(chosen),
                "tasks_top3": sum(statistics.mean(v) > 0.5 for v in per_task.values()),
                "tasks": len(per_task),
            }
    return {
        "library": str(root),
        "seeds": seeds,
        "shots": n_shots,
        "card_cost": cost,
        "kinds": kinds,
        "weights_query_seconds_median": statistics.median(seconds),
        "table": table,
        "rows": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "load": os.getloadavg()},
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", type=Path, default=library.demo_dir())
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shortlist", type=int, default=4, help="the two-stage row's shortlist size")
    parser.add_argument("--json", type=Path, help="write the full result (every query's top 3) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    result = run(args.library, [int(s) for s in args.seeds.split(",")], args.shots, args.shortlist)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    cost = result["card_cost"]
    print(f"library {result['library']}: {cost['adapters']} adapters; load {load} -> {result['machine']['load']}")
    print(
        f"weight card: {cost['card_bytes']} B vs adapter {cost['adapter_bytes']} B "
        f"({100 * cost['card_bytes'] / cost['adapter_bytes']:.2f}%, at most {100 * cost['ratio_max']:.2f}%); "
        f"registry add median {1000 * cost['add_seconds_median']:.0f} ms with the card, "
        f"{1000 * cost['add_seconds_without_card_median']:.0f} ms without: the card adds median "
        f"{1000 * cost['card_seconds_median']:.0f} ms, max {1000 * cost['card_seconds_max']:.0f} ms"
    )
    print(
        f"one weights query (forward pass and ranking), median {1000 * result['weights_query_seconds_median']:.0f} ms"
    )
    print(f"what ranked: {result['kinds']}")
    print(
        "\n| ranking | held-out top-1 | held-out top-3 | held-out tasks (top-3, most seeds) | upstream top-1 | top-3 |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, kinds in result["table"].items():
        h, u = kinds["held-out"], kinds["upstream"]
        print(
            f"| {name} | {h['top1']:.2f} | {h['top3']:.2f} | {h['tasks_top3']} of {h['tasks']} | "
            f"{u['top1']:.2f} | {u['top3']:.2f} |"
        )


if __name__ == "__main__":
    main()
