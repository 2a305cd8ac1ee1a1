"""Rebuild registry/examples/: `python -m lorahub_cli.examples.build [OUT]`.

For each task: training data (the card's source), held-out shots and inputs,
and a LoRA adapter on a tiny random T5 (r=4, q and v, non-zero B). The
adapters' weights are random, not trained: the example library exists to show
the registry and retrieval, which read only configs, hashes and cards.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .tasks import TASKS, generate

BASE_MODEL = "lorahub-examples/tiny-t5"
TRAIN, SHOTS, INPUTS = 80, 5, 10


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=256,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


def build_adapter(folder: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q", "v"],
        task_type="SEQ_2_SEQ_LM",
        init_lora_weights=False,
        base_model_name_or_path=BASE_MODEL,
    )
    model = get_peft_model(tiny_t5(), config)
    model.save_pretrained(folder)
    # PEFT records the model's own (empty) name; the library is about BASE_MODEL.
    config_path = folder / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = BASE_MODEL
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").unlink(missing_ok=True)


def build(out: Path) -> None:
    for seed, task in enumerate(sorted(TASKS)):
        write_jsonl(out / "data" / f"{task}.jsonl", generate(task, TRAIN, seed=0))
        held_out = generate(task, SHOTS + INPUTS, seed=1)
        write_jsonl(out / "shots" / f"{task}.jsonl", held_out[:SHOTS])
        write_jsonl(out / "inputs" / f"{task}.jsonl", [{"input": r["input"]} for r in held_out[SHOTS:]])
        build_adapter(out / "adapters" / task, seed)


if __name__ == "__main__":
    from ..settings import shipped_dir

    build(Path(sys.argv[1]) if len(sys.argv) > 1 else shipped_dir() / "examples")
