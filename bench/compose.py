"""Side by side: `lorahub compose` against the reference LoraHub (PyPI lorahub 0.1.0) on one fixture.

    python bench/compose.py --shape base [--budget 40] [--out bench/.cache/results/compose-base.json]

Same random model, same 20 adapters (r=16, alpha=32, q and v, non-zero B), same 5 BBH shots
(bench/fixtures.py). The reference runs first, in its own venv (bench/reference.py); then ours, in this
process, once per optimiser. Every returned weight vector is scored with the same independent rule,
fixtures.true_objective (the weights applied to the adapters on disk, mean token CE + 0.05 mean|w|).
Reported: wall time of the whole compose call (model and module loading included), evaluations, time per
evaluation, the true objective, the time to reach the reference's true objective, the objective curve,
and achieved FLOP/s (FLOPs of one evaluation counted by torch's FlopCounterMode) against a measured
matmul peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from fixtures import fixture, true_objective  # noqa: E402

from lorahub_cli.compose.pipeline import ComposeOptions, compose_task  # noqa: E402
from lorahub_cli.compose.search import SearchConfig  # noqa: E402
from lorahub_cli.io import read_examples, sha256_file  # noqa: E402
from lorahub_cli.registry import Store  # noqa: E402
from lorahub_cli.registry.mirror import add_local  # noqa: E402


def matmul_peak(dtype=torch.float32, n=2048, repeats=10) -> float:
    """FLOP/s of a large square matrix product on this machine: the ceiling for any implementation."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def eval_flops(store: Store, ids: list[str], manifest: dict) -> float:
    """FLOPs of one loss evaluation of our bank (one candidate x 5 shots)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lorahub_cli.compose.pipeline import _Session, load_modules

    shots = read_examples(manifest["shots_jsonl"])
    options = ComposeOptions(model_path=manifest["model_dir"], dtype="float32", device="cpu")
    session = _Session(load_modules(store, [store.get(i) for i in ids]), shots, options)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        session.loss_fn(torch.full((1, len(ids)), 0.1))
    return float(counter.get_total_flops())


def run_ours(store: Store, ids: list[str], manifest: dict, optimizer: str, budget: int, population: int) -> dict:
    shots = read_examples(manifest["shots_jsonl"])
    meta = {"path": manifest["shots_jsonl"], "sha256": sha256_file(manifest["shots_jsonl"]), "count": len(shots)}
    options = ComposeOptions(modules=ids, model_path=manifest["model_dir"], dtype="float32", device="cpu",
                             search=SearchConfig(optimizer=optimizer, budget=budget, seed=1, population=population))
    marks = []
    start = time.perf_counter()
    composition = compose_task(store, shots, meta, options, progress=lambda best: marks.append((time.perf_counter() - start, best)))
    total = time.perf_counter() - start
    result = composition.results[0]
    return {"optimizer": optimizer, "engine": result.engine, "seconds_total": total, "evaluations": result.evaluations,
            "seconds_per_eval": result.seconds / result.evaluations, "seconds_search": result.seconds,
            "seconds_setup": marks[0][0] - result.curve[0]["seconds"], "reported_objective": result.objective,
            "weights": result.weights, "curve": [{"t": t, "best": b} for t, b in marks]}


def time_to_reach(curve: list[dict], target: float, key: str = "best") -> float | None:
    return next((point["t"] for point in curve if point[key] <= target + 1e-9), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="base")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--optimizers", default="ngopt,adam,cma")
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--reference-json", type=Path, help="reuse a reference result instead of running it")
    args = parser.parse_args()
    out = args.out or BENCH / ".cache" / "results" / f"compose-{args.shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = fixture(args.shape)

    if args.reference_json:
        reference = json.loads(args.reference_json.read_text())
    else:
        ref_out = out.with_name(f"ref-{args.shape}.json")
        subprocess.run([sys.executable, str(BENCH / "reference.py"), "--shape", args.shape, "--budget", str(args.budget),
                        "--seed", "1", "--out", str(ref_out)], check=True)
        reference = json.loads(ref_out.read_text())
    target = reference["true_objective"]

    with tempfile.TemporaryDirectory() as home:
        store = Store(Path(home))
        ids = [add_local(store, Path(d), name=f"m{i:02d}").id for i, d in enumerate(manifest["adapter_dirs"])]
        ours = []
        for optimizer in args.optimizers.split(","):
            run = run_ours(store, ids, manifest, optimizer, args.budget, args.population)
            run["true_objective"] = true_objective(manifest["model_dir"], manifest["adapter_dirs"], run["weights"], manifest["shots_jsonl"])
            run["time_to_reference_objective"] = time_to_reach(run["curve"], target)
            ours.append(run)
            print(f"{optimizer}: {run['seconds_total']:.1f} s, {run['evaluations']} evals, "
                  f"{run['seconds_per_eval']:.3f} s/eval, true objective {run['true_objective']:.4f} "
                  f"(reference {target:.4f}), reached it at {run['time_to_reference_objective']}", file=sys.stderr)
        flops = eval_flops(store, ids, manifest)
    peak = matmul_peak()
    ref_curve = [{"t": p["t"], "best": min(q["loss"] for q in reference["curve"][: i + 1])} for i, p in enumerate(reference["curve"])]
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "shape": args.shape, "budget": args.budget, "reference": {k: reference[k] for k in (
            "seconds_total", "seconds_per_eval", "evaluations", "true_objective", "reported_best", "optimizer")},
        "reference_curve": ref_curve, "ours": ours, "flops_per_eval": flops, "matmul_peak_flops": peak,
    }
    for run in ours:
        run["speedup_end_to_end"] = reference["seconds_total"] / run["seconds_total"]
        run["speedup_to_reference_objective"] = (reference["seconds_total"] / run["time_to_reference_objective"]
                                                 if run["time_to_reference_objective"] else None)
        run["achieved_flops"] = flops / run["seconds_per_eval"] * (3 if run["optimizer"] == "adam" else 1)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("reference_curve",)} | {
        "ours": [{k: v for k, v in r.items() if k not in ("curve", "weights")} for r in ours]}, indent=2))


if __name__ == "__main__":
    main()
