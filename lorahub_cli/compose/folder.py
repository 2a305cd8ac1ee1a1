"""The composition folder on disk: its files, where it may be written, writing it, reading it back.

A task-level composition is a PEFT adapter folder with its recipe and model card:

    adapter_config.json, adapter_model.safetensors   the composed LoRA (compose/adapters.py names them)
    lorahub_recipe.json                              everything needed to rebuild it (compose/recipe.py)
    README.md                                        its Hub model card (below)
    lorahub_card.json, lorahub_card.safetensors      an embedding card, when the user builds one (cards/card.py)

An instance-level composition holds one such folder per shot, and the router:

    lorahub_recipe.json, README.md                   the recipe (every composition and the router), the model card
    router.safetensors                               the shots' input embeddings, (K, dim)
    compositions/shot-<j>/                           the task-level folder of shot j

Each file format's own module names its file; this module says which files a composition holds and where.
The folder is written all or nothing (outputs.write_folder), where outputs.check_destination allows; with
`--overwrite` it replaces only a folder that lorahub compose wrote: one that holds a recipe and only the files
above.
"""

from __future__ import annotations

from pathlib import Path

from .. import outputs
from ..cards.card import CARD_FILES
from ..errors import InputError
from .adapters import CONFIG_FILE, SAFETENSORS_FILE, LoraAdapter, load_adapter, save_adapter
from .recipe import RECIPE_FILE, Recipe

ROUTER_FILE = "router.safetensors"
MODEL_CARD = "README.md"
COMPOSITIONS = "compositions"
TASK_FILES = (CONFIG_FILE, SAFETENSORS_FILE, RECIPE_FILE)  # every task-level folder has them
# What write_composition writes into a task-level folder, and the embedding card a user may build for it.
_WRITTEN = {*TASK_FILES, MODEL_CARD, *CARD_FILES}
READ_HINT = "Give a folder written by: lorahub compose --out DIR"


def shot_folder(j: int) -> str:
    """Where shot j's composition goes inside an instance-level folder (recorded in its recipe entry)."""
    return f"{COMPOSITIONS}/shot-{j}"


# --- where a composition may be written ------------------------------------------------------------


def holds_composition(folder: Path) -> bool:
    """`folder` holds a composition (a recipe): finished work that a batch compose keeps when it resumes."""
    return (Path(folder) / RECIPE_FILE).is_file()


