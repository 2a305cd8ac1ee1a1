"""Training data for cards: a local JSONL file or a dataset repository on the Hub.

A Hub dataset is read file by file (JSONL, JSON, CSV or Parquet) at a pinned
commit, filtered row by row, and reading stops once enough examples are found,
so a large multi-task dataset is not downloaded whole when one task is wanted.

Two multi-task layouts are understood (docs/registry.md):
- one file per task, as lorahub/flanv2: `<task>.json` or `<task>:<anything>.json` holding JSON Lines;
  a `task=NAME` (or `task_name=NAME`) filter picks that file by its stem and no other file is downloaded;
- one table with a `task` or `task_name` column, filtered row by row.
The bytes downloaded for one card are bounded (MAX_DOWNLOAD_BYTES).
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..io import Example, read_examples, sha256_file
from ..settings import CARD_MAX_EXAMPLES
from .card import TextRecipe

INPUT_FIELDS = ("input", "inputs", "instruction", "prompt", "question", "text", "source")
TARGET_FIELDS = ("target", "targets", "output", "completion", "answer", "response", "label")
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
TASK_FIELDS = ("task", "task_name")  # the names a task column goes by; a filter on either matches both
MAX_DOWNLOAD_BYTES = 512 << 20
SPEC = re.compile(r"^(?P<repo>[\w.\-]+/[\w.\-]+)(?::(?P<config>[\w.\-]+))?(?:@(?P<split>[\w.\-]+))?$")


@dataclass(frozen=True)
class DatasetSpec:
    repo_id: str
    config: str | None = None
    split: str = "train"

    @classmethod
    def parse(cls, text: str) -> DatasetSpec:
        match = SPEC.match(text.strip())
        if not match:
            raise InputError(
                f"dataset '{text}' is not of the form HUB_ID[:CONFIG][@SPLIT].", "Example: lorahub/flanv2@train"
            )
        return cls(match["repo"], match["config"], match["split"] or "train")


@dataclass
class CardOptions:
    """How a card is built: where its training examples come from, how many, and how they are embedded
    (`registry add`, `card build`, `registry sync --cards`). Checked once, here, before anything is read."""

    data: Path | None = None  # a JSONL file of input / target lines
    dataset: str | None = None  # or a Hub dataset: HUB_ID[:CONFIG][@SPLIT]
    filters: list[str] = field(default_factory=list)  # FIELD=VALUE: the dataset rows to keep
    input_field: str | None = None  # default: the first of INPUT_FIELDS present
    target_field: str | None = None  # default: the first of TARGET_FIELDS present
    max_examples: int = CARD_MAX_EXAMPLES
    embedder: str | None = None  # default: settings.DEFAULT_EMBEDDER
    inputs_only: bool = False  # embed inputs only (LoraRetriever's text recipe) instead of input + target
    instruction: str = ""  # put before every input, with inputs_only

    def __post_init__(self):
        self.filters = list(self.filters or [])
        if self.instruction and not self.inputs_only:
            raise InputError("--instruction goes with --inputs-only (LoraRetriever's recipe).", "Add --inputs-only.")
        if (self.data is None) == (self.dataset is None):
            raise InputError(
                "give exactly one of --data FILE.jsonl or --dataset HUB_ID.", "See: lorahub card build --help"
            )
        if self.data is not None and self.filters:
            raise InputError("--filter applies to --dataset only.", "Filter the JSONL file before building the card.")
        if self.max_examples < 1:
            raise InputError(f"--max-examples {self.max_examples} is too small.", "Give --max-examples 1 or more.")
        if self.dataset is not None:
            DatasetSpec.parse(self.dataset)
            parse_filters(self.filters)

    @property
    def text_recipe(self) -> TextRecipe:
        return TextRecipe("input" if self.inputs_only else "input+target", self.instruction)


def parse_filters(filters: list[str] | None) -> dict[str, str]:
    parsed = {}
    for item in filters or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InputError(f"filter '{item}' is not FIELD=VALUE.", "Example: --filter task=ag_news_subset")
        parsed[name] = value
    return parsed


def from_jsonl(
    path: Path, input_field: str | None, target_field: str | None, max_examples: int
) -> tuple[list[Example], dict]:
    examples = read_examples(path, input_field=input_field or "input", target_field=target_field)
    return examples[:max_examples], {"type": "file", "path": str(Path(path).resolve()), "sha256": sha256_file(path)}


def _pick(row: dict, wanted: str | None, candidates: tuple[str, ...], where: str) -> str:
    names = (wanted,) if wanted else candidates
    for name in names:
        if name in row and row[name] is not None:
            return str(row[name])
    flag = "--input-field" if candidates is INPUT_FIELDS else "--target-field"
    raise InputError(
        f"{where}: no field {' or '.join(repr(n) for n in names)}; the rows have {sorted(row)}.",
        f"Name the field with {flag}.",
    )


def _json_is_lines(path: Path) -> bool:
    """Whether a `.json` file holds JSON Lines (one object per line) rather than one JSON document."""
    with open(path, encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "")
    if first.lstrip().startswith("["):
        return False
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False  # a document that spans several lines
    # A one-line document wraps its rows in a list ({"data": [...]}); a JSON Lines row does not.
    return isinstance(obj, dict) and not any(isinstance(v, list) and v and isinstance(v[0], dict) for v in obj.values())


def _json_lines(path: Path, opener=open):
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except (json.JSONDecodeError, RecursionError) as error:
                    raise InputError(
                        f"{path.name}:{number}: not valid JSON ({error}).", "The dataset file is malformed."
                    ) from None


def _rows(path: Path):
    """Yield dict rows from a data file of any supported format."""
    name = path.name
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"reading '{name}' needs pyarrow.", "Install it with: pip install pyarrow") from None
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    elif name.endswith((".jsonl", ".jsonl.gz")):
        yield from _json_lines(path, gzip.open if name.endswith(".gz") else open)
    elif name.endswith(".json"):
        if _json_is_lines(path):
            yield from _json_lines(path)
            return
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), [])
        yield from data
    else:
        with open(path, newline="", encoding="utf-8") as handle:
            yield from csv.DictReader(handle)


def task_stem(filename: str) -> str:
    """The task a per-task data file holds: its name without the data suffix, up to any ':' (lorahub/flanv2)."""
    name = Path(filename).name
    for suffix in DATA_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.split(":", 1)[0]


def _data_files(files: list[str], spec: DatasetSpec) -> list[str]:
    """The repo's data files for the requested config and split, in a stable order."""
    data = sorted(f for f in files if f.endswith(DATA_SUFFIXES) and not f.startswith("."))
    if spec.config:
        data = [f for f in data if f"/{spec.config}/" in f"/{f}" or Path(f).name.startswith(spec.config)]
    split = [f for f in data if re.search(rf"(^|[/_.\-]){re.escape(spec.split)}([/_.\-]|$)", f)]
    # A repo whose file names mention no split at all holds a single (train) split.
    return split or (data if spec.split == "train" else [])


