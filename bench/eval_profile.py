"""Where one loss evaluation spends its time: `python bench/eval_profile.py [--shape base] [--population 1]`.

Runs lorahub's bank on the benchmark fixture (20 adapters, 5 shots) under torch.profiler and prints
the operators by self CPU time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import fixture  # noqa: E402

from lorahub_cli.compose.pipeline import ComposeOptions, _Session, load_modules  # noqa: E402
from lorahub_cli.compose.search import SearchConfig  # noqa: E402
from lorahub_cli.io import read_examples  # noqa: E402
from lorahub_cli.registry import Store  # noqa: E402
from lorahub_cli.registry.mirror import add_local  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="base")
    parser.add_argument("--population", type=int, default=1)
    parser.add_argument("--search-precision", default="fp32", help="auto, fp32, bf16 or int8")
    args = parser.parse_args()
    manifest = fixture(args.shape)
    with tempfile.TemporaryDirectory() as home:
        store = Store(Path(home))
        records = [add_local(store, Path(d), name=f"m{i:02d}").record for i, d in enumerate(manifest["adapter_dirs"])]
        options = ComposeOptions(
            model_path=manifest["model_dir"],
            device="cpu",
            search=SearchConfig(optimizer="ngopt", precision=args.search_precision),
        )
        session = _Session(load_modules(store, records), read_examples(manifest["shots_jsonl"]), options)
        W = torch.full((args.population, len(records)), 0.1)
        with torch.no_grad():
            session.loss_fn(W)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                session.loss_fn(W)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
