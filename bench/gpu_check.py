"""Does lorahub run on CUDA, and does it give there what it gives on the CPU? One short script for a GPU machine.

    PYTHONPATH=. python bench/gpu_check.py [--task backwards] [--out DIR] [--device cuda]

On the shipped demo library (no network, no embedder: the modules are the ones the demo's own run chose):
1. compose on the CPU and on CUDA (defaults, same seed): each run's reported fp32 loss is checked against an
   independent evaluation of its exported adapter, loaded by PEFT on the CPU in fp32 (transformers' own loss),
   and the two devices' losses, weights, search precision and times are printed side by side;
2. answering with the composition (`generate --adapter`'s engine) on both devices: greedy fp32 tokens equal;
3. the bank's mixed batch (every row its own weights, dense and grouped paths) on CUDA vs the CPU, fp32;
4. seeded sampling on CUDA: a request alone and inside a batch of others gives the same tokens.
It prints one line per check with PASS or FAIL and exits 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorahub_cli import api
from lorahub_cli.compose.bank import LoraBank
from lorahub_cli.compose.pipeline import ComposeOptions, load_modules
from lorahub_cli.demo import library, tour
from lorahub_cli.models import encode, load_base_model
from lorahub_cli.registry import Store
from lorahub_cli.serve.engine import Engine, Request

FAILED: list[str] = []
DEVICE = "cuda"  # the device compared with the CPU


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def peft_loss(folder: Path, shots) -> float:
    """The few-shot loss of `folder` loaded by PEFT on the CPU in fp32, as transformers computes it (the test suite's
    independent evaluation, tests/test_compose.py): independent of lorahub's batching and of the device."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_compose import reference_loss

    base_dir = library.base_model_path()
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_dir), folder).eval()
    return reference_loss(model, base_dir, shots)


def compose_both(store: Store, shots_file: Path, modules: list[str], shots, out: Path) -> list[dict]:
    runs = []
    for device in ("cpu", DEVICE):
        folder = out / f"{len(runs)}-{device}"
        start = time.perf_counter()
        summary = api.compose(shots_file, folder, ComposeOptions(modules=list(modules), device=device), store=store)
        seconds = time.perf_counter() - start
        independent = peft_loss(folder, shots)
        recipe = json.loads((folder / "lorahub_recipe.json").read_text())
        search, weights = recipe.get("search") or {}, summary["weights"]
        print(
            f"      {device}: loss {summary['loss']:.6f} (PEFT on CPU fp32: {independent:.6f}), {seconds:.1f} s, "
            f"{summary['evaluations']} evaluations, searched in {search.get('precision_used')}, "
            f"stopped: {search.get('stop')}, weights {json.dumps({k: round(v, 4) for k, v in weights.items()})}",
            flush=True,
        )
        check(
            f"compose on {device}: reported loss = PEFT's fp32 loss of the exported adapter",
            abs(summary["loss"] - independent) <= 1e-5 * max(1.0, abs(independent)),
            f"{summary['loss']:.7f} vs {independent:.7f}",
        )
        runs.append({"summary": summary, "seconds": seconds, "folder": folder})
    cpu, gpu = (r["summary"]["loss"] for r in runs)
    print(
        f"      cuda/cpu: loss {gpu / cpu:.4f}x, time {runs[1]['seconds'] / runs[0]['seconds']:.2f}x "
        "(a search on another device may end elsewhere; the fp32 guarantee is the check above)",
        flush=True,
    )
    return runs


def answer_both(folder: Path, texts: list[str]) -> None:
    answers = []
    for device in ("cpu", DEVICE):
        engine = Engine.from_adapter(folder, dtype="float32", device=device, max_new_tokens=16)
        answers.append([a.output for a in engine.run([Request(input=t) for t in texts])])
    same = sum(a == b for a, b in zip(*answers))
    check("generate --adapter: greedy fp32 tokens equal on cpu and cuda", same == len(texts), f"{same}/{len(texts)}")


def bank_both(store: Store, ids: list[str], shots) -> None:
    adapters = load_modules(store, [store.get(i) for i in ids])
    generator = torch.Generator().manual_seed(0)
    rows = len(shots)
    W = torch.randn(rows, len(ids), generator=generator)
    W[:, len(ids) // 2 :] = 0  # half the columns unused: the grouped (sparse) path is eligible
    outputs = {}
    for device in ("cpu", DEVICE):
        base = load_base_model(str(library.base_model_path()), dtype="float32", device=device)
        bank = LoraBank(base.model, adapters, mode="linear")
        batch = encode(base, shots)
        for grouped in (False, True):
            with torch.no_grad(), bank.weights(W, grouped=grouped):
                logits = base.model(**batch.inputs).logits
            outputs[device, grouped] = logits.float().cpu()
    for grouped in (False, True):
        diff = float((outputs["cpu", grouped] - outputs[DEVICE, grouped]).abs().max())
        check(
            f"bank mixed batch ({'grouped' if grouped else 'dense'}), fp32: cuda = cpu",
            diff <= 1e-4,
            f"max |diff| {diff:.2e}",
        )


def sampling_on_cuda(folder: Path, texts: list[str]) -> None:
    engine = Engine.from_adapter(folder, dtype="float32", device=DEVICE, max_new_tokens=16)
    fields = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
    try:
        alone = engine.run([Request(input=texts[0], **fields)])[0].output
        mixed = engine.run(
            [Request(input=t, temperature=0.7, seed=i) for i, t in enumerate(texts[1:])]
            + [Request(input=texts[0], **fields)]
        )[-1].output
    except TypeError as error:  # a Request without sampling fields: the serving branch has not landed
        check("seeded sampling on cuda", False, f"Request takes no sampling fields ({error})")
        return
    check("seeded sampling on cuda: alone = inside a batch", alone == mixed, f"{alone!r} vs {mixed!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="backwards")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="the device compared with the CPU (cpu: a dry run here)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run this on a GPU machine.")
        print(
            f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
            f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}"
        )
    root = Path(args.out or tempfile.mkdtemp(prefix="lorahub-cuda-"))
    store = Store(root / "registry")
    library.mirror(store)
    shots, test = tour.task_split(args.task, 1, 5)
    shots_file = root / "shots.jsonl"
    shots_file.write_text("".join(json.dumps({"input": s.input, "output": s.target}) + "\n" for s in shots))
    modules = list(library.manifest()["demo"]["tasks"][args.task]["weights"])
    texts = [e.input for e in test[:8]]
    runs = compose_both(store, shots_file, modules, shots, root / "compositions")
    answer_both(runs[1]["folder"], texts)
    bank_both(store, modules, shots)
    sampling_on_cuda(runs[1]["folder"], texts)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