def _task_filter(filters: dict[str, str]) -> tuple[str | None, str | None]:
    return next(((k, v) for k, v in filters.items() if k in TASK_FIELDS), (None, None))


def _matches(row: dict, filters: dict[str, str], where: str) -> bool:
    for key, value in filters.items():
        names = TASK_FIELDS if key in TASK_FIELDS else (key,)
        present = [n for n in names if n in row]
        if not present:
            raise InputError(
                f"{where}: the rows have no {' or '.join(repr(n) for n in names)} field to filter on "
                f"(fields: {sorted(row)}), and no data file is named after {value!r}.",
                "Check the --filter field, or the task name against the dataset's file names.",
            )
        if str(row[present[0]]) != value:
            return False
    return True


def from_hub_dataset(
    spec: DatasetSpec,
    filters: dict[str, str],
    input_field: str | None,
    target_field: str | None,
    max_examples: int,
    max_download_bytes: int = MAX_DOWNLOAD_BYTES,
) -> tuple[list[Example], dict]:
    from huggingface_hub import hf_hub_download

    from ..hub import api, endpoint, hub_errors

    with hub_errors(spec.repo_id):
        info = api().dataset_info(spec.repo_id, files_metadata=True)
    siblings = {s.rfilename: s.size for s in info.siblings or []}
    files = _data_files(list(siblings), spec)
    if not files:
        raise InputError(
            f"dataset '{spec.repo_id}' has no {'/'.join(DATA_SUFFIXES)} files for "
            f"config {spec.config or '(any)'} and split '{spec.split}'.",
            "Check the config and split names in HUB_ID[:CONFIG][@SPLIT].",
        )
    task_key, task = _task_filter(filters)
    layout = "table"
    if task is not None and (per_task := [f for f in files if task_stem(f) == task]):
        files, layout = per_task, "per-task file"
        filters = {k: v for k, v in filters.items() if k != task_key}  # the file is the filter
    examples: list[Example] = []
    downloaded = 0
    for name in files:
        size = siblings.get(name) or 0
        if downloaded + size > max_download_bytes:
            if examples:
                break
            raise InputError(
                f"building this card would download more than {max_download_bytes >> 20} MiB of '{spec.repo_id}' "
                f"(next: {name}, {size >> 20} MiB).",
                "Name a smaller config (HUB_ID:CONFIG), or build the card from a local file with --data.",
            )
        with hub_errors(spec.repo_id):
            local = Path(
                hf_hub_download(spec.repo_id, name, repo_type="dataset", revision=info.sha, endpoint=endpoint())
            )
        downloaded += local.stat().st_size
        where = f"{spec.repo_id}/{name}"
        for row in _rows(local):
            if not _matches(row, filters, where):
                continue
            examples.append(
                Example(_pick(row, input_field, INPUT_FIELDS, where), _pick(row, target_field, TARGET_FIELDS, where))
            )
            if len(examples) >= max_examples:
                break
        if len(examples) >= max_examples:
            break
    if not examples:
        raise InputError(
            f"no rows of dataset '{spec.repo_id}' match {filters or ({task_key: task} if task else 'the split')}.",
            "Check the --filter field and value.",
        )
    source = {
        "type": "hub-dataset",
        "repo_id": spec.repo_id,
        "revision": info.sha,
        "config": spec.config,
        "split": spec.split,
        "filters": {**filters, **({task_key: task} if task else {})},
        "layout": layout,
        "files": files if layout == "per-task file" else None,
    }
    return examples, source


def load_training_data(options: CardOptions) -> tuple[list[Example], dict]:
    """(examples, provenance) from the JSONL file or the Hub dataset `options` names."""
    o = options
    if o.data is not None:
        return from_jsonl(o.data, o.input_field, o.target_field, o.max_examples)
    spec, filters = DatasetSpec.parse(o.dataset), parse_filters(o.filters)
    return from_hub_dataset(spec, filters, o.input_field, o.target_field, o.max_examples)
