"""Side by side: `lorahub compose` against the reference LoraHub (PyPI lorahub 0.1.0), over several fixtures.

    python bench/compose.py --shape base --fixture-seeds 0,1,2,3,4 [--budget 40] [--configs subspace,ngopt] --threads 1
    python bench/compose.py --shape large --fixture-seeds 0,1 --threads 1

For every fixture seed (a different random model, 20 adapters and BBH task: bench/fixtures.py), the reference
runs first (bench/reference.py, its own venv, its own process), then each of our configurations, each in a
fresh process of this python, so end-to-end time and peak memory (ru_maxrss, read before any scoring) are
whole-process numbers on both sides. Every returned weight vector is scored by one independent rule,
fixtures.true_objective (the weights applied to the adapters on disk, fp32, mean token CE + 0.05 mean|w|).
The time to the reference's true objective re-scores our best-so-far weights the same way, at each
improvement, until one reaches it; to that moment is added what our run spent after its search (fp32
re-scoring, export), so it is the time a run stopped there would have taken. The load average is recorded
before and after every run: the machine may be shared, so both clocks are kept, wall and the process's CPU
seconds (which other load does not inflate). Results: one JSON per run under
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
    "subspace": ("subspace", "auto"),
    "subspace-fp32": ("subspace", "fp32"),
    "subspace-bf16": ("subspace", "bf16"),
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


def run_ours(
    shape: str, fixture_seed: int, config: str, budget: int, out: Path, threads: int, settings: list[str]
) -> None:
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
    optimizer, precision = CONFIGS[config.partition("+")[0]]
    for setting in settings:  # a lever measured: NAME=VALUE sets a constant of lorahub_cli.compose.search
        name, _, value = setting.partition("=")
        setattr(search_module, name, type(getattr(search_module, name))(float(value)))
    # Instrumentation only: remember every evaluated weight vector and when (the recipe keeps no weights per step).
    evaluated: list[tuple[float, list[float]]] = []
    record = search_module._Tracker.record

    def recording(self, W, losses):
        objectives = record(self, W, losses)
        now, cpu = time.perf_counter(), time.process_time()
        evaluated.extend((now, cpu, self.precision, w) for w in W.detach().double().tolist())
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
        start, cpu_start = time.perf_counter(), time.process_time()
        composition = compose_task(store, shots, meta, options)
        total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
        loadavg_after = list(os.getloadavg())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result, recipe = composition.results[0], composition.recipe
    after_search = total - (evaluated[-1][0] - start) if evaluated else 0.0
    cpu_after_search = cpu_total - (evaluated[-1][1] - cpu_start) if evaluated else 0.0
    # Re-stamp every evaluation from the start of compose_task (wall and this process's CPU seconds).
    curve = [
        {
            "evaluation": i + 1,
            "t": t - start,
            "cpu": cpu - cpu_start,
            "precision": precision_of,
            "search_objective": point["objective"],
            "weights": w,
        }
        for i, ((t, cpu, precision_of, w), point) in enumerate(zip(evaluated, result.curve))
    ]
    ours = {
        "config": config,
        "optimizer": recipe.search["optimizer"],
        "engine": result.engine,
        "search_precision": recipe.search["precision_used"],
        "settings": settings,
        "seconds_total": total,
        "cpu_seconds_total": cpu_total,
        "seconds_search": result.seconds,
        "seconds_after_search": after_search,
        "cpu_seconds_after_search": cpu_after_search,
        "evaluations": result.evaluations,
        "stop": result.stop,
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
        f"  ours {config}: {total:.1f} s ({cpu_total:.1f} s CPU), {result.evaluations} evals ({result.stop}), "
        f"true objective {ours['true_objective']:.4f}, peak {peak:.0f} MB",
        file=sys.stderr,
    )


def time_to_objective(run_path: Path, manifest: dict, target: float) -> dict:
    """When our best-so-far weights (by the search's objective, per precision) first have a true objective <= target:
    wall and CPU seconds since compose_task started, plus what the run spent after its search; a point evaluated
    in another precision than fp32 also pays one fp32 evaluation (a run stopped there must score its answer in
    fp32). None when never reached."""
    from fixtures import Scorer

    data = json.loads(run_path.read_text())
    curve, ours = data["curve"], data["ours"]
    fp32 = [(b["t"] - a["t"], b["cpu"] - a["cpu"]) for a, b in zip(curve, curve[1:]) if b["precision"] == "fp32"]
    one_fp32 = (statistics.median(x for x, _ in fp32), statistics.median(c for _, c in fp32)) if fp32 else (0.0, 0.0)
    best, improvements = {}, []
    for point in curve:
        if point["search_objective"] < best.get(point["precision"], float("inf")):
            best[point["precision"]] = point["search_objective"]
            improvements.append(point)
    unreached = {"seconds": None, "cpu_seconds": None, "points_scored": len(improvements)}
    if ours["true_objective"] > target + 1e-9 and all(p["weights"] != ours["weights"] for p in improvements):
        return unreached | {"points_scored": 0}
    scorer = Scorer(manifest["model_dir"], manifest["adapter_dirs"], manifest["shots_jsonl"])
    for scored, point in enumerate(improvements, 1):
        if scorer.score(point["weights"])["objective"] <= target + 1e-9:
            extra = (0.0, 0.0) if point["precision"] == "fp32" else one_fp32
            return {
                "seconds": point["t"] + ours["seconds_after_search"] + extra[0],
                "cpu_seconds": point["cpu"] + ours["cpu_seconds_after_search"] + extra[1],
                "points_scored": scored,
            }
    if ours["true_objective"] <= target + 1e-9:
        return {
            "seconds": ours["seconds_total"],
            "cpu_seconds": ours["cpu_seconds_total"],
            "points_scored": len(improvements),
        }
    return unreached


# --- the driver ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="base")
    parser.add_argument("--fixture-seeds", default="0,1,2,3,4")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument(
        "--configs",
        default="subspace,ngopt",
        help="comma-separated; NAME@1+2 runs NAME on fixture seeds 1 and 2 only; NAME+CONST=VALUE runs NAME with "
        "a constant of lorahub_cli.compose.search set (a lever measured)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--reuse-reference",
        action="store_true",
        help="reuse a seed's reference result from an earlier run at the same budget (bench/.cache/results)",
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="our configurations only (side by side with each other)"
    )
    parser.add_argument("--one", nargs=2, metavar=("FIXTURE_SEED", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--run-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        config, *settings = args.one[1].split("+")
        run_ours(args.shape, int(args.one[0]), config, args.budget, args.run_out, args.threads, settings)
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
        reference = None if args.no_reference else run_reference(args, seed, ref_out)
        row = {
            "fixture_seed": seed,
            "bbh_task": manifest["bbh_task"],
            "reference": reference and {k: reference.get(k) for k in REFERENCE_FIELDS},
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
            if reference is not None:
                ours |= against(reference, ours, time_to_objective(run_out, manifest, reference["true_objective"]))
            row["ours"][config] = {k: v for k, v in ours.items() if k != "weights"}
        rows.append(row)
        out.write_text(
            json.dumps({"machine": machine, "shape": args.shape, "budget": args.budget, "rows": rows}, indent=2) + "\n"
        )
    summary = summarize(rows, list(configs))
    report = {"machine": machine, "shape": args.shape, "budget": args.budget, "rows": rows, "summary": summary}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"machine": machine, "summary": summary}, indent=2))


REFERENCE_FIELDS = (
    "seconds_total",
    "cpu_seconds_total",
    "evaluations",
    "true_objective",
    "peak_rss_mb",
    "loadavg_before",
    "loadavg_after",
)


def run_reference(args, seed: int, ref_out: Path) -> dict:
    """The reference on one fixture seed, in its own venv and process (or its earlier result, --reuse-reference)."""
    reuse = args.reuse_reference and ref_out.is_file() and json.loads(ref_out.read_text()).get("budget") == args.budget
    if not reuse:
        command = [sys.executable, str(BENCH / "reference.py"), "--shape", args.shape, "--budget", str(args.budget)]
        command += ["--seed", "1", "--fixture-seed", str(seed), "--threads", str(args.threads), "--out", str(ref_out)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    reference = json.loads(ref_out.read_text())
    print(
        f"  reference: {reference['seconds_total']:.1f} s ({reference.get('cpu_seconds_total') or 0:.1f} s CPU), "
        f"true objective {reference['true_objective']:.4f}, peak {reference['peak_rss_mb']:.0f} MB",
        file=sys.stderr,
    )
    return reference


def against(reference: dict, ours: dict, reach: dict) -> dict:
    """Our run against the reference's: speed-ups on both clocks (CPU: this process's CPU seconds, which the
    machine's other load does not count), the objective gap, the memory ratio."""

    def ratio(a, b):
        return a / b if a and b else None

    cpu = reference.get("cpu_seconds_total")
    return {
        "time_to_reference_objective": reach["seconds"],
        "cpu_time_to_reference_objective": reach["cpu_seconds"],
        "points_scored": reach["points_scored"],
        "speedup_end_to_end": ratio(reference["seconds_total"], ours["seconds_total"]),
        "cpu_speedup_end_to_end": ratio(cpu, ours["cpu_seconds_total"]),
        "speedup_to_reference_objective": ratio(reference["seconds_total"], reach["seconds"]),
        "cpu_speedup_to_reference_objective": ratio(cpu, reach["cpu_seconds"]),
        "objective_vs_reference": ours["true_objective"] - reference["true_objective"],
        "relative_objective_vs_reference": (ours["true_objective"] - reference["true_objective"])
        / abs(reference["true_objective"]),
        "memory_vs_reference": ours["peak_rss_mb"] / reference["peak_rss_mb"],
    }


def _spread(runs: list[dict], key: str, worst=min) -> dict:
    values = [r[key] or 0.0 for r in runs]  # never reached (or no CPU time recorded): 0
    return {"median": statistics.median(values), "worst": worst(values)}


def summarize(rows: list[dict], configs: list[str]) -> dict:
    summary = {}
    for config in configs:
        runs = [row["ours"][config] for row in rows if config in row["ours"]]
        if not runs or "speedup_end_to_end" not in runs[0]:
            summary[config] = {"runs": len(runs)}
            continue

        summary[config] = {
            "speedup_end_to_end": _spread(runs, "speedup_end_to_end"),
            "cpu_speedup_end_to_end": _spread(runs, "cpu_speedup_end_to_end"),
            "speedup_to_reference_objective": _spread(runs, "speedup_to_reference_objective"),
            "cpu_speedup_to_reference_objective": _spread(runs, "cpu_speedup_to_reference_objective"),
            "objective_no_worse_than_reference": sum(r["objective_vs_reference"] <= 1e-9 for r in runs),
            "worst_relative_objective_vs_reference": max(r["relative_objective_vs_reference"] for r in runs),
            "runs": len(runs),
            "memory_vs_reference": _spread(runs, "memory_vs_reference", max),
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
