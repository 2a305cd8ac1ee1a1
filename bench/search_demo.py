"""The searches on trained modules: `ngopt` against `subspace` on the shipped demo library's held-out tasks.

    PYTHONPATH=. python bench/search_demo.py [--seeds 1,2,3] [--optimizers ngopt,subspace]

bench/compose.py measures the searches on fixtures of random adapters; here the modules are the demo library's
trained skills, retrieved for each held-out task's 5 shots (the demo's split, per seed), one thread. Prints one
row per (task, seed): each optimizer's fp32 objective (the recipe's), evaluations and CPU seconds, and the
ratio of each objective to the first optimizer's; then the median and worst ratio and how often it was lower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from compose import cpu_flags, cpu_model  # bench/compose.py, beside this file

from lorahub_cli import api
from lorahub_cli.compose.pipeline import ComposeOptions
from lorahub_cli.compose.search import SearchConfig
from lorahub_cli.demo import library, tour
from lorahub_cli.models import torch_threads
from lorahub_cli.registry import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--optimizers", default="ngopt,subspace")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    first, *others = args.optimizers.split(",")
    print(f"{cpu_model()}; CPU flags: {' '.join(cpu_flags())}")
    root = Path(tempfile.mkdtemp(prefix="lorahub-search-demo-"))
    store = Store(root / "registry")
    library.mirror(store)
    ratios: dict[str, list[float]] = {o: [] for o in others}
    print(f"| task | seed | {' | '.join(f'{o} objective (evals, CPU s)' for o in [first, *others])} | ratios |")
    print("| --- | ---: |" + " ---: |" * (len(others) + 2))
    with torch_threads(1):
        for task in [t["name"] for t in library.heldout_tasks()]:
            for seed in seeds:
                few, _ = tour.task_split(task, seed, 5)
                shots = root / f"{task}-{seed}.jsonl"
                shots.write_text("".join(json.dumps({"input": e.input, "output": e.target}) + "\n" for e in few))
                runs = {}
                for optimizer in [first, *others]:
                    out, start = root / f"{task}-{seed}-{optimizer}", time.process_time()
                    options = ComposeOptions(num_modules=5, search=SearchConfig(optimizer=optimizer, seed=seed))
                    summary = api.compose(shots, out, options, store=store)
                    objective = json.loads((out / "lorahub_recipe.json").read_text())["objective"]
                    runs[optimizer] = (objective, summary["evaluations"], time.process_time() - start)
                for o in others:
                    ratios[o].append(runs[o][0] / runs[first][0])
                cells = " | ".join(f"{v[0]:.4f} ({v[1]}, {v[2]:.1f})" for v in runs.values())
                print(f"| {task} | {seed} | {cells} | {', '.join(f'{r[-1]:.2f}' for r in ratios.values())} |")
    for o, r in ratios.items():
        lower = sum(x < 1 for x in r)
        print(
            f"{o} / {first} objective: median {statistics.median(r):.2f}x, worst {max(r):.2f}x, "
            f"lower on {lower} of {len(r)}"
        )


if __name__ == "__main__":
    main()
