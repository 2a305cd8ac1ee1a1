"""A registry's adapters as one library of weight cards: the cards checked (or made where missing), stacked into
one index cached under the home, the background each score is calibrated against, and the two-stage ranking
retrieval uses (`WeightScorer`).

Cache (`$LORAHUB_HOME/cache/weights/`, derived data: deleting it only costs the time to build it again):
  index-<key>.safetensors       the stacked prototypes and directions of every adapter; key: the sha256 of
                                every (id, weight card sha256, weights sha256) and the card format
  background-<key>.safetensors  the background's mean and principal directions per module; key: the base
                                model (its name and, for a folder, its files' sizes and times), the modules,
                                the background's seed, size and kind (with or without targets)
  reference-<key>.safetensors   every adapter's layer scores on that background, per scorer
Each holds the sha256 of its contents; a file that fails it is built again. Nothing is written to a home that
is not writable: the index is then built in memory for the command.

Two stages (docs/weights.md): above `shortlist` adapters, a cheap scorer (Arrow's centroid, one product row
per module over a bfloat16 copy of the prototypes) ranks every adapter, and the default scorer re-ranks the
`shortlist` best of each query plus an evenly spaced sample of as many (whose scores estimate the whole
library's mean and spread, for a registry whose data and weight cards are ranked together).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..compose.adapters import load_adapter
from ..errors import InputError, LorahubError
from ..io import Example, atomic_write_bytes, sha256_file
from ..models import BaseModel
from ..registry.store import SAFETENSORS_FILE, WEIGHT_CARD, AdapterRecord, Store
from ..settings import WEIGHTS
from . import scores
from .card import FORMAT_VERSION, WeightCard, build_weight_card, damaged, load_checked, write_weight_card

CACHE = ("cache", "weights")
MAX_CACHED = 4  # index files kept per cache folder (a few base models or registry states); older ones go

# --- the cards ------------------------------------------------------------------------------------------


def card_problem(record: AdapterRecord) -> str | None:
    """Why a recorded weight card does not belong to its adapter's weights, or None: `registry verify`'s check
    (the card's own hash, the weights it was built from, and the singular values its adapter reproduces)."""
    try:
        card, adapter = load_checked(record.path, record.id, record.files[SAFETENSORS_FILE])
        card.spectra(adapter, record.id)
    except LorahubError as error:
        return error.message
    return None


def stale(record: AdapterRecord) -> str | None:
    """Why `registry rebuild` must make a record's weight card again, or None: it is missing, its file is not
    the one recorded, it is damaged or of another format, or it was built from other weights."""
    if not record.has_weight_card:
        return "missing"
    path = record.path / WEIGHT_CARD
    if path.is_symlink() or not path.is_file() or sha256_file(path) != record.files[WEIGHT_CARD]:
        return "its file is not the one the registry recorded"
    try:
        card = WeightCard.load(record.path, record.id)
    except LorahubError as error:
        return error.message
    if card.adapter_sha256 != record.files[SAFETENSORS_FILE]:
        return "it was built from other weights"
    if card.directions != min(card.rank, WEIGHTS["card_directions"]):
        return f"it keeps {card.directions} directions, not {min(card.rank, WEIGHTS['card_directions'])}"
    return None


def make_card(store: Store, record: AdapterRecord) -> AdapterRecord:
    """Write a stored adapter's weight card into its folder (a temporary file, then a rename) and record it."""
    store.check_file(record, SAFETENSORS_FILE)
    return store.set_weight_card(record.id, write_weight_card(record.path, record.id, record.files[SAFETENSORS_FILE]))


def ensure_cards(
    store: Store, records: list[AdapterRecord], progress=None
) -> tuple[list[AdapterRecord], list[str], list[dict]]:
    """Every record with a current weight card, made where `stale` says so. Returns (the records, the ids whose
    card was made, {"id", "problem"} of those it could not be made for: weights lorahub cannot read as LoRA)."""
    out, built, failed = [], [], []
    for record in records:
        if stale(record) is not None:
            try:
                record = make_card(store, record)
                built.append(record.id)
            except LorahubError as error:
                failed.append({"id": record.id, "problem": error.message})
        out.append(record)
        if progress:
            progress()
    return out, built, failed


def _entries(store: Store, record: AdapterRecord, writer: Store | None) -> dict:
    """{module: (the m leading scaled right singular vectors, S)} of one adapter, from its weight card: checked
    against the registry's hashes, or made (and, with a `writer`, stored) when it has none."""
    weights = store.check_file(record, SAFETENSORS_FILE)
    if record.has_weight_card:
        path = record.path / WEIGHT_CARD
        if path.is_symlink() or not path.is_file() or sha256_file(path) != record.files[WEIGHT_CARD]:
            raise damaged(record.id, ValueError("its file is not the one the registry recorded"))
        card, adapter = load_checked(record.path, record.id, record.files[SAFETENSORS_FILE])
    else:
        adapter = load_adapter(weights.parent, record.id)
        card = build_weight_card(adapter, record.files[SAFETENSORS_FILE])
        if writer is not None:
            writer.set_weight_card(record.id, card.save(record.path))
    spectra = card.spectra(adapter, record.id)
    return {m: (spectra[m], card.sigma[row]) for row, m in enumerate(card.modules)}


# --- the cache ------------------------------------------------------------------------------------------


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]] | None:
    """A cache file's (metadata, tensors), or None when it is missing, a link or fails its sha256."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        raw = path.read_bytes()
        tensors = load(raw)
        size = int.from_bytes(raw[:8], "little")
        meta = dict(json.loads(raw[8 : 8 + size]).get("__metadata__") or {})
    except (OSError, ValueError, SafetensorError):
        return None
    if meta.pop("sha256", None) != _digest(meta, tensors):
        return None
    return meta, tensors


def _write(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """Write a cache file (temporary file, then rename); a failure only means no cache."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save(tensors, metadata={**meta, "sha256": _digest(meta, tensors)}))
    except OSError:
        return
    kept = sorted(path.parent.glob(f"{path.name.split('-')[0]}-*.safetensors"), key=lambda p: -p.stat().st_mtime)
    for old in kept[MAX_CACHED:]:
        old.unlink(missing_ok=True)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cache_dir(store: Store) -> Path | None:
    """Where a registry's derived weight data goes, or None when its home cannot be written."""
    if not os.access(store.home, os.W_OK):
        return None
    folder = store.home.joinpath(*CACHE)
    return None if any(p.is_symlink() for p in (folder.parent, folder)) else folder


