"""Building the demo library: a miniature Flan-T5, one LoRA per upstream skill, cards, held-out tasks, manifest.

Steps, all seeded: (1) a tiny T5 with a byte tokenizer, random weights, no download; (2) instruction-tune
it on the general mixture (no skill task in it), with few-shot prompts in the evaluation's format; (3) one
LoRA per upstream skill from that base; (4) each LoRA's training data and embedding card; (5) the held-out
tasks in the shots format; (6) `lorahub demo` on every held-out task (seed 1), which chooses the demo's
default task; (7) a manifest with hashes and metrics. The library is assembled in a temporary folder next
to the target and renamed into place, so a failed build leaves the old one intact.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..cards.card import build_card
from ..errors import InputError
from ..io import Example, sha256_file
from ..quiet import no_progress, quiet_loading
from .library import ADAPTERS_DIR, BASE_DIR, BASE_MODEL, DATA_DIR, HELDOUT_DIR, MANIFEST, REBUILD, manifest
from .training import Schedule
from .world import GENERAL, HELD_OUT, TASKS, UPSTREAM, few_shot, generate

FORMAT_VERSION = 2


@dataclass(frozen=True)
class BuildConfig:
    """Everything that shapes the library; saved in the manifest."""

    shape: dict  # T5Config fields
    base: Schedule  # instruction tuning on the general mixture
    lora: Schedule  # each upstream LoRA
    lora_r: int = 8
    lora_alpha: int = 16
    general: tuple[str, ...] = tuple(t.name for t in GENERAL)
    upstream: tuple[str, ...] = tuple(t.name for t in UPSTREAM)
    heldout: tuple[str, ...] = tuple(t.name for t in HELD_OUT)
    general_examples: int = 3000  # per general task, in the base's mixture
    few_shot_examples: int = 6000  # few-shot prompts of the general tasks, in the base's mixture
    train_examples: int = 1000  # per upstream skill: the LoRA's data and the card's source
    eval_examples: int = 100  # per task, from a split no training run sees
    heldout_examples: int = 100  # per held-out task: the evaluator draws shots and a test set from these
    demo_budget: int = 40  # the search budget of the build's `lorahub demo` runs (the command's default)

    def __post_init__(self):
        unknown = [n for n in self.general + self.upstream + self.heldout if n not in TASKS]
        if unknown:
            raise InputError(f"unknown demo tasks {unknown}.", "Use task names from lorahub_cli/demo/world.py.")
        missing = sorted({s for n in self.heldout for s in TASKS[n].skills} - set(self.upstream))
        if missing:
            raise InputError(
                f"held-out tasks reuse {missing}, which are not upstream tasks of this build.",
                "Add them to `upstream` or drop those held-out tasks.",
            )


# 0.5M parameters, two layers each side: a model this size learns to copy letters within the budget (a
# 1.4M, three-layer one trained as long copied 62% of words: docs/demo.md, build 1). 32 relative-position
# buckets up to 128 bytes, as five-shot prompts run to about 300. One step in eight is a batch of 16
# few-shot prompts. r=16 on d_model 96 is far above LoraHub's rank-to-width ratio (16/1024): a rank-8
# module learnt too little of a skill (docs/demo.md).
FULL = BuildConfig(
    shape=dict(
        d_model=96,
        d_kv=24,
        d_ff=384,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    ),
    base=Schedule(steps=3400, batch_size=64, lr=3e-3, warmup=340, long_every=8, long_batch=16),
    lora=Schedule(steps=800, batch_size=32, lr=5e-3, warmup=40),
    lora_r=16,
    lora_alpha=32,
)
# The same code path on a model too small to learn much: it exists so that CI can run the build.
REDUCED = BuildConfig(
    shape=dict(
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
    ),
    base=Schedule(steps=12, batch_size=16, lr=3e-3, warmup=2, long_every=4, long_batch=4),
    lora=Schedule(steps=4, batch_size=16, lr=3e-3),
    lora_r=4,
    lora_alpha=8,
    general=("copy", "brackets"),
    upstream=("reverse_word", "add_digits", "drop_vowels"),
    heldout=("backwards", "mixed_reverse_add"),
    general_examples=64,
    few_shot_examples=16,
    train_examples=64,
    eval_examples=8,
    heldout_examples=12,
    demo_budget=3,
)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _versions() -> dict:
    import peft
    import torch
    import transformers

    from .. import __version__

    return {
        "lorahub": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def _lora_config(config: BuildConfig):
    from peft import LoraConfig

    # LoraHub's recipe (q and v, dropout 0.1, alpha = 2r) with the rank scaled to the model.
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.1,
        target_modules=["q", "v"],
        task_type="SEQ_2_SEQ_LM",
    )


def _save_adapter(peft_model, folder: Path) -> None:
    # save_embedding_layers=False: "auto" would ask the Hub whether the vocabulary changed.
    peft_model.save_pretrained(str(folder), save_embedding_layers=False)
    (folder / "README.md").unlink(missing_ok=True)
    sort_target_modules(folder / "adapter_config.json")


def sort_target_modules(path: Path) -> None:
    """PEFT keeps target_modules as a set and writes it in iteration order, which follows Python's per-process
    string hashing: two builds with one seed would differ in this file. Rewritten sorted, in PEFT's layout."""
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def _card(rows: list[dict], embedder, source: dict):
    card = build_card([Example(r["input"], r["target"]) for r in rows], embedder, source=source)
    # A timestamp would make two builds of the same library differ.
    return replace(card, created_at="")


