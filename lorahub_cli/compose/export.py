"""Writing a composition: a PEFT folder plus its recipe and model card, and where it may go.

The folder itself is written all or nothing by io.write_folder. `--overwrite` may replace only
a folder that lorahub compose wrote: one that holds a recipe and only files compose writes,
and that is not the working directory, one of its parents, the lorahub home or a folder
holding the command's own inputs.
"""

from __future__ import annotations

from pathlib import Path

from .. import io
from ..cards.card import CARD_FILES
from ..errors import InputError
from ..settings import home
from .adapters import CONFIG_FILE, SAFETENSORS_FILE, LoraAdapter, save_adapter
from .recipe import RECIPE_FILE, ROUTER_FILE, Recipe

MODEL_CARD = "README.md"
COMPOSITIONS = "compositions"
# What write_adapter_folder writes, and the embedding card a user may build for the result.
_WRITTEN = {CONFIG_FILE, SAFETENSORS_FILE, RECIPE_FILE, MODEL_CARD, *CARD_FILES}


def check_destination(out: Path, overwrite: bool, *, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work is done, an --out that exists (without --overwrite), that may not be
    replaced, or that cannot be written."""
    out = Path(out).resolve()
    io.check_destination(out, overwrite)
    if out.exists():
        _check_replaceable(out, inputs)


def _check_replaceable(out: Path, inputs: tuple[Path, ...]) -> None:
    hint = "--overwrite replaces only a folder written by lorahub compose; choose another --out."
    cwd, lorahub_home = Path.cwd().resolve(), home().expanduser().resolve()
    if cwd.is_relative_to(out):
        raise InputError(f"refusing to replace '{out}': it is the working directory or one of its parents.", hint)
    if lorahub_home.is_relative_to(out) or out.is_relative_to(lorahub_home):
        raise InputError(
            f"refusing to replace '{out}': it holds the lorahub home ({lorahub_home}) or is inside it.", hint
        )
    for path in inputs:
        if Path(path).resolve().is_relative_to(out):
            raise InputError(f"refusing to replace '{out}': it holds the input '{path}'.", hint)
    if not (out / RECIPE_FILE).is_file():
        raise InputError(f"refusing to replace '{out}': it has no {RECIPE_FILE}, so lorahub did not write it.", hint)
    for path in out.rglob("*"):
        if not _written_by_compose(path.relative_to(out).parts, path.is_dir()):
            raise InputError(
                f"refusing to replace '{out}': it holds '{path.relative_to(out)}', which lorahub did not write.", hint
            )


def _written_by_compose(parts: tuple[str, ...], is_dir: bool) -> bool:
    """A path inside a composition folder: its adapter files, the router, compositions/shot-N/<adapter files>."""
    if len(parts) == 1:
        return parts[0] in _WRITTEN | {ROUTER_FILE} if not is_dir else parts[0] == COMPOSITIONS
    if parts[0] != COMPOSITIONS or not parts[1].startswith("shot-") or not parts[1][5:].isdigit():
        return False
    return is_dir if len(parts) == 2 else (len(parts) == 3 and not is_dir and parts[2] in _WRITTEN)


def model_card(recipe: Recipe, *, use: bool = True) -> str:
    """A Hub model card: YAML front matter (base_model, library_name, tags), how the adapter was made,
    and (with `use`) how to load it."""
    lines = [
        "---",
        f"base_model: {recipe.base_model}",
        "library_name: peft",
        "tags:",
        "- lorahub",
        "- lora",
        f"- {recipe.formula}",
        "---",
        "",
        f"# LoRA composed with lorahub ({recipe.formula})",
        "",
        f"A composition of {len(recipe.modules)} LoRA modules for `{recipe.base_model}`, made by "
        f"[lorahub](https://pypi.org/project/lorahub-cli/) {recipe.versions.get('lorahub', recipe.lorahub_version)}.",
        "",
    ]
    search = recipe.search
    if search:
        lines += [
            f"Weights found by `{search['optimizer']}` ({search.get('engine', '')}) in {search['evaluations']} "
            f"evaluations on {recipe.shots.get('count')} examples: few-shot loss {recipe.loss:.4f}, "
            f"objective {recipe.objective if recipe.objective is not None else search['objective']:.4f} "
            f"(loss + {search['l1']} x mean |w|; float32).",
            "",
        ]
    lines += ["| module | revision | weight |", "| --- | --- | ---: |"]
    lines += [f"| {m['id']} | {(m.get('revision') or 'local')[:12]} | {m['weight']:+.4f} |" for m in recipe.modules]
    return "\n".join(lines + (_use(recipe) if use else []))


def _use(recipe: Recipe) -> list[str]:
    from ..models import local_model_path

    auto = "AutoModelForSeq2SeqLM" if recipe.task_type == "SEQ_2_SEQ_LM" else "AutoModelForCausalLM"
    local = local_model_path(recipe.base_model)
    lines = ["", "## Use", ""]
    if local is not None:
        # A model shipped inside lorahub (the demo's): it is not on the Hub, so name where it is.
        lines += [
            f"`{recipe.base_model}` is not on the Hub: it ships inside lorahub (`pip install lorahub-cli`), "
            "whose commands resolve that name to their own copy. With PEFT, load the base from that copy:",
            "",
        ]
    lines += ["```python", "from peft import PeftModel", f"from transformers import {auto}", ""]
    if local is not None:
        lines += [
            "from lorahub_cli.models import local_model_path",
            "",
            f'base = {auto}.from_pretrained(local_model_path("{recipe.base_model}"))',
        ]
    else:
        lines += [f'base = {auto}.from_pretrained("{recipe.base_model}")']
    lines += [
        'model = PeftModel.from_pretrained(base, "PATH_OR_REPO")',
        "```",
        "",
        f"`{RECIPE_FILE}` holds everything needed to rebuild this adapter bit for bit: "
        "`lorahub compose --from-recipe lorahub_recipe.json --out DIR`.",
        "",
    ]
    return lines


def instance_card(recipe: Recipe) -> str:
    """The model card of an instance-level composition: the first shot's card, then what the folder holds."""
    first = recipe.shot(recipe.compositions[0])
    return model_card(first, use=False) + (
        f"\n\nThis is an instance-level composition: {len(recipe.compositions)} adapters under `{COMPOSITIONS}/`, "
        f"one per example, and `{ROUTER_FILE}`, the examples' input embeddings. Each input is answered by the "
        f"composition of the example whose input is most similar (see `{RECIPE_FILE}`). The table above "
        "shows the first composition.\n"
    )


def write_adapter_folder(tmp: Path, adapter: LoraAdapter, recipe: Recipe) -> None:
    save_adapter(adapter, tmp)
    recipe.save(tmp)
    (tmp / MODEL_CARD).write_text(model_card(recipe), encoding="utf-8")
