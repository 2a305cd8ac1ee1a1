"""Writing a composition: a PEFT folder plus its recipe and model card, all or nothing.

The folder is assembled next to its destination and renamed into place at the
end, so Ctrl-C or a crash leaves either no output or the previous one, never a
half-written adapter. An existing destination is replaced only when asked.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError
from ..io import atomic_write_json
from .adapters import LoraAdapter, save_adapter

RECIPE_FILE = "lorahub_recipe.json"
MODEL_CARD = "README.md"


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse an existing --out before any work is done."""
    if out.exists() and not overwrite:
        raise InputError(f"'{out}' already exists.", "Choose another --out, or pass --overwrite to replace it.")
    if out.exists() and not out.is_dir():
        raise InputError(f"'{out}' is a file, not a folder.", "Choose another --out.")


def model_card(recipe: dict) -> str:
    """A Hub model card: YAML front matter (base_model, library_name, tags) and how the adapter was made."""
    modules = recipe.get("modules", [])
    lines = [
        "---",
        f"base_model: {recipe['base_model']}",
        "library_name: peft",
        "tags:",
        "- lorahub",
        "- lora",
        f"- {recipe['formula']}",
        "---",
        "",
        f"# LoRA composed with lorahub ({recipe['formula']})",
        "",
        f"A composition of {len(modules)} LoRA modules for `{recipe['base_model']}`, made by "
        f"[lorahub](https://pypi.org/project/lorahub-cli/) {recipe['versions']['lorahub']}.",
        "",
    ]
    search = recipe.get("search")
    objective = search["objective"] if search and recipe.get("objective") is None else recipe.get("objective")
    if search:
        lines += [
            f"Weights found by `{search['optimizer']}` ({search.get('engine', '')}) in {search['evaluations']} "
            f"evaluations on {recipe['shots']['count']} examples: few-shot loss {recipe['loss']:.4f}, "
            f"objective {objective:.4f} (loss + {search['l1']} x mean |w|; float32).",
            "",
        ]
    lines += ["| module | revision | weight |", "| --- | --- | ---: |"]
    lines += [f"| {m['id']} | {(m.get('revision') or 'local')[:12]} | {m['weight']:+.4f} |" for m in modules]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForSeq2SeqLM" if recipe.get("task_type") == "SEQ_2_SEQ_LM" else "from transformers import AutoModelForCausalLM",
        "",
        f"base = {'AutoModelForSeq2SeqLM' if recipe.get('task_type') == 'SEQ_2_SEQ_LM' else 'AutoModelForCausalLM'}.from_pretrained(\"{recipe['base_model']}\")",
        "model = PeftModel.from_pretrained(base, \"PATH_OR_REPO\")",
        "```",
        "",
        f"`{RECIPE_FILE}` holds everything needed to rebuild this adapter bit for bit: "
        "`lorahub compose --from-recipe lorahub_recipe.json --out DIR`.",
        "",
    ]
    return "\n".join(lines)


def write_folder(out: Path, fill: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Build a folder with `fill(tmp)` beside `out`, then rename it into place (replacing `out` if asked)."""
    out = Path(out).resolve()
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_adapter_folder(tmp: Path, adapter: LoraAdapter, recipe: dict) -> None:
    save_adapter(adapter, tmp)
    atomic_write_json(tmp / RECIPE_FILE, recipe)
    (tmp / MODEL_CARD).write_text(model_card(recipe), encoding="utf-8")
