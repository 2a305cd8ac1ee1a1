"""Markdown tables for docs/benchmarks.md from bench/compose.py results: `python bench/report.py RESULT.json…`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compose import summarize  # noqa: E402


def _reach(run: dict) -> str:
    return f"{run['time_to_reference_objective']:.1f}" if run["time_to_reference_objective"] else "not reached"


def _cpu(seconds: float | None) -> str:
    return f"{seconds:.1f}" if seconds else "–"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value else "–"


def _load(values: list[float]) -> str:
    return f"{values[0]:.1f}"


def _spread(summary: dict, key: str) -> str:
    s = summary.get(key) or {}
    return f"{s['median']:.2f} ({s['worst']:.2f})" if s.get("median") else "–"


def table(result: dict) -> str:
    machine = result["machine"]
    configs = list(dict.fromkeys(c for row in result["rows"] for c in row["ours"]))
    lines = [
        f"### {result['shape']} shape, budget {result['budget']}: {len(result['rows'])} fixture seeds",
        "",
        f"CPU: {machine['cpu']}; flags: {' '.join(machine['flags'])}; {machine['cores']} cores.",
        "",
        "| seed (BBH task) | run | precision | end to end (s) | CPU (s) | evaluations (stop) | true objective "
        "| to the reference's objective (s) "
        "| speedup end to end (CPU) | speedup to its objective (CPU) | peak RSS (MB) | load avg before / after |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in result["rows"]:
        ref = row["reference"]
        lines.append(
            f"| {row['fixture_seed']} ({row['bbh_task']}) | reference 0.1.0 | fp32 | {ref['seconds_total']:.1f} | "
            f"{_cpu(ref.get('cpu_seconds_total'))} | {ref['evaluations']} | {ref['true_objective']:.2f} | "
            f"{ref['seconds_total']:.1f} | 1.00 | 1.00 | "
            f"{ref['peak_rss_mb']:.0f} | {_load(ref['loadavg_before'])} / {_load(ref['loadavg_after'])} |"
        )
        for config in configs:
            run = row["ours"].get(config)
            if run is None:
                continue
            to_objective = (
                f"{run['speedup_to_reference_objective']:.2f}" if run["speedup_to_reference_objective"] else "–"
            )
            lines.append(
                f"| | `{config}` ({run['engine']}) | {run['search_precision']} | {run['seconds_total']:.1f} | "
                f"{_cpu(run.get('cpu_seconds_total'))} | {run['evaluations']} ({run.get('stop', 'budget')}) | "
                f"{run['true_objective']:.2f} | {_reach(run)} | "
                f"{run['speedup_end_to_end']:.2f} ({_ratio(run.get('cpu_speedup_end_to_end'))}) | "
                f"{to_objective} ({_ratio(run.get('cpu_speedup_to_reference_objective'))}) | "
                f"{run['peak_rss_mb']:.0f} | "
                f"{_load(run['loadavg_before'])} / {_load(run['loadavg_after'])} |"
            )
    # A run stopped before its last seed has rows but no summary yet.
    summary = result.get("summary") or summarize(result["rows"], configs)
    lines += [
        "",
        "| run | speedup end to end, median (worst) | CPU, median (worst) "
        "| speedup to the reference's objective, median (worst) | CPU, median (worst) "
        "| true objective no worse than the reference | worst relative gap "
        "| peak memory / reference's, median (worst) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for config in configs:
        s = summary.get(config)
        if not s:
            continue
        lines.append(
            f"| `{config}` | {_spread(s, 'speedup_end_to_end')} | {_spread(s, 'cpu_speedup_end_to_end')} | "
            f"{_spread(s, 'speedup_to_reference_objective')} | {_spread(s, 'cpu_speedup_to_reference_objective')} | "
            f"{s['objective_no_worse_than_reference']} of {s['runs']} | "
            f"{s['worst_relative_objective_vs_reference']:+.1%} | "
            f"{s['memory_vs_reference']['median']:.2f} ({s['memory_vs_reference']['worst']:.2f}) |"
        )
    for key, gap in summary.items():
        if key.endswith("_vs_fp32_relative_gap"):
            values = ", ".join(f"{g:+.1%}" for g in gap["values"])
            lines.append(
                f"\n`{key.removesuffix('_vs_fp32_relative_gap')}` against the same optimiser searching in fp32, "
                f"true objective relative gap per seed: {values}; "
                f"worse by more than 1% on {gap['worse_by_more_than_1pct']} seed(s)."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(json.loads(Path(path).read_text())))