def _index_to_tensors(index: scores.WeightIndex) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    meta = {"ids": json.dumps(index.ids), "modules": json.dumps(index.modules), "rank": str(index.rank)}
    tensors = {"present": index.present.to(torch.uint8)}
    for row, module in enumerate(index.modules):
        tensors[f"prototypes.{row}"], tensors[f"spectra.{row}"] = index.prototypes[module], index.spectra[module]
    return meta, tensors


def _index_from_tensors(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> scores.WeightIndex:
    modules = json.loads(meta["modules"])
    return scores.WeightIndex(
        json.loads(meta["ids"]),
        modules,
        int(meta["rank"]),
        {m: tensors[f"prototypes.{row}"] for row, m in enumerate(modules)},
        {m: tensors[f"spectra.{row}"] for row, m in enumerate(modules)},
        tensors["present"].bool(),
    )


def registry_index(store: Store, records: list[AdapterRecord]) -> WeightLibrary:
    """The weight index of `records` (one base model's), from the cache when its key matches, else from the
    weight cards (checked; made for adapters that have none, and recorded when the home is writable, so an
    existing registry gets its cards when first ranked by them) and then cached. Adapters whose weights
    lorahub cannot read as LoRA are left out (`WeightLibrary.left_out`)."""
    if not records:
        raise InputError("no adapters to rank by their weights.", "Add adapters with: lorahub registry add SOURCE")
    folder = cache_dir(store)
    writer = None
    if folder is not None and any(not r.has_weight_card for r in records):
        writer = store if not store.readonly else Store(store.home)
    cards = sorted((r.id, r.files.get(WEIGHT_CARD), r.files[SAFETENSORS_FILE]) for r in records)
    key = _key(FORMAT_VERSION, WEIGHTS["card_directions"], cards)
    path = folder / f"index-{key}.safetensors" if folder else None
    cached = _read(path) if path else None
    if cached is not None:
        index = _index_from_tensors(*cached)
        return WeightLibrary(index, key, json.loads(cached[0].get("left_out", "[]")))
    entries, left_out = {}, []
    for record in records:
        try:
            entries[record.id] = _entries(store, record, writer)
        except LorahubError as error:
            if record.has_weight_card or not isinstance(error, InputError):
                raise  # a damaged card or corrupted weights: an error naming the fix
            left_out.append({"id": record.id, "problem": error.message})
    if not entries:
        raise InputError(
            "no adapter's weights could be read as a LoRA to rank it by.", left_out[0]["problem"] if left_out else ""
        )
    index = scores.WeightIndex.from_spectra(entries)
    if path is not None:
        meta, tensors = _index_to_tensors(index)
        _write(path, {**meta, "left_out": json.dumps(left_out)}, tensors)
    return WeightLibrary(index, key, left_out)


# --- backgrounds ----------------------------------------------------------------------------------------


def model_identity(base: BaseModel) -> dict:
    """What a background depends on in the base model: its name and, for a folder, its files' sizes and times."""
    identity = {"name": base.name, "dtype": str(base.dtype)}
    folder = Path(base.name or "")
    if base.name and folder.is_dir():
        identity["files"] = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()
        )
    return identity