def check_destination(out: Path, overwrite: bool, *, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse, before any work is done, an --out that may not be written (outputs.check_destination: never
    inside the lorahub home, never the working directory, ...) or, with --overwrite, a folder lorahub compose
    did not write. Returns `out` resolved."""
    return outputs.check_destination(out, overwrite, inputs=inputs, replaceable=_written_by_lorahub)


def _written_by_lorahub(out: Path) -> None:
    hint = "--overwrite replaces only a folder written by lorahub compose; choose another --out."
    if not holds_composition(out):
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


# --- writing and reading ---------------------------------------------------------------------------


def write_composition(
    out: Path, recipe: Recipe, adapters: list[LoraAdapter], router=None, *, overwrite: bool = False
) -> Path:
    """Save a composition as a folder, atomically (outputs.write_folder): one adapter (task level), or one per
    shot with `router`, the (K, dim) shot embeddings (instance level). `out` was checked by check_destination
    before the work that made the composition."""

    def fill(tmp: Path) -> None:
        if recipe.level == "task":
            _write_adapter(tmp, adapters[0], recipe)
            return
        from safetensors.torch import save_file

        for entry, adapter in zip(recipe.compositions, adapters):
            _write_adapter(tmp / entry["folder"], adapter, recipe.shot(entry))
        save_file({"shots": router.contiguous()}, tmp / ROUTER_FILE)
        recipe.save(tmp)
        (tmp / MODEL_CARD).write_text(instance_card(recipe), encoding="utf-8")

    return outputs.write_folder(out, fill, overwrite=overwrite)


def _write_adapter(tmp: Path, adapter: LoraAdapter, recipe: Recipe) -> None:
    save_adapter(adapter, tmp)
    recipe.save(tmp)
    (tmp / MODEL_CARD).write_text(model_card(recipe), encoding="utf-8")


def read_composition(folder: Path, hint: str = READ_HINT) -> Recipe:
    """The recipe of the composition in `folder`, checked (Recipe.load); an instance-level one's shot folders
    must be folders inside it and its router must be there. Any fault is a one-line InputError with `hint`."""
    folder = Path(folder)
    if not holds_composition(folder):
        raise InputError(f"'{folder}' has no {RECIPE_FILE}.", hint)
    recipe = Recipe.load(folder / RECIPE_FILE)
    if recipe.level == "instance":
        root = folder.resolve()
        for entry in recipe.compositions:
            shot = folder / entry["folder"]
            # The recipe decides which folders are read and uploaded: it must not reach outside this one.
            if not shot.resolve().is_relative_to(root) or shot.resolve() == root or not shot.is_dir():
                raise InputError(
                    f"{folder / RECIPE_FILE} lists composition folder '{entry['folder']}', "
                    f"which is not a folder inside '{folder}'.",
                    hint,
                )
        if not (folder / ROUTER_FILE).is_file():
            raise InputError(f"'{folder}' is an instance-level composition without {ROUTER_FILE}.", hint)
    return recipe


def read_instance_composition(folder: Path, hint: str = READ_HINT):
    """(recipe, the shots' adapters in recipe order, the (K, dim) router) of an instance-level folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    recipe = read_composition(folder, hint)
    if recipe.level != "instance":
        raise InputError(f"'{folder}' is not an instance-level composition (no router).", hint)
    adapters = [load_adapter(folder / entry["folder"], name=entry["folder"]) for entry in recipe.compositions]
    return recipe, adapters, load_file(folder / ROUTER_FILE)["shots"]


def adapter_folders(folder: Path, recipe: Recipe) -> list[Path]:
    """The folders of `folder`'s composition that hold a PEFT adapter (with its recipe and cards)."""
    folder = Path(folder)
    return [folder] if recipe.level == "task" else [folder / entry["folder"] for entry in recipe.compositions]


def composition_files(folder: Path, recipe: Recipe) -> list[Path]:
    """Every file the composition in `folder` is made of (what `push` uploads): each adapter folder's files,
    its model card and embedding card when they are there, and the instance level's recipe, card and router."""
    folder = Path(folder)
    files = []
    for adapter in adapter_folders(folder, recipe):
        files += [adapter / name for name in TASK_FILES] + _extras(adapter)
    if recipe.level == "instance":
        files += [folder / RECIPE_FILE, *_extras(folder), folder / ROUTER_FILE]
    return files


def _extras(folder: Path) -> list[Path]:
    """The model card and the embedding card (both of its files) when they are there."""
    extras = [folder / MODEL_CARD] if (folder / MODEL_CARD).is_file() else []
    if any((folder / name).is_file() for name in CARD_FILES):
        extras += [folder / name for name in CARD_FILES]
    return extras


# --- the model card (README.md) --------------------------------------------------------------------


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
    lines = [
        "",
        "## Use",
        "",
        "With lorahub, answer with it from this folder (or, once pushed, from a download of it):",
        "",
        "```bash",
        'lorahub generate --adapter PATH --inputs requests.jsonl   # one {"input": ...} per line',
        "lorahub serve --adapter PATH                              # POST /v1/generate, /v1/completions",
        "```",
        "",
    ]
    if local is not None:
        # A model shipped inside lorahub (the demo's): it is not on the Hub, so name where it is.
        lines += [
            f"`{recipe.base_model}` is not on the Hub: it ships inside lorahub (`pip install lorahub-cli`), "
            "whose commands resolve that name to their own copy. With PEFT, load the base from that copy:",
            "",
        ]
    else:
        lines += ["With PEFT:", ""]
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
        "shows the first composition.\n\n"
        "Answer with it, each input routed to its example's composition:\n\n"
        "```bash\nlorahub generate --composition PATH --inputs requests.jsonl\nlorahub serve --composition PATH\n```\n"
    )
