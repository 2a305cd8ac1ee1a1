"""From cells to results: per task x method mean +- std over seeds, averages, win/loss, a Markdown
report, a JSON file and a PNG plot.

Scores are percentages. The std is the sample standard deviation over seeds (0 for one seed).
"most frequent" is the score of always giving the test set's most frequent (normalised) target: a
constant answer that any method must beat to have learnt more than the label distribution.
"average" is the mean over tasks; its std is taken over the per-seed averages. "average-3"
leaves out the tasks on which every method scores under 10% (the papers drop three such BBH
tasks), so that tasks nobody solves do not dilute the comparison.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from ..io import atomic_write_bytes, atomic_write_json
from .methods import METHODS
from .scoring import normalize

METRICS = {"exact_match": "exact match", "option_letter": "option letter (secondary)"}
FLOOR = 10.0  # average-3: tasks where every method is under this are left out


def _stats(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 2),
        "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarize(cells: list[dict], metric: str = "exact_match") -> dict:
    """The statistics of a run.

    {"tasks": {task: {method: stats}}, "average": {method: stats}, "average_3": ...,
     "excluded_from_average_3": [...]}"""
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    methods = sorted({c["method"] for c in cells}, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
    seeds = sorted({c["seed"] for c in cells})
    score = {(c["task"], c["seed"], c["method"]): c[metric] for c in cells}
    per_task = {t: {m: _stats([score[t, s, m] for s in seeds if (t, s, m) in score]) for m in methods} for t in tasks}
    excluded = [t for t in tasks if len(tasks) > 1 and all(per_task[t][m]["mean"] < FLOOR for m in methods)]

    def average(over: list[str]) -> dict:
        if not over:
            return {}
        per_seed = {
            m: [statistics.fmean(score[t, s, m] for t in over) for s in seeds if all((t, s, m) in score for t in over)]
            for m in methods
        }
        return {m: _stats(v) for m, v in per_seed.items() if v}

    kept = [t for t in tasks if t not in excluded]
    return {
        "tasks": per_task,
        "average": average(tasks),
        "average_3": average(kept),
        "excluded_from_average_3": excluded,
    }


def most_frequent(cells: list[dict], tasks: dict) -> dict:
    """{"tasks": {task: stats}, "average": stats}: the score of always giving each test set's most frequent
    target, over the seeds' test sets (`tasks`: name -> examples, which the cells' test indices point into)."""
    per_seed = {}
    for c in cells:
        if (c["task"], c["seed"]) not in per_seed:
            counts = Counter(normalize(tasks[c["task"]][i].target) for i in c["test"])
            per_seed[c["task"], c["seed"]] = 100 * counts.most_common(1)[0][1] / len(c["test"])
    names = list(dict.fromkeys(t for t, _ in per_seed))
    seeds = sorted({s for _, s in per_seed})
    return {
        "tasks": {t: _stats([v for (task, _), v in per_seed.items() if task == t]) for t in names},
        "average": _stats(
            [statistics.fmean(per_seed[t, s] for t in names) for s in seeds if all((t, s) in per_seed for t in names)]
        ),
    }


def win_loss(summary: dict) -> dict:
    """For each method against each other: tasks where its mean is higher / lower / equal."""
    tasks = summary["tasks"]
    methods = list(next(iter(tasks.values()))) if tasks else []
    table = {}
    for m in methods:
        for b in methods:
            if m != b:
                diffs = [tasks[t][m]["mean"] - tasks[t][b]["mean"] for t in tasks]
                table[f"{m} vs {b}"] = {
                    "win": sum(d > 0 for d in diffs),
                    "loss": sum(d < 0 for d in diffs),
                    "tie": sum(d == 0 for d in diffs),
                }
    return table


def cost(cells: list[dict]) -> dict:
    """Per method: mean seconds per cell and mean loss evaluations (searches) per cell."""
    methods = list(dict.fromkeys(c["method"] for c in cells))
    return {
        m: {
            "seconds_per_cell": round(statistics.fmean(c["seconds"] for c in cells if c["method"] == m), 2),
            "evaluations_per_cell": round(
                statistics.fmean(c["detail"].get("evaluations", 0) for c in cells if c["method"] == m), 1
            ),
        }
        for m in methods
    }


def _fmt(stats: dict | None) -> str:
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}" if stats else "–"


def _table(summary: dict, frequent: dict | None = None) -> list[str]:
    """One row per task, a column per method, and the most-frequent-answer column last (when known)."""
    methods = list(next(iter(summary["tasks"].values())))
    extra = frequent is not None
    lines = [
        "| task | " + " | ".join(methods) + (" | most frequent" if extra else "") + " |",
        "|---|" + "---:|" * (len(methods) + extra),
    ]
    for task, row in summary["tasks"].items():
        cells = [_fmt(row[m]) for m in methods] + ([_fmt(frequent["tasks"].get(task))] if extra else [])
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    average = [f"**{_fmt(summary['average'].get(m))}**" for m in methods]
    lines.append(
        "| **average** | " + " | ".join(average + ([f"*{_fmt(frequent['average'])}*"] if extra else [])) + " |"
    )
    if summary["excluded_from_average_3"]:
        average_3 = [f"**{_fmt(summary['average_3'].get(m))}**" for m in methods]
        lines.append("| **average-3** | " + " | ".join(average_3 + (["–"] if extra else [])) + " |")
    return lines


def markdown(title: str, setup: dict, cells: list[dict], notes: list[str], frequent: dict | None = None) -> str:
    seeds = sorted({c["seed"] for c in cells})
    lines = [
        f"# {title}",
        "",
        "Settings: " + ", ".join(f"{k} = {v}" for k, v in setup.items() if v is not None) + ".",
        f"Seeds: {', '.join(map(str, seeds))}. Scores are percentages, mean ± sample std over seeds.",
        "",
    ]
    for metric, label in METRICS.items():
        summary = summarize(cells, metric)
        lines += [f"## {label.capitalize()}", ""]
        if metric == "option_letter":
            lines += [
                "For targets of the form (X), the first option the prediction names, as a letter or by its text, is "
                "compared with X; other targets are scored by exact match. Exact match above is the primary metric.",
                "",
            ]
        lines += _table(summary, frequent) + [""]
        if frequent is not None:
            lines += [
                f"Most frequent answer: always giving each test set's most frequent target scores "
                f"{_fmt(frequent['average'])} on average (the last column); a method below it has learnt "
                "less than the label distribution.",
                "",
            ]
        if summary["excluded_from_average_3"]:
            lines += [
                f"average-3 leaves out the tasks where every method scores under {FLOOR:.0f}%: "
                f"{', '.join(summary['excluded_from_average_3'])}.",
                "",
            ]
    summary = summarize(cells)
    lines += [
        "## Wins and losses (exact match, per task mean)",
        "",
        "| method vs baseline | win | loss | tie |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {pair} | {r['win']} | {r['loss']} | {r['tie']} |" for pair, r in win_loss(summary).items()]
    lines += [
        "",
        "## Cost per cell",
        "",
        "| method | seconds per cell | loss evaluations per cell |",
        "|---|---:|---:|",
    ]
    lines += [f"| {m} | {c['seconds_per_cell']} | {c['evaluations_per_cell']} |" for m, c in cost(cells).items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "![Exact match per task and method](plot.png)", ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """Per-task bars by method (exact match, mean over seeds with the std as error bars)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"]) + ["average"]
    methods = list(next(iter(summary["tasks"].values())))
    rows = {**summary["tasks"], "average": summary["average"]}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(tasks) * max(1, len(methods) / 3)), 4.5))
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(
            xs, [rows[t][m]["mean"] for t in tasks], width, yerr=[rows[t][m]["std"] for t in tasks], label=m, capsize=2
        )
    ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncols=min(len(methods), 6))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def write_report(
    out: Path, title: str, setup: dict, cells: list[dict], notes: list[str], tasks: dict | None = None
) -> dict:
    """results.json, report.md and plot.png in `out`; returns the summary `--json` prints.

    `tasks` (name -> examples, the suite's): adds the most-frequent-answer line."""
    summary = summarize(cells)
    frequent = most_frequent(cells, tasks) if tasks is not None and cells else None
    results = {
        **summary,
        "most_frequent": frequent,
        "option_letter": summarize(cells, "option_letter"),
        "win_loss": win_loss(summary),
        "cost": cost(cells),
        "settings": setup,
        "notes": notes,
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "report.md", markdown(title, setup, cells, notes, frequent).encode("utf-8"))
    plot(summary, out / "plot.png")
    return {"tasks": summary["tasks"], "average": summary["average"], "most_frequent": frequent}
