"""Start-up of the demo's next commands (`retrieve`, `compose`, `generate --adapter`), two source trees side by side.

    python bench/startup.py --home DEMO_HOME --tree before=/tmp/old-tree --tree after=. --repeats 5

DEMO_HOME is a folder `lorahub demo --home DEMO_HOME` made. Each command runs in a fresh interpreter with
PYTHONPATH set to the tree, on CPU core `--core` (taskset), the trees alternating run by run so that the
machine's load falls on both alike; wall seconds and CPU seconds (user + system, from the child's rusage)
are reported as medians with the after/before ratio. `--importtime` adds, per command and tree, the seconds
`python -X importtime` counts for the top-level imports and for each heavy library.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "retrieve": ["retrieve", "--shots", "shots.jsonl", "-k", "5"],
    "compose": ["compose", "--shots", "shots.jsonl", "-n", "5", "--out", "{out}"],
    "generate": ["generate", "--adapter", "{adapter}", "--inputs", "inputs.jsonl"],
}
HEAVY = ("torch", "transformers", "sentence_transformers", "sklearn", "peft", "nevergrad", "fastapi")


def task_folder(home: Path) -> Path:
    (task,) = [p for p in (home / "tasks").iterdir() if p.is_dir()]
    return task


def command(name: str, home: Path, out: Path) -> list[str]:
    adapter = str(next((home / "compositions").iterdir()))
    return [a.format(out=out, adapter=adapter) for a in COMMANDS[name]]


def run(tree: Path, args: list[str], home: Path, core: int, extra: list[str] = ()) -> tuple[float, float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "LORAHUB_HOME": str(home / "registry"), "COLUMNS": "80"}
    start = time.perf_counter()
    process = subprocess.Popen(
        ["taskset", "-c", str(core), sys.executable, *extra, "-m", "lorahub_cli", *args],
        cwd=task_folder(home),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args[0]} failed in {tree}:\n{stderr[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, stderr


def import_seconds(stderr: str) -> dict[str, float]:
    """Top-level imports' total and each heavy library's cumulative seconds, from -X importtime's lines."""
    found = {"all imports": 0.0}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if not cumulative.strip().isdigit():
            continue
        seconds, indent = int(cumulative) / 1e6, len(name) - len(name.lstrip()) - 1
        if indent == 0:
            found["all imports"] += seconds
        if name.strip() in HEAVY and name.strip() not in found:
            found[name.strip()] = seconds
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH, twice (before, after)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--core", type=int, default=1)
    parser.add_argument("--importtime", action="store_true")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    print(f"load average before: {os.getloadavg()}")
    times = {(c, t): [] for c in COMMANDS for t in trees}
    with tempfile.TemporaryDirectory(prefix="lorahub-startup-") as tmp:
        for repeat in range(args.repeats):
            for name in COMMANDS:
                for tree_name, tree in trees.items():
                    out = Path(tmp) / f"{name}-{tree_name}-{repeat}"
                    wall, cpu, _ = run(Path(tree).resolve(), command(name, args.home, out), args.home, args.core)
                    times[name, tree_name].append((wall, cpu))
        first, second = list(trees)
        print(f"| command | {first} wall s | {second} wall s | ratio | {first} CPU s | {second} CPU s | ratio |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name in COMMANDS:
            a, b = times[name, first], times[name, second]
            wa, wb = (statistics.median(w for w, _ in x) for x in (a, b))
            ca, cb = (statistics.median(c for _, c in x) for x in (a, b))
            print(f"| {name} | {wa:.2f} | {wb:.2f} | {wb / wa:.2f} | {ca:.2f} | {cb:.2f} | {cb / ca:.2f} |")
        if args.importtime:
            for name in COMMANDS:
                for tree_name, tree in trees.items():
                    out = Path(tmp) / f"{name}-{tree_name}-importtime"
                    cmd = command(name, args.home, out)
                    *_, stderr = run(Path(tree).resolve(), cmd, args.home, args.core, ["-X", "importtime"])
                    shown = ", ".join(f"{k} {v:.2f}" for k, v in import_seconds(stderr).items())
                    print(f"{name} ({tree_name}), import seconds: {shown}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
