"""How well weight cards find the right adapter, against data cards, on a demo library folder.

    python bench/retrieval_weights.py [--library registry/demo] [--seeds 1,2,3] [--shots 5] [--json OUT]

Nothing is written into the library: each adapter's weight card is built in memory (and once to a temporary
folder, for its size). Queries:
- held-out: each held-out task's shots (eval.tasks.split, per seed); a hit is a reused skill (the manifest's
  `skills`) at rank 1 / within the top 3. Scored with the shots' targets (as `retrieve --shots` would) and,
  for the weight cards, with the inputs alone (as a request is).
- upstream: `--shots` examples of each upstream task's own data per seed; a hit is that task's adapter.
Weight-card scorers (lorahub_cli/spectral/scores.py): arrow|spectr x tokens|rms|rms/DIRECTIONS|centroid, each
divided by its score on the random-token background ("/bg") and raw. Data cards: the task-level cosine of
`lorahub retrieve --shots`. "both:X": the sum of each adapter's z-scores under the data card and under X
(z over the library, per query).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lorahub_cli import retrieval
from lorahub_cli.cards.card import Card
from lorahub_cli.compose.adapters import load_adapter
from lorahub_cli.demo import library
from lorahub_cli.eval.tasks import split
from lorahub_cli.io import read_examples, sha256_file
from lorahub_cli.models import load_base_model
from lorahub_cli.spectral import scores
from lorahub_cli.spectral.card import WEIGHT_CARD, adapter_weights_file, build_weight_card

SCORERS = [
    scores.Scorer(method, pool, directions)
    for method in scores.METHODS
    for pool, directions in (("tokens", None), ("rms", None), ("rms", 16), ("centroid", None))
]


def build_index(root: Path) -> tuple[scores.WeightIndex, dict]:
    entries, costs = {}, []
    folders = sorted((root / library.ADAPTERS_DIR).iterdir())
    with tempfile.TemporaryDirectory() as tmp:
        for folder in folders:
            start = time.perf_counter()
            adapter = load_adapter(folder, folder.name)
            card = build_weight_card(adapter, sha256_file(adapter_weights_file(folder)))
            seconds = time.perf_counter() - start
            card.save(Path(tmp))
            spectra = card.spectra(adapter)
            entries[folder.name] = {m: (spectra[m], card.sigma[row]) for row, m in enumerate(card.modules)}
            size, adapter_size = (Path(tmp) / WEIGHT_CARD).stat().st_size, adapter_weights_file(folder).stat().st_size
            costs.append({"adapter": folder.name, "seconds": seconds, "bytes": size, "adapter_bytes": adapter_size})
    summary = {
        "adapters": len(costs),
        "median_build_seconds": statistics.median(c["seconds"] for c in costs),
        "max_build_seconds": max(c["seconds"] for c in costs),
        "card_bytes": costs[0]["bytes"],
        "adapter_bytes": costs[0]["adapter_bytes"],
        "ratio": costs[0]["bytes"] / costs[0]["adapter_bytes"],
    }
    return scores.WeightIndex.from_spectra(entries), summary


def zscore(values: torch.Tensor) -> torch.Tensor:
    return (values - values.mean()) / values.std().clamp_min(1e-12)


class Scorer:
    def __init__(self, root: Path, background_seed: int):
        self.root = root
        self.index, self.cost = build_index(root)
        self.base = load_base_model(str(library.base_model_path(root)), dtype="float32", device="cpu")
        cards = {f.name: Card.load(f, f.name) for f in sorted((root / library.ADAPTERS_DIR).iterdir())}
        self.cards = retrieval.CardIndex.from_cards(cards, library.BASE_MODEL)
        self.embedder = self.cards.embedder()
        assert self.cards.ids == self.index.ids
        self.forward_seconds, self.rank_seconds = [], []
        start = time.perf_counter()
        self.backgrounds = {
            (scorer, with_targets): scores.background(self.index, self.base, scorer, with_targets, background_seed)
            for scorer in SCORERS
            for with_targets in (True, False)
        }
        self.background_seconds = time.perf_counter() - start

    def data(self, shots) -> torch.Tensor:
        query = retrieval.normalise(retrieval._embed(self.cards, self.embedder, shots, True).mean(0, keepdim=True))
        return (query @ self.cards.matrix.T)[0]

    def weights(self, shots, with_targets: bool) -> dict[str, torch.Tensor]:
        examples = shots if with_targets else [type(s)(s.input) for s in shots]
        start = time.perf_counter()
        inputs = scores.capture_layer_inputs(self.base, examples, self.index.modules).merged()
        self.forward_seconds.append(time.perf_counter() - start)
        out = {}
        for scorer in SCORERS:
            start = time.perf_counter()
            raw = scores.score(self.index, inputs, scorer)[0]
            self.rank_seconds.append(time.perf_counter() - start)
            out[scorer.name + "/bg"] = raw / self.backgrounds[(scorer, with_targets)]
            if with_targets:
                out[scorer.name] = raw
        return out


def hits(ids: list[str], values: torch.Tensor, wanted: set[str]) -> tuple[bool, bool, list[str]]:
    order = [ids[i] for i in torch.argsort(values, descending=True).tolist()]
    return order[0] in wanted, bool(wanted & set(order[:3])), order[:3]


def run(root: Path, seeds: list[int], n_shots: int, background_seed: int = 0) -> dict:
    scorer = Scorer(root, background_seed)
    ids = scorer.index.ids
    rows = []
    for kind, tasks in (("held-out", library.heldout_tasks(root)), ("upstream", library.upstream_tasks(root))):
        for task in tasks:
            if kind == "held-out":
                examples, wanted = library.heldout_examples(task["name"], root), set(task["skills"])
            else:
                examples = read_examples(root / library.DATA_DIR / f"{task['name']}.jsonl")
                wanted = {task["name"]}
            for seed in seeds:
                shot_ids, _ = split(examples, seed, n_shots)
                shots = [examples[i] for i in shot_ids]
                data = scorer.data(shots)
                rankings = {"data": data}
                for with_targets in (True, False):
                    suffix = "" if with_targets else "/inputs"
                    for name, values in scorer.weights(shots, with_targets).items():
                        rankings[name + suffix] = values
                        if with_targets and name.endswith("/bg"):
                            rankings[f"both:{name}"] = zscore(data) + zscore(values)
                for name, values in rankings.items():
                    top1, top3, order = hits(ids, values, wanted)
                    rows.append(
                        {"kind": kind, "task": task["name"], "seed": seed, "scorer": name, "top1": top1, "top3": top3}
                        | {"top": order}
                    )
    table = {}
    for kind in ("held-out", "upstream"):
        for name in dict.fromkeys(r["scorer"] for r in rows):
            chosen = [r for r in rows if r["kind"] == kind and r["scorer"] == name]
            tasks_top3 = {}
            for r in chosen:
                tasks_top3.setdefault(r["task"], []).append(r["top3"])
            table.setdefault(name, {})[kind] = {
                "top1": sum(r["top1"] for r in chosen) / len(chosen),
                "top3": sum(r["top3"] for r in chosen) / len(chosen),
                # a task counts when a wanted adapter is in the top 3 for the majority of its seeds
                "tasks_top3": sum(statistics.mean(v) > 0.5 for v in tasks_top3.values()),
                "tasks": len(tasks_top3),
            }
    return {
        "library": str(root),
        "seeds": seeds,
        "shots": n_shots,
        "background_seed": background_seed,
        "card_cost": scorer.cost,
        "background_seconds_all_scorers": scorer.background_seconds,
        "median_forward_seconds": statistics.median(scorer.forward_seconds),
        "median_rank_seconds_20_adapters": statistics.median(scorer.rank_seconds),
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
    parser.add_argument("--background-seed", type=int, default=0, help="the random-token background's draw")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the full result (every query's top 3) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.library, [int(s) for s in args.seeds.split(",")], args.shots, args.background_seed)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    cost = result["card_cost"]
    print(
        f"library {result['library']}: {cost['adapters']} adapters; background seed {args.background_seed}; "
        f"load {result['machine']['load']}"
    )
    print(
        f"weight card: {cost['card_bytes']} B vs adapter {cost['adapter_bytes']} B ({100 * cost['ratio']:.2f}%); "
        f"build median {1000 * cost['median_build_seconds']:.1f} ms, max {1000 * cost['max_build_seconds']:.1f} ms"
    )
    print(
        f"forward pass over the shots, median {1000 * result['median_forward_seconds']:.1f} ms; "
        f"one score of 20 adapters, median {1000 * result['median_rank_seconds_20_adapters']:.2f} ms"
    )
    print(f"backgrounds (every scorer, with and without targets): {result['background_seconds_all_scorers']:.1f} s")
    print("\n| scorer | held-out top-1 | held-out top-3 | tasks (top-3, majority of seeds) | upstream top-1 | top-3 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, kinds in result["table"].items():
        h, u = kinds["held-out"], kinds["upstream"]
        print(
            f"| {name} | {h['top1']:.2f} | {h['top3']:.2f} | {h['tasks_top3']}/{h['tasks']} | "
            f"{u['top1']:.2f} | {u['top3']:.2f} |"
        )


if __name__ == "__main__":
    main()
