"""What a search evaluation costs in each precision on this machine, and how faithfully it ranks candidates.

    python bench/precision.py --shape base [--fixture-seed 0] [--candidates 12]

On one fixture (bench/fixtures.py): the base model in fp32 and its search copies (precision.py: bf16;
int8 by torch.ao dynamic quantisation; int8 by torchao's Int8DynamicActivationInt8WeightConfig when torchao
is installed), each with the 20 adapters' bank in fp32. Per precision: the median time of one evaluation
(one candidate x the 5 shots, no gradient) and of one gradient evaluation, and over `--candidates` random
weight vectors the Spearman rank correlation and mean relative error of the losses against fp32. Prints
the CPU flags. This is the evidence behind `--search-precision auto` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from compose import cpu_flags, cpu_model  # noqa: E402
from fixtures import fixture  # noqa: E402

from lorahub_cli.compose.adapters import load_adapter  # noqa: E402
from lorahub_cli.compose.bank import LoraBank  # noqa: E402
from lorahub_cli.compose.objective import FewShotLoss  # noqa: E402
from lorahub_cli.compose.precision import search_model  # noqa: E402
from lorahub_cli.io import read_examples  # noqa: E402
from lorahub_cli.models import encode, load_base_model  # noqa: E402


def torchao_int8(answer, keep):
    """torchao's int8 dynamic-activation int8-weight quantisation of the same layers, on a copy."""
    from torch import nn
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = copy.deepcopy(answer.model)
    quantize_(
        model,
        Int8DynamicActivationInt8WeightConfig(),
        filter_fn=lambda m, fqn: type(m) is nn.Linear and fqn not in keep,
    )
    return type(answer)(model.eval(), answer.tokenizer, answer.is_seq2seq, answer.device, torch.float32, answer.name)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def spearman(a: list[float], b: list[float]) -> float:
    rank = lambda v: {i: r for r, i in enumerate(sorted(range(len(v)), key=v.__getitem__))}  # noqa: E731
    ra, rb = rank(a), rank(b)
    n = len(a)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="base")
    parser.add_argument("--fixture-seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16,int8,int8-torchao")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = fixture(args.shape, seed=args.fixture_seed)
    answer = load_base_model(manifest["model_dir"], dtype="float32", device="cpu")
    adapters = [load_adapter(d) for d in manifest["adapter_dirs"]]
    keep = set(adapters[0].modules)
    batch = encode(answer, read_examples(manifest["shots_jsonl"]))
    W = torch.rand(args.candidates, len(adapters), generator=torch.Generator().manual_seed(0)) * 1.0 - 0.5
    report = {
        "machine": {"cpu": cpu_model(), "flags": cpu_flags(), "threads": torch.get_num_threads()},
        "shape": args.shape,
        "fixture_seed": args.fixture_seed,
        "loadavg_before": list(os.getloadavg()),
        "precisions": {},
    }
    reference = None
    for name in args.precisions.split(","):
        try:
            model = torchao_int8(answer, keep) if name == "int8-torchao" else search_model(answer, name, keep)
        except ImportError as error:
            report["precisions"][name] = {"error": str(error)}
            continue
        bank = LoraBank(model.model, adapters, lora_dtype=torch.float32)
        loss_fn = FewShotLoss(model, bank, batch, mode="elementwise")
        with torch.no_grad():
            losses = [float(x) for x in loss_fn(W)]
            seconds = timed(lambda f=loss_fn: f(W[:1]), args.repeats)
        entry = {"seconds_per_eval": seconds}

        def gradient(loss_fn=loss_fn):
            w = W[0].clone().requires_grad_(True)
            loss_fn(w[None])[0].backward()

        try:
            entry["seconds_per_gradient_eval"] = timed(gradient, args.repeats)
        except RuntimeError as error:
            entry["seconds_per_gradient_eval"] = None
            entry["gradient_error"] = str(error).splitlines()[0][:200]
        if reference is None:
            reference = losses
        entry["spearman_vs_fp32"] = spearman(losses, reference)
        entry["mean_relative_error_vs_fp32"] = statistics.mean(abs(a - b) / abs(b) for a, b in zip(losses, reference))
        entry["loss_spread_vs_fp32"] = (max(reference) - min(reference)) / statistics.mean(reference)
        bank.remove()
        report["precisions"][name] = entry
        print(name, json.dumps(entry), file=sys.stderr)
        del model, bank, loss_fn
    report["loadavg_after"] = list(os.getloadavg())
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