def _most_frequent(rows: list[dict]) -> float:
    from ..eval.scoring import normalize

    return Counter(normalize(r["target"]) for r in rows).most_common(1)[0][1] / len(rows)


def _files(root: Path) -> dict:
    return {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _demo_runs(root: Path, config: BuildConfig, progress_factory) -> dict:
    """`lorahub demo --task T --seed 1` on every held-out task of the library in `root`; the default task is the
    one with the median gain over max(zero-shot, most frequent answer) (the lower one of an even count)."""
    from ..registry import Store
    from . import tour

    runs = {}
    with tempfile.TemporaryDirectory(prefix="lorahub-demo-build-") as tmp:
        store = Store(Path(tmp) / "home")
        with progress_factory("Running the demo on every held-out task", len(config.heldout)) as advance:
            for name in config.heldout:
                result = tour.run(store, Path(tmp) / name, task=name, seed=1, budget=config.demo_budget, path=root)
                em = result["exact_match"]
                runs[name] = {
                    "zero-shot": em["zero-shot"],
                    "composed": em["composed"],
                    "most_frequent": result["majority_answer"],
                    "gain": round(em["composed"] - max(em["zero-shot"], result["majority_answer"]), 1),
                    "weights": result["weights"],
                }
                advance()
    ranked = sorted(runs, key=lambda n: (runs[n]["gain"], n))
    return {"seed": 1, "budget": config.demo_budget, "default_task": ranked[(len(ranked) - 1) // 2], "tasks": runs}


def _build_into(root: Path, config: BuildConfig, seed: int, command: str, progress_factory) -> dict:
    import torch

    from ..cards.embedder import load_embedder
    from . import training

    started, seconds = time.monotonic(), {}
    tok = training.tokenizer()
    general = [row for name in config.general for row in generate(name, config.general_examples, seed)]
    prompts = few_shot(list(config.general), config.few_shot_examples, seed)
    data = {name: generate(name, config.train_examples, seed, "train") for name in config.upstream}
    evals = {name: generate(name, config.eval_examples, seed, "eval") for name in config.upstream}
    heldout = {name: generate(name, config.heldout_examples, seed, "heldout") for name in config.heldout}
    for name, rows in data.items():
        write_jsonl(root / DATA_DIR / f"{name}.jsonl", rows)
    for name, rows in heldout.items():
        write_jsonl(root / HELDOUT_DIR / f"{name}.jsonl", rows)

    base = training.tiny_t5(config.shape, seed)
    with progress_factory("Instruction-tuning the base model", config.base.steps) as advance:
        base_loss = training.train(base, tok, general, config.base, seed, advance, long_rows=prompts)
    with quiet_loading():
        base.save_pretrained(str(root / BASE_DIR))
    tok.save_pretrained(str(root / BASE_DIR))
    general_metrics = {
        name: {"base": training.accuracy(base, tok, generate(name, config.eval_examples, seed, "eval"))}
        for name in config.general
    }
    general_metrics["few_shot"] = {
        "base": training.accuracy(base, tok, few_shot(list(config.general), config.eval_examples, seed, "eval"))
    }
    seconds["base"] = round(time.monotonic() - started)

    from peft import get_peft_model

    upstream_metrics, heldout_by_module, loras = {}, {}, {}
    lora_steps = len(config.upstream) * config.lora.steps
    with progress_factory("Training one LoRA per upstream skill", lora_steps) as advance, warnings.catch_warnings():
        # PEFT 0.21 calls a method that transformers 5 deprecates, at every training run; nothing to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        for index, name in enumerate(config.upstream):
            model = get_peft_model(copy.deepcopy(base), _lora_config(config))
            # get_peft_model records the model's own (empty) name; the library is about BASE_MODEL.
            model.peft_config["default"].base_model_name_or_path = BASE_MODEL
            loss = training.train(model, tok, data[name], config.lora, seed + 1 + index, advance)
            _save_adapter(model, root / ADAPTERS_DIR / name)
            upstream_metrics[name] = {
                "base": training.accuracy(base, tok, evals[name]),
                "lora": training.accuracy(model, tok, evals[name]),
                "lora_final_loss": loss,
            }
            loras[name] = model
        # Each held-out task under each of its skills' modules alone, at weight 1: what one right module does.
        for name, rows in heldout.items():
            heldout_by_module[name] = {
                skill: training.accuracy(loras[skill], tok, rows) for skill in TASKS[name].skills
            }
    del loras
    heldout_metrics = {
        name: {
            "base_zero_shot": training.accuracy(base, tok, rows),
            "most_frequent": _most_frequent(rows),
            "module_alone": heldout_by_module[name],
        }
        for name, rows in heldout.items()
    }
    seconds["loras"] = round(time.monotonic() - started) - seconds["base"]

    embedder = load_embedder()
    with progress_factory("Building embedding cards", len(config.upstream)) as advance:
        for name in config.upstream:
            data_file = f"{DATA_DIR}/{name}.jsonl"
            source = {"type": "file", "path": data_file, "sha256": sha256_file(root / data_file)}
            _card(data[name], embedder, source).save(root / ADAPTERS_DIR / name)
            advance()
    seconds["cards"] = round(time.monotonic() - started) - seconds["base"] - seconds["loras"]

    meta = {
        "format": FORMAT_VERSION,
        "build": {
            "command": command,
            "seed": seed,
            "threads": torch.get_num_threads(),
            "versions": _versions(),
        },
        "base_model": {
            "name": BASE_MODEL,
            "path": BASE_DIR,
            "shape": config.shape,
            "parameters": sum(p.numel() for p in base.parameters()),
            "dtype": "float32",
            "tokenizer": "ByT5 bytes (vocabulary 259)",
            "final_loss": base_loss,
        },
        "config": asdict(config),
        "embedder": {"id": embedder.id, "revision": embedder.revision},
        "tasks": [TASKS[n].metadata() for n in config.general + config.upstream + config.heldout],
        "metrics": {
            "exact_match": "greedy, strip + lower-case + delete '.', in [0, 1]",
            "general": general_metrics,
            "upstream": upstream_metrics,
            "heldout": heldout_metrics,
        },
        "files": _files(root),
    }
    # The demo runs read the library through its manifest, as `lorahub demo` does.
    (root / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    meta["demo"] = _demo_runs(root, config, progress_factory)
    seconds["demo"] = round(time.monotonic() - started) - sum(seconds.values())
    meta["build"]["seconds"] = round(time.monotonic() - started)
    meta["build"]["stages"] = seconds
    meta["total_size"] = sum(f["size"] for f in meta["files"].values())
    return meta


def build(
    out: Path, *, reduced: bool = False, seed: int = 0, threads: int = 1, progress_factory: Callable | None = None
) -> dict:
    """Build the library into `out` (replacing it only once complete); returns the manifest.

    One thread by default: on two cores shared with other processes, two OpenMP threads
    spinning against them made training steps two to five times slower than one thread.
    """
    import torch

    from ..models import torch_threads

    out = Path(out).resolve()
    config = REDUCED if reduced else FULL
    command = f"{REBUILD}{' --reduced' if reduced else ''} --seed {seed} --threads {threads}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with torch_threads(threads), torch.random.fork_rng():
            meta = _build_into(tmp, config, seed, command, progress_factory or no_progress)
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest(out)
