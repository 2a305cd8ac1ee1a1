"""Does torch.compile of the frozen base model pay for a compose search? Compile time against seconds saved per
evaluation, on a random flan-t5-base-shaped model with 20 random LoRA modules in a bank (no download, no fixture:
everything is built in memory), CPU or CUDA.

    python bench/compile.py --device cpu --threads 1                  # this machine
    python bench/compile.py --device cuda                             # on a GPU (fp32; add --dtypes fp32,bf16)

One evaluation is what a search does per candidate: the 5 shots (BBH-sized inputs, 5 target tokens each) through
the model with the bank composing one weight vector, a new vector every call (shapes fixed, values changing).
Reported per dtype: eager seconds per evaluation (median), the compiled model's first call (compile time),
its seconds per evaluation afterwards, and after how many evaluations the compile time is paid back. The JSON goes to
stderr and --out, and one verdict line to stdout: does the compile time pay within --evaluations (default 20, above
the 8-16 a default search ran in docs/benchmarks.md; the budget, 40, is its cap)?
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lorahub_cli.compose.adapters import LoraAdapter  # noqa: E402
from lorahub_cli.compose.bank import LoraBank  # noqa: E402
from lorahub_cli.compose.objective import FewShotLoss  # noqa: E402
from lorahub_cli.models import BaseModel, EncodedBatch  # noqa: E402

INPUT_LENGTHS = [106, 106, 77, 96, 113]  # the base fixture's shots (bench/fixtures.py, seed 0)
TARGET_LENGTH = 5
N_MODULES, RANK, ALPHA = 20, 16, 32


def t5_base(device: torch.device) -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=32128,
        d_model=768,
        d_kv=64,
        d_ff=2048,
        num_layers=12,
        num_decoder_layers=12,
        num_heads=12,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        decoder_start_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).eval().requires_grad_(False).to(device)


def adapters(model: torch.nn.Module) -> list[LoraAdapter]:
    generator = torch.Generator().manual_seed(1000)
    targets = [n for n, m in model.named_modules() if n.endswith((".q", ".v")) and isinstance(m, torch.nn.Linear)]
    out = []
    for i in range(N_MODULES):
        modules = {}
        for name in targets:
            layer = model.get_submodule(name)
            A = (torch.rand(RANK, layer.in_features, generator=generator) * 2 - 1) / layer.in_features**0.5
            B = torch.randn(layer.out_features, RANK, generator=generator) * 0.02
            device = layer.weight.device
            modules[name] = (A.to(device), B.to(device))
        out.append(LoraAdapter(f"m{i}", "random-t5-base", RANK, ALPHA, ["q", "v"], "SEQ_2_SEQ_LM", modules))
    return out


def shots(device: torch.device) -> EncodedBatch:
    generator = torch.Generator().manual_seed(42)
    width = max(INPUT_LENGTHS)
    ids = torch.zeros(len(INPUT_LENGTHS), width, dtype=torch.long)
    for k, n in enumerate(INPUT_LENGTHS):
        ids[k, :n] = torch.randint(2, 32128, (n,), generator=generator)
    labels = torch.randint(2, 32128, (len(INPUT_LENGTHS), TARGET_LENGTH), generator=generator)
    decoder = torch.cat([torch.zeros(len(INPUT_LENGTHS), 1, dtype=torch.long), labels[:, :-1]], dim=1)
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long(), "decoder_input_ids": decoder}
    n_tokens = torch.full((len(INPUT_LENGTHS),), TARGET_LENGTH)
    return EncodedBatch({k: v.to(device) for k, v in inputs.items()}, labels.to(device), n_tokens.to(device))


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    model = t5_base(device).to(dtype)
    bank = LoraBank(model, adapters(model), lora_dtype=torch.float32)
    batch = shots(device)
    generator = torch.Generator().manual_seed(0)

    def timed(loss) -> float:
        """Seconds of one evaluation: wall on CUDA; on CPU, CPU seconds of this process and its children (the C++
        compiler that inductor runs), which a busy machine's other load does not inflate."""
        W = torch.rand(1, N_MODULES, generator=generator) * 3 - 1.5  # a new candidate every call
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter() if device.type == "cuda" else cpu_seconds()
        with torch.no_grad():
            value = float(loss(W)[0])  # float(): waits for the device
        assert value == value, "the loss is finite"
        return (time.perf_counter() if device.type == "cuda" else cpu_seconds()) - start

    eager = FewShotLoss(BaseModel(model, None, True, device, dtype), bank, batch, mode="elementwise")
    timed(eager)  # warm-up (first touch of the weights, kernel selection)
    eager_times = [timed(eager) for _ in range(repeats)]
    compiled_model = torch.compile(model)
    compiled = FewShotLoss(BaseModel(compiled_model, None, True, device, dtype), bank, batch, mode="elementwise")
    wall = time.perf_counter()
    first = timed(compiled)
    wall = time.perf_counter() - wall
    compiled_times = [timed(compiled) for _ in range(repeats)]
    eager_s, compiled_s = statistics.median(eager_times), statistics.median(compiled_times)
    graphs = _graphs()  # more than one: a new weight vector recompiled (dynamo guards), not the fixed shapes
    saved = eager_s - compiled_s
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "eager_seconds_per_evaluation": eager_s,
        "clock": "wall" if device.type == "cuda" else "CPU (process and children)",
        "compiled_first_call_seconds": first,
        "compiled_first_call_wall_seconds": wall,
        "compile_seconds": first - compiled_s,
        "compiled_seconds_per_evaluation": compiled_s,
        "speedup_per_evaluation": eager_s / compiled_s,
        "evaluations_to_pay_back": (first - compiled_s) / saved if saved > 0 else None,
        "graphs_compiled": graphs,
    }


def _graphs() -> int | None:
    """How many graphs dynamo compiled so far (torch's internal counters; None where they are not there)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed evaluations per variant")
    parser.add_argument(
        "--evaluations",
        type=int,
        default=20,
        help="evaluations a default search runs (it stops when converged: 8-16 measured, budget 40 the cap)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / ".cache" / "results" / "compile.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    machine = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_before": list(os.getloadavg()),
    }
    results = []
    for name in args.dtypes.split(","):
        try:
            results.append(measure(device, dtypes[name], args.repeats))
        except Exception as error:  # a backend that cannot compile this model is an answer too
            results.append({"dtype": name, "error": f"{type(error).__name__}: {error}"[:300]})
    report = {"machine": machine | {"loadavg_after": list(os.getloadavg())}, "results": results}
    report["verdict"] = verdict(device, results, args.evaluations)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2), file=sys.stderr)
    print(report["verdict"])


def verdict(device: torch.device, results: list[dict], evaluations: int) -> str:
    """One line: does compiling pay within the evaluations a default search runs?"""
    parts = []
    for r in results:
        if "error" in r:
            parts.append(f"{r['dtype']}: compile FAILED ({r['error'][:120]})")
            continue
        pays = r["evaluations_to_pay_back"] is not None and r["evaluations_to_pay_back"] <= evaluations
        back = "never" if r["evaluations_to_pay_back"] is None else f"after {r['evaluations_to_pay_back']:.0f}"
        parts.append(
            f"{r['dtype']}: {'PAYS' if pays else 'does not pay'} (compile {r['compile_seconds']:.1f} s, "
            f"{r['speedup_per_evaluation']:.2f}x per evaluation, paid back {back} evaluations, "
            f"{r.get('graphs_compiled')} graphs)"
        )
    return f"torch.compile on {device.type}, {evaluations} evaluations a search: " + "; ".join(parts)


if __name__ == "__main__":
    main()
