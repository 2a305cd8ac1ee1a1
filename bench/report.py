"""Markdown tables for docs/benchmarks.md from bench/compose.py results: `python bench/report.py RESULT.json…`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHECKPOINTS = (5, 10, 20, 40, 60, 90, 120, 180)


def best_at(curve: list[dict], t: float) -> str:
    seen = [p["best"] for p in curve if p["t"] <= t]
    return f"{min(seen):.1f}" if seen else "–"


def table(result: dict) -> str:
    ref = result["reference"]
    peak = result["matmul_peak_flops"]
    lines = [
        f"### {result['shape']} shape (budget {result['budget']}, fp32, {result['machine']['threads']} threads)",
        "",
        "| run | end to end (s) | evaluations | s / evaluation | true objective | time to reach the reference's true objective (s) | speedup end to end | speedup to the reference's objective | matmul FLOP/s (share of peak) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| reference lorahub 0.1.0 ({ref['optimizer']}) | {ref['seconds_total']:.1f} | {ref['evaluations']} | {ref['seconds_per_eval']:.3f} | "
        f"{ref['true_objective']:.2f} (its own best: {ref['reported_best']:.2f}) | {ref['seconds_total']:.1f} | 1.00 | 1.00 | "
        f"{result['flops_per_eval'] / ref['seconds_per_eval'] / 1e9:.0f} G ({result['flops_per_eval'] / ref['seconds_per_eval'] / peak:.0%}) |",
    ]
    for run in result["ours"]:
        reach = run["time_to_reference_objective"]
        reach_text = f"{reach:.1f}" if reach else "not reached"
        speedup_text = f"{run['speedup_to_reference_objective']:.2f}" if reach else "–"
        lines.append(
            f"| lorahub `--optimizer {run['optimizer']}` ({run['engine']}) | {run['seconds_total']:.1f} | {run['evaluations']} | "
            f"{run['seconds_per_eval']:.3f} | {run['true_objective']:.2f} | {reach_text} | "
            f"{run['speedup_end_to_end']:.2f} | {speedup_text} | "
            f"{run['achieved_flops'] / 1e9:.0f} G ({run['achieved_flops'] / peak:.0%}) |"
        )
    lines += ["", f"One evaluation (5 shots, one candidate) is {result['flops_per_eval'] / 1e9:.1f} GFLOP (torch FlopCounterMode); "
              f"measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s (2048 x 2048 x 2048). FLOP/s = FLOPs of one evaluation / "
              "time per evaluation; an Adam step is counted as 3 forward passes (forward + backward).", "",
              "Best objective reached by time t (seconds since the compose call started):", "",
              "| run | " + " | ".join(f"t={t}" for t in CHECKPOINTS) + " |", "| --- |" + " ---: |" * len(CHECKPOINTS)]
    lines.append("| reference | " + " | ".join(best_at(result["reference_curve"], t) for t in CHECKPOINTS) + " |")
    for run in result["ours"]:
        lines.append(f"| {run['optimizer']} | " + " | ".join(best_at(run["curve"], t) for t in CHECKPOINTS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(json.loads(Path(path).read_text())))
