"""Building the demo library: a miniature Flan-T5, one LoRA per upstream task, cards, held-out tasks, manifest.

Steps, all seeded: (1) a tiny T5 with a byte tokenizer, random weights, no
download; (2) instruction-tune it on the mixture of the upstream tasks; (3) one
LoRA per upstream task from that base; (4) each LoRA's training data and
embedding card; (5) the held-out tasks in the shots format; (6) a manifest with
hashes and metrics. The library is assembled in a temporary folder next to the
target and renamed into place, so a failed build leaves the old one intact.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..cards.card import build_card
from ..errors import InputError
from ..io import Example, sha256_file
from ..quiet import no_progress, quiet_loading
from .library import ADAPTERS_DIR, BASE_DIR, BASE_MODEL, DATA_DIR, HELDOUT_DIR, MANIFEST, REBUILD, manifest
from .training import Schedule
from .world import HELD_OUT, TASKS, UPSTREAM, generate

FORMAT_VERSION = 1


@dataclass(frozen=True)
class BuildConfig:
    """Everything that shapes the library; saved in the manifest."""

    shape: dict  # T5Config fields
    base: Schedule  # instruction tuning on the upstream mixture
    lora: Schedule  # each upstream LoRA
    lora_r: int = 4
    lora_alpha: int = 8
    upstream: tuple[str, ...] = tuple(t.name for t in UPSTREAM)
    heldout: tuple[str, ...] = tuple(t.name for t in HELD_OUT)
    train_examples: int = 1000  # per upstream task: the base's share of the mixture and the LoRA's data
    eval_examples: int = 100  # per upstream task, from a split no training run sees
    heldout_examples: int = 100  # per held-out task: the evaluator draws shots and a test set from these

    def __post_init__(self):
        unknown = [n for n in self.upstream + self.heldout if n not in TASKS]
        if unknown:
            raise InputError(f"unknown demo tasks {unknown}.", "Use task names from lorahub_cli/demo/world.py.")
        missing = sorted({s for n in self.heldout for s in TASKS[n].skills} - set(self.upstream))
        if missing:
            raise InputError(
                f"held-out tasks reuse {missing}, which are not upstream tasks of this build.",
                "Add them to `upstream` or drop those held-out tasks.",
            )


# d_model 128 with r=4 keeps LoraHub's rank-to-width ratio (16 / 1024) within a factor of two.
# The budgets fit a build of about 20 minutes on one busy core (0.7-0.9 s per base step): the base
# sees each upstream example about 2.5 times, each LoRA its own data about 1.6 times.
FULL = BuildConfig(
    shape=dict(
        d_model=128,
        d_kv=32,
        d_ff=512,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
    ),
    base=Schedule(steps=800, batch_size=64, lr=2e-3, warmup=80),
    lora=Schedule(steps=50, batch_size=32, lr=3e-3, warmup=5),
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
    base=Schedule(steps=20, batch_size=16, lr=3e-3, warmup=2),
    lora=Schedule(steps=5, batch_size=16, lr=3e-3),
    upstream=("reverse_word", "spell_dashes", "first_letter", "last_letter"),
    heldout=("backwards_dashes", "first_and_last"),
    train_examples=64,
    eval_examples=16,
    heldout_examples=16,
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


def _card(rows: list[dict], embedder, source: dict):
    card = build_card([Example(r["input"], r["target"]) for r in rows], embedder, source=source)
    # A timestamp would make two builds of the same library differ.
    return replace(card, created_at="")


def _build_into(root: Path, config: BuildConfig, seed: int, command: str, progress_factory) -> dict:
    import torch

    from ..cards.embedder import load_embedder
    from . import training

    started = time.monotonic()
    tok = training.tokenizer()
    data = {name: generate(name, config.train_examples, seed, "train") for name in config.upstream}
    evals = {name: generate(name, config.eval_examples, seed, "eval") for name in config.upstream}
    heldout = {name: generate(name, config.heldout_examples, seed, "heldout") for name in config.heldout}
    for name, rows in data.items():
        write_jsonl(root / DATA_DIR / f"{name}.jsonl", rows)
    for name, rows in heldout.items():
        write_jsonl(root / HELDOUT_DIR / f"{name}.jsonl", rows)

    base = training.tiny_t5(config.shape, seed)
    mixture = [row for rows in data.values() for row in rows]
    with progress_factory("Instruction-tuning the base model", config.base.steps) as advance:
        base_loss = training.train(base, tok, mixture, config.base, seed, advance)
    with quiet_loading():
        base.save_pretrained(str(root / BASE_DIR))
    tok.save_pretrained(str(root / BASE_DIR))

    from peft import get_peft_model

    upstream_metrics = {}
    lora_steps = len(config.upstream) * config.lora.steps
    with progress_factory("Training one LoRA per upstream task", lora_steps) as advance, warnings.catch_warnings():
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
            del model
    heldout_metrics = {name: {"base_zero_shot": training.accuracy(base, tok, rows)} for name, rows in heldout.items()}

    embedder = load_embedder()
    with progress_factory("Building embedding cards", len(config.upstream)) as advance:
        for name in config.upstream:
            data_file = f"{DATA_DIR}/{name}.jsonl"
            source = {"type": "file", "path": data_file, "sha256": sha256_file(root / data_file)}
            _card(data[name], embedder, source).save(root / ADAPTERS_DIR / name)
            advance()

    files = {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    return {
        "format": FORMAT_VERSION,
        "build": {
            "command": command,
            "seed": seed,
            "seconds": round(time.monotonic() - started),
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
        "tasks": [TASKS[n].metadata() for n in config.upstream + config.heldout],
        "metrics": {
            "exact_match": "greedy, strip + lower-case + delete '.'",
            "upstream": upstream_metrics,
            "heldout": heldout_metrics,
        },
        "files": files,
        "total_size": sum(f["size"] for f in files.values()),
    }


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
