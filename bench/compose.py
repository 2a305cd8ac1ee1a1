"""Side by side: `lorahub compose` against the reference LoraHub (PyPI lorahub 0.1.0), over several fixtures.

    python bench/compose.py --shape base --fixture-seeds 0,1,2,3,4 [--budget 40] [--configs default,fp32,ngopt]
    python bench/compose.py --shape large --fixture-seeds 0,1

For every fixture seed (a different random model, 20 adapters and BBH task: bench/fixtures.py), the reference
runs first (bench/reference.py, its own venv, its own process), then each of our configurations, each in a
fresh process of this python, so end-to-end time and peak memory (ru_maxrss, read before any scoring) are
whole-process numbers on both sides. Every returned weight vector is scored by one independent rule,
fixtures.true_objective (the weights applied to the adapters on disk, fp32, mean token CE + 0.05 mean|w|).
The time to the reference's true objective re-scores our best-so-far weights the same way, at each
improvement, until one reaches it; to that moment is added what our run spent after its search (fp32
re-scoring, export), so it is the time a run stopped there would have taken. The load average is recorded
before and after every run: the machine may be shared. Results: one JSON per run under
bench/.cache/results/, and a summary (median and worst ratios) printed and written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
RESULTS = BENCH / ".cache" / "results"

# Our configurations: name -> (optimizer or None for the default, search precision)
CONFIGS = {
    "default": (None, "auto"),
    "lbfgs": ("lbfgs", "auto"),
    "lbfgs-fp32": ("lbfgs", "fp32"),
    "lbfgs-bf16": ("lbfgs", "bf16"),
    "ngopt": ("ngopt", "auto"),
    "ngopt-fp32": ("ngopt", "fp32"),
    "ngopt-bf16": ("ngopt", "bf16"),
    "ngopt-int8": ("ngopt", "int8"),
}
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    try:
        present = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in FLAGS if f in present]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- one run of ours, in its own process -------------------------------------------------------


def run_ours(shape: str, fixture_seed: int, config: str, budget: int, out: Path, threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from fixtures import Scorer, fixture

    from lorahub_cli.compose import search as search_module
    from lorahub_cli.compose.pipeline import ComposeOptions, compose_task
    from lorahub_cli.compose.search import SearchConfig
    from lorahub_cli.io import read_examples, sha256_file
    from lorahub_cli.registry import Store
    from lorahub_cli.registry.mirror import add_local

    manifest = fixture(shape, seed=fixture_seed)
    optimizer, precision = CONFIGS[config]
    # Instrumentation only: remember every evaluated weight vector and when (the recipe keeps no weights per step).
    evaluated: list[tuple[float, list[float]]] = []
    record = search_module._Tracker.record

    def recording(self, W, losses):
        objectives = record(self, W, losses)
        now = time.perf_counter()
        evaluated.extend((now, w) for w in W.detach().double().tolist())
        return objectives

    search_module._Tracker.record = recording
    with tempfile.TemporaryDirectory() as home:
        store = Store(Path(home))
        ids = [add_local(store, Path(d), name=f"m{i:02d}").id for i, d in enumerate(manifest["adapter_dirs"])]
        shots = read_examples(manifest["shots_jsonl"])
        meta = {"path": manifest["shots_jsonl"], "sha256": sha256_file(manifest["shots_jsonl"]), "count": len(shots)}
        config_kwargs = {"budget": budget, "seed": 1, "precision": precision} | (
            {"optimizer": optimizer} if optimizer else {}
        )
        options = ComposeOptions(
            modules=ids, model_path=manifest["model_dir"], device="cpu", search=SearchConfig(**config_kwargs)
        )
        loadavg_before = list(os.getloadavg())
        start = time.perf_counter()
        composition = compose_task(store, shots, meta, options)
        total = time.perf_counter() - start
        loadavg_after = list(os.getloadavg())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result, recipe = composition.results[0], composition.recipe
    after_search = total - (evaluated[-1][0] - start) if evaluated else 0.0
    # Re-stamp every evaluation from the start of compose_task; the best-so-far by the search's own objective.
    curve = [
        {"evaluation": i + 1, "t": t - start, "search_objective": point["objective"], "weights": w}
        for i, ((t, w), point) in enumerate(zip(evaluated, result.curve))
    ]
    ours = {
        "config": config,
        "optimizer": recipe.search["optimizer"],
        "engine": result.engine,
        "search_precision": recipe.search["precision_used"],
        "seconds_total": total,
        "seconds_search": result.seconds,
        "seconds_after_search": after_search,
        "evaluations": result.evaluations,
        "loss_fp32": recipe.loss,
        "objective_fp32": recipe.objective,
        "weights": [m["weight"] for m in recipe.modules],
        "peak_rss_mb": peak,
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg_after,
        "threads": torch.get_num_threads(),
    }
    scorer = Scorer(manifest["model_dir"], manifest["adapter_dirs"], manifest["shots_jsonl"])
    ours["true_objective"] = scorer.score(ours["weights"])["objective"]
    out.write_text(json.dumps({"ours": ours, "curve": curve}) + "\n")
    print(
        f"  ours {config}: {total:.1f} s, {result.evaluations} evals, true objective {ours['true_objective']:.4f}, "
        f"peak {peak:.0f} MB",
        file=sys.stderr,
    )


def time_to_objective(run_path: Path, manifest: dict, target: float) -> tuple[float | None, int]:
    """When our best-so-far weights (by the search's objective) first have a true objective <= target."""
    from fixtures import Scorer

    data = json.loads(run_path.read_text())
    best, improvements = float("inf"), []
    for point in data["curve"]:
        if point["search_objective"] < best:
            best = point["search_objective"]
            improvements.append(point)
    final = data["ours"]["true_objective"]
    if final > target + 1e-9 and all(p["weights"] != data["ours"]["weights"] for p in improvements):
        return None, 0
    scorer = Scorer(manifest["model_dir"], manifest["adapter_dirs"], manifest["shots_jsonl"])
    for scored, point in enumerate(improvements, 1):
        if scorer.score(point["weights"])["objective"] <= target + 1e-9:
            return point["t"] + data["ours"]["seconds_after_search"], scored
    return (data["ours"]["seconds_total"], len(improvements)) if final <= target + 1e-9 else (None, len(improvements))


# --- the driver ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="base")
    parser.add_argument("--fixture-seeds", default="0,1,2,3,4")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument(
        "--configs",
        default="lbfgs,lbfgs-fp32,ngopt",
        help="comma-separated; NAME@1+2 runs NAME on fixture seeds 1 and 2 only",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--reuse-reference",
        action="store_true",
        help="reuse a seed's reference result from an earlier run at the same budget (bench/.cache/results)",
    )
    parser.add_argument("--one", nargs=2, metavar=("FIXTURE_SEED", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--run-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_ours(args.shape, int(args.one[0]), args.one[1], args.budget, args.run_out, args.threads)
        return

    from fixtures import fixture

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"compose-{args.shape}.json"
    configs = {
        name: {int(x) for x in seeds.split("+")} if seeds else None
        for name, _, seeds in (c.partition("@") for c in args.configs.split(","))
    }
    machine = {"cpu": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count()}
    print(f"CPU: {machine['cpu']}; flags: {' '.join(machine['flags'])}", file=sys.stderr)
    rows = []
    for seed in map(int, args.fixture_seeds.split(",")):
        manifest = fixture(args.shape, seed=seed)
        ref_out = RESULTS / f"ref-{args.shape}-s{seed}.json"
        print(f"fixture {args.shape} seed {seed} ({manifest['bbh_task']}): reference", file=sys.stderr)
        reuse = (
            args.reuse_reference and ref_out.is_file() and json.loads(ref_out.read_text()).get("budget") == args.budget
        )
        if not reuse:
            subprocess.run(
                [
                    sys.executable,
                    str(BENCH / "reference.py"),
                    "--shape",
                    args.shape,
                    "--budget",
                    str(args.budget),
                    "--seed",
                    "1",
                    "--fixture-seed",
                    str(seed),
                    "--threads",
                    str(args.threads),
                    "--out",
                    str(ref_out),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        reference = json.loads(ref_out.read_text())
        target = reference["true_objective"]
        print(
            f"  reference: {reference['seconds_total']:.1f} s, true objective {target:.4f}, "
            f"peak {reference['peak_rss_mb']:.0f} MB",
            file=sys.stderr,
        )
        row = {
            "fixture_seed": seed,
            "bbh_task": manifest["bbh_task"],
            "reference": {
                k: reference[k]
                for k in (
                    "seconds_total",
                    "evaluations",
                    "true_objective",
                    "peak_rss_mb",
                    "loadavg_before",
                    "loadavg_after",
                )
            },
            "ours": {},
        }
        for config in (c for c, only in configs.items() if only is None or seed in only):
            run_out = RESULTS / f"ours-{args.shape}-s{seed}-{config}.json"
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--shape",
                    args.shape,
                    "--budget",
                    str(args.budget),
                    "--threads",
                    str(args.threads),
                    "--one",
                    str(seed),
                    config,
                    "--run-out",
                    str(run_out),
                ],
                check=True,
            )
            ours = json.loads(run_out.read_text())["ours"]
            reach, scored = time_to_objective(run_out, manifest, target)
            ours |= {
                "time_to_reference_objective": reach,
                "points_scored": scored,
                "speedup_end_to_end": reference["seconds_total"] / ours["seconds_total"],
                "speedup_to_reference_objective": reference["seconds_total"] / reach if reach else None,
                "objective_vs_reference": ours["true_objective"] - target,
                "memory_vs_reference": ours["peak_rss_mb"] / reference["peak_rss_mb"],
            }
            row["ours"][config] = {k: v for k, v in ours.items() if k != "weights"}
        rows.append(row)
        out.write_text(
            json.dumps({"machine": machine, "shape": args.shape, "budget": args.budget, "rows": rows}, indent=2) + "\n"
        )
    summary = summarize(rows, list(configs))
    report = {"machine": machine, "shape": args.shape, "budget": args.budget, "rows": rows, "summary": summary}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"machine": machine, "summary": summary}, indent=2))


