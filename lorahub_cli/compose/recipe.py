"""The recipe of a composition: everything needed to rebuild it, as `lorahub_recipe.json`.

A task-level recipe names its modules (registry id, source, revision, sha256, weight), the
formula and its options (dare_linear's seed included), the search that found the weights
and the few-shot loss of the exported adapter. An instance-level recipe holds one such
entry per shot under `compositions` and the `router` that sends an input to its nearest
shot (the shots' embeddings are in the folder's router file: compose/folder.py).

`Recipe.load` checks every field a reader uses, so a hand-edited or truncated recipe is a
one-line error naming the field, never a KeyError deep in a rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from .. import __version__
from ..errors import InputError
from ..io import atomic_write_json, read_json

RECIPE_FILE = "lorahub_recipe.json"
FORMAT = 1
LEVELS = ("task", "instance")

_HINT = "Give a lorahub_recipe.json written by lorahub compose (or compose again)."


def check_level(level: str) -> str:
    """A composition's (and a retrieval's) level: task or instance."""
    if level not in LEVELS:
        raise InputError(f"--level must be 'task' or 'instance', not '{level}'.", "Example: --level instance")
    return level


_NUMBER = (int, float)
_MODULE = {"id": str, "source": str, "revision": (str, type(None)), "sha256": str, "weight": _NUMBER}
_COMPOSITION = {"shot": int, "folder": str, "modules": list, "search": (dict, type(None)), "loss": _NUMBER}
_ROUTER = {"file": str, "embedder": str, "instruction": str, "shots": list}
STOPS = ("budget", "converged", "stalled", "nonfinite")  # why a search ended (search.py)


@dataclass
class Recipe:
    level: str  # task | instance
    base_model: str
    formula: str
    task_type: str | None = None
    formula_options: dict = field(default_factory=dict)  # resolved: every option the merge used, seed included
    selection: dict = field(default_factory=dict)  # how the modules were chosen
    shots: dict = field(default_factory=dict)  # path, sha256, count of the shots file
    dtype: str = "float32"  # of every reported number and of the exported tensors
    search_precision: str | None = None  # what the search evaluated candidates in (fp32, bf16, int8); None: no search
    device: str = "cpu"
    versions: dict = field(default_factory=dict)
    # task level
    modules: list[dict] = field(default_factory=list)  # {id, source, revision, sha256, weight}
    search: dict | None = None  # SearchConfig + what the search did; None: fixed weights
    loss: float | None = None  # few-shot loss of the exported adapter itself, in float32
    objective: float | None = None  # loss + l1 * mean |w|, in float32 (recipes before 11 §3 lack it)
    # instance level
    warm_start: dict | None = None
    compositions: list[dict] = field(default_factory=list)  # {shot, folder, modules, search, loss}
    router: dict | None = None  # {file, embedder, instruction, shots}
    format: int = FORMAT
    lorahub_version: str = __version__
    created_at: str = ""

    # --- reading what a composition is -----------------------------------------------------

    @property
    def weights(self) -> dict[str, float]:
        return {m["id"]: m["weight"] for m in self.modules}

    def shot(self, entry: dict) -> Recipe:
        """The task-level recipe of one instance-level composition (written in its own folder)."""
        return Recipe(
            **{
                **self._fields(),
                "level": "task",
                "modules": entry["modules"],
                "search": entry["search"],
                "loss": entry["loss"],
                "objective": entry.get("objective"),
                "warm_start": None,
                "compositions": [],
                "router": None,
            }
        )

    # --- JSON ------------------------------------------------------------------------------

    _ORDER = (
        "format",
        "lorahub_version",
        "created_at",
        "level",
        "base_model",
        "task_type",
        "formula",
        "formula_options",
        "selection",
        "shots",
        "dtype",
        "search_precision",
        "device",
        "versions",
    )

    def _fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> dict:
        data = {name: getattr(self, name) for name in self._ORDER}
        if self.level == "task":
            data.update(modules=self.modules, search=self.search, loss=self.loss)
            if self.objective is not None:
                data["objective"] = self.objective
        else:
            if self.warm_start is not None:
                data["warm_start"] = self.warm_start
            data.update(compositions=self.compositions, router=self.router)
        return data

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / RECIPE_FILE
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """From a composition folder or its lorahub_recipe.json; a missing or wrong field is a one-line InputError."""
        path = Path(path)
        if path.is_dir():
            path = path / RECIPE_FILE
        if not path.is_file():
            raise InputError(f"'{path}' does not exist.", _HINT)
        return cls.from_json(read_json(path, _HINT), str(path))

    @classmethod
    def from_json(cls, data, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise InputError(f"{where} holds a {type(data).__name__}, not a JSON object.", _HINT)
        check = _Checker(where)
        check.fields(data, {"level": str, "base_model": str, "formula": str}, "")
        if data["level"] not in LEVELS:
            raise InputError(f"{where}: field 'level' is '{data['level']}', not task or instance.", _HINT)
        optional = {
            "task_type": (str, type(None)),
            "formula_options": dict,
            "selection": dict,
            "shots": dict,
            "dtype": str,
            "search_precision": (str, type(None)),
            "device": str,
            "versions": dict,
            "format": int,
            "lorahub_version": str,
            "created_at": str,
        }
        check.fields(data, optional, "", required=False)
        if data.get("format", FORMAT) != FORMAT:
            raise InputError(
                f"{where}: recipe format {data['format']} is not {FORMAT}.",
                "Upgrade lorahub: pip install -U lorahub-cli",
            )
        if data["level"] == "task":
            check.fields(data, {"modules": list, "loss": _NUMBER}, "")
            check.fields(data, {"search": (dict, type(None)), "objective": _NUMBER}, "", required=False)
            check.modules(data["modules"], "modules")
            check.search(data.get("search"), "search")
        else:
            check.fields(data, {"compositions": list, "router": dict}, "")
            check.fields(data, {"warm_start": (dict, type(None))}, "", required=False)
            if not data["compositions"]:
                raise InputError(f"{where}: field 'compositions' is empty.", _HINT)
            for j, entry in enumerate(data["compositions"]):
                check.fields(entry, _COMPOSITION, f"compositions[{j}].")
                check.fields(entry, {"objective": _NUMBER}, f"compositions[{j}].", required=False)
                check.modules(entry["modules"], f"compositions[{j}].modules")
                check.search(entry["search"], f"compositions[{j}].search")
            check.fields(data["router"], _ROUTER, "router.")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fields(self, obj, spec: dict, prefix: str, *, required: bool = True) -> None:
        if not isinstance(obj, dict):
            raise InputError(
                f"{self.where}: field '{prefix.rstrip('.')}' must be an object, got {type(obj).__name__}.", _HINT
            )
        for name, kind in spec.items():
            if name not in obj:
                if required:
                    raise InputError(f"{self.where}: field '{prefix}{name}' is missing.", _HINT)
                continue
            value = obj[name]
            if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, _NUMBER)):
                raise InputError(
                    f"{self.where}: field '{prefix}{name}' has the wrong type ({type(value).__name__}: "
                    f"{str(value)[:40]!r}).",
                    _HINT,
                )

    def search(self, search: dict | None, name: str) -> None:
        """What a search did: how many evaluations, why it stopped (recipes before issue 19 lack `stop`), where it
        started (`start`, the subspace search's)."""
        if search is None:
            return
        self.fields(search, {"evaluations": int}, f"{name}.")
        self.fields(search, {"stop": str, "start": dict, "phases": list}, f"{name}.", required=False)
        if search.get("stop", STOPS[0]) not in STOPS:
            raise InputError(
                f"{self.where}: field '{name}.stop' is '{search['stop']}', not one of {', '.join(STOPS)}.", _HINT
            )

    def modules(self, modules: list, name: str) -> None:
        if not modules:
            raise InputError(f"{self.where}: field '{name}' is empty.", _HINT)
        for i, module in enumerate(modules):
            self.fields(module, _MODULE, f"{name}[{i}].")
