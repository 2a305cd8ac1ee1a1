"""Ray's overhead on one machine: `lorahub eval demo` locally and with --ray, back to back.

    python bench/scale.py [--seeds 1] [--tasks all] [--rounds 1] [--probe] [--out bench/.cache/scale]

Each configuration runs as its own `lorahub eval demo` process into a fresh run folder, in the order of
--configs: local (one torch thread, the demo's setting), `--ray --workers 2` and `--ray --workers 1` (one
thread per worker). Prints
one JSON line per run: wall seconds, the cells' own compute seconds (as each cell records them), the load
average before and after, and whether every cell's predictions equal the local run's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"local": [], "ray-2x1": ["--ray", "--workers", "2"], "ray-1x1": ["--ray", "--workers", "1"]}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_flags() -> str:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags)


def cells(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in sorted(out.glob("cells/*/seed-*/*.json"))}


def run(name: str, args: argparse.Namespace, folder: Path) -> dict:
    out = folder / name
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "lorahub_cli",
        "eval",
        "demo",
        "--seeds",
        args.seeds,
        "--tasks",
        args.tasks,
        "--out",
        str(out),
        "--json",
        *CONFIGS[name],
    ]
    before = loadavg()
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    found = cells(out)
    return {
        "config": name,
        "wall_s": round(wall, 1),
        "cells": len(found),
        "cell_compute_s": round(sum(c["seconds"] for c in found.values()), 1),
        "load_before": before,
        "load_after": loadavg(),
    }


def probe(calls: int = 200) -> dict:
    """Ray's fixed and per-cell costs in isolation: starting a local Ray, starting one worker (imports and
    the demo model), and the round trip of an empty call to it (what every cell pays on top of its work)."""
    import ray

    from lorahub_cli.demo import library
    from lorahub_cli.eval.methods import EvalConfig
    from lorahub_cli.scale.eval import EvalWorker

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init = time.perf_counter() - start
    config = EvalConfig(
        base_model=library.BASE_MODEL, model_path=str(library.base_model_path()), dtype="float32", device="cpu"
    )
    start = time.perf_counter()
    actor = ray.remote(EvalWorker).options(num_cpus=1).remote(config, None, None, 1)
    ray.get(actor.setup.remote())
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(calls):
        ray.get(actor.__ray_ready__.remote())
    trip = (time.perf_counter() - start) / calls
    ray.shutdown()
    return {
        "probe": "ray",
        "init_s": round(init, 2),
        "worker_start_s": round(setup, 2),
        "round_trip_ms": round(1000 * trip, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("bench/.cache/scale"))
    parser.add_argument(
        "--probe", action="store_true", help="Also time Ray's start, a worker's start and a round trip."
    )
    args = parser.parse_args()
    print(json.dumps({"cpu_flags": cpu_flags(), "command": " ".join(sys.argv)}), flush=True)
    if args.probe:
        print(json.dumps({"load_before": loadavg(), **probe(), "load_after": loadavg()}), flush=True)
    for round_ in range(args.rounds):
        results, found = [], {}
        for name in filter(None, args.configs.split(",")):
            results.append(run(name, args, args.out))
            found[name] = {k: {f: v for f, v in c.items() if f != "seconds"} for k, c in cells(args.out / name).items()}
        for result in results:
            if result["config"] != "local" and "local" in found:
                result["same_cells_as_local"] = found[result["config"]] == found["local"]
            print(json.dumps({"round": round_ + 1, **result}), flush=True)


if __name__ == "__main__":
    main()