@dataclass
class WeightLibrary:
    """A registry's weight index, its cache key, and the adapters left out of it ({"id", "problem"})."""

    index: scores.WeightIndex
    key: str
    left_out: list[dict]


class References:
    """The backgrounds of one base model over a library's modules and every adapter's layer scores on them,
    computed when first asked for and cached (see the module docstring)."""

    def __init__(self, library: WeightLibrary, base: BaseModel, folder: Path | None, seed: int, sequences: int):
        self.library, self.base, self.folder = library, base, folder
        self.seed, self.sequences = seed, sequences
        self._backgrounds: dict[bool, scores.Background] = {}
        self._references: dict[tuple[str, bool], torch.Tensor] = {}

    def _background_key(self, with_targets: bool) -> str:
        index = self.library.index
        return _key(model_identity(self.base), index.modules, self.seed, self.sequences, with_targets)

    def background(self, with_targets: bool, inputs: bool = False) -> scores.Background:
        """The background summary (with its `inputs` when asked: they are not cached)."""
        found = self._backgrounds.get(with_targets)
        if found is not None and (found.inputs is not None or not inputs):
            return found
        key = self._background_key(with_targets)
        path = self.folder / f"background-{key}.safetensors" if self.folder else None
        cached = _read(path) if path and not inputs else None
        if cached is not None and "constant" in cached[1]:  # (a file from before `constant` is built again)
            modules = self.library.index.modules
            tensors = cached[1]
            found = scores.Background(
                {m: tensors[f"mean.{row}"] for row, m in enumerate(modules) if f"mean.{row}" in tensors},
                {m: tensors[f"directions.{row}"] for row, m in enumerate(modules) if f"directions.{row}" in tensors},
                constant={m for row, m in enumerate(modules) if tensors["constant"][row]},
            )
        else:
            modules = self.library.index.modules
            found = scores.background(self.base, modules, with_targets, self.seed, self.sequences)
            if path is not None:
                tensors = {"constant": torch.tensor([m in found.constant for m in modules], dtype=torch.uint8)}
                for row, m in enumerate(modules):
                    if m in found.mean:
                        tensors[f"mean.{row}"], tensors[f"directions.{row}"] = found.mean[m], found.directions[m]
                _write(path, {}, tensors)
        self._backgrounds[with_targets] = found
        return found

    def reference(self, scorer: scores.Scorer, with_targets: bool) -> torch.Tensor:
        """(L, n): every adapter's layer scores under `scorer` on the background."""
        if (scorer.name, with_targets) in self._references:
            return self._references[(scorer.name, with_targets)]
        key = _key(self.library.key, self._background_key(with_targets))
        path = self.folder / f"reference-{key}.safetensors" if self.folder else None
        cached = _read(path) if path else None
        stored = dict(cached[1]) if cached else {}
        if scorer.name not in stored:
            stored[scorer.name] = scores.reference(self.library.index, self.background(with_targets, True), scorer)
            if path is not None:
                _write(path, {}, stored)
        self._references[(scorer.name, with_targets)] = stored[scorer.name]
        return stored[scorer.name]