def summarize(rows: list[dict], configs: list[str]) -> dict:
    summary = {}
    for config in configs:
        runs = [row["ours"][config] for row in rows if config in row["ours"]]
        speed = [r["speedup_end_to_end"] for r in runs]
        reach = [r["speedup_to_reference_objective"] or 0.0 for r in runs]  # never reached: 0
        memory = [r["memory_vs_reference"] for r in runs]
        summary[config] = {
            "speedup_end_to_end": {"median": statistics.median(speed), "worst": min(speed)},
            "speedup_to_reference_objective": {"median": statistics.median(reach), "worst": min(reach)},
            "objective_no_worse_than_reference": sum(r["objective_vs_reference"] <= 1e-9 for r in runs),
            "runs": len(runs),
            "memory_vs_reference": {"median": statistics.median(memory), "worst": max(memory)},
        }
    for config in configs:
        # Target (c): a cheaper search precision against fp32 with the same optimiser on the same seed (an `auto`
        # run counts as the precision it resolved to).
        gaps = []
        for row in rows:
            run = row["ours"].get(config)
            if run is None or run["search_precision"] == "fp32":
                continue
            fp32 = [
                r
                for r in row["ours"].values()
                if r["optimizer"] == run["optimizer"] and r["search_precision"] == "fp32"
            ]
            if fp32:
                gaps.append((run["true_objective"] - fp32[0]["true_objective"]) / abs(fp32[0]["true_objective"]))
        if gaps:
            summary[f"{config}_vs_fp32_relative_gap"] = {
                "values": gaps,
                "worse_by_more_than_1pct": sum(g > 0.01 for g in gaps),
            }
    return summary


if __name__ == "__main__":
    main()