def dtype_name(base: BaseModel) -> str:
    return str(base.dtype).removeprefix("torch.")


# --- ranking --------------------------------------------------------------------------------------------


@dataclass
class WeightScores:
    """Calibrated scores (groups, n): -inf for adapters the second stage did not re-rank; `mean` and `std`
    (groups,): the default scorer's mean and spread over the whole library (estimated from the sample in
    two stages), what `retrieval.merge` standardises by."""

    values: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


class WeightScorer:
    """Ranks a library's adapters for examples by their weight cards (the `weights` of retrieval.Retriever)."""

    def __init__(
        self,
        library: WeightLibrary,
        base: BaseModel,
        references: References,
        scorer: scores.Scorer = scores.DEFAULT_SCORER,
        shortlist_scorer: scores.Scorer = scores.SHORTLIST_SCORER,
        shortlist: int = WEIGHTS["shortlist"],
    ):
        self.library, self.base, self.references = library, base, references
        self.scorer, self.shortlist_scorer, self.shortlist = scorer, shortlist_scorer, shortlist
        self.first_stage: scores.WeightIndex | None = None  # the prototypes in bfloat16, made when first needed

    @property
    def ids(self) -> list[str]:
        return self.library.index.ids

    @property
    def description(self) -> dict:
        return {
            "scorer": self.scorer.name,
            "shortlist": {"scorer": self.shortlist_scorer.name, "size": self.shortlist}
            if len(self.ids) > self.shortlist
            else None,
            # the scores are float32; the layer inputs are the base model's own, in the dtype it runs in
            "dtype": "float32"
            if self.base.dtype == torch.float32
            else f"float32 scores of {dtype_name(self.base)} inputs",
            "base_model": self.base.name,
        }

    def inputs(self, examples: list[Example], merged: bool) -> scores.LayerInputs:
        """The base model's layer inputs on the examples: one forward pass (merged: one group for all)."""
        inputs = scores.capture_layer_inputs(self.base, examples, self.library.index.modules)
        return inputs.merged() if merged else inputs

    def score(self, examples: list[Example], merged: bool, spread: bool = True) -> WeightScores:
        with_targets = all(e.target is not None for e in examples)
        return self.rank(self.inputs(examples, merged), with_targets, spread)

    def rank(self, inputs: scores.LayerInputs, with_targets: bool, spread: bool = True) -> WeightScores:
        """The scores of captured inputs (the time after the forward pass: what bench/weight_cards.py measures).
        `spread`: estimate the library's mean and spread (a mixed ranking standardises by them); without it, two
        stages re-rank the shortlist alone and `mean` and `std` are NaN."""
        index, scorer = self.library.index, self.scorer
        background = self.references.background(with_targets)
        reference = self.references.reference(scorer, with_targets)
        n = len(index.ids)
        if n <= self.shortlist:
            values = scores.score(index, inputs, scorer, background, reference)
            return WeightScores(values, values.mean(dim=1), values.std(dim=1, unbiased=False))
        cheap = scores.score(
            self.first(),
            inputs,
            self.shortlist_scorer,
            background,
            self.references.reference(self.shortlist_scorer, with_targets),
        )
        best = torch.topk(cheap, self.shortlist, dim=1).indices.reshape(-1)
        sample = torch.linspace(0, n - 1, self.shortlist).round().long()
        positions = torch.unique(torch.cat([best, sample]) if spread else best)
        values = torch.full((inputs.groups, n), float("-inf"))
        values[:, positions] = scores.score(
            index.subset(positions, prototypes=scorer.method == "arrow", spectra=scorer.method == "spectr"),
            inputs,
            scorer,
            background,
            reference[:, positions],
        )
        if not spread:
            nan = torch.full((inputs.groups,), float("nan"))
            return WeightScores(values, nan, nan)
        sampled = values[:, sample]
        return WeightScores(values, sampled.mean(dim=1), sampled.std(dim=1, unbiased=False))

    def first(self) -> scores.WeightIndex:
        """The first stage's index: the prototypes alone, in bfloat16 (half the bytes every query reads)."""
        if self.first_stage is None:
            index = self.library.index
            self.first_stage = scores.WeightIndex(
                index.ids, index.modules, 1, {m: p.bfloat16() for m, p in index.prototypes.items()}, {}, index.present
            )
        return self.first_stage
