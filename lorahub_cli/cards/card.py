"""An embedding card: the centroid of an adapter's training examples in a sentence-embedding space.

Files, next to the adapter:
  lorahub_card.safetensors   centroid (dim,), and optionally examples (m, dim), float32, L2-normalised
  lorahub_card.json          embedder, text recipe, counts, nearest examples, provenance, sha256 of the tensors file

The JSON records the tensors file's hash, so a pair torn apart by a crash (or
edited by hand) is detected when the card is loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .. import __version__
from ..errors import IntegrityError, NotFoundError
from ..io import Example, atomic_write_bytes, atomic_write_json, sha256_file
from ..settings import CARD_MAX_EXAMPLE_EMBEDDINGS, CARD_NEAREST_EXAMPLES
from .embedder import Embedder

CARD_JSON = "lorahub_card.json"
CARD_TENSORS = "lorahub_card.safetensors"
CARD_FILES = (CARD_JSON, CARD_TENSORS)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TextRecipe:
    """How an example becomes the text that is embedded (its JSON key in a card: "recipe").

    input+target (iLoraComp, the default): instruction + input + separator + target.
    input (LoraRetriever): instruction + input.
    Queries are always embedded as instruction + input (plus the target for shots
    when the recipe uses targets), so both sides of a comparison match.
    """

    fields: str = "input+target"
    instruction: str = ""
    separator: str = "\n"

    def __post_init__(self):
        if self.fields not in ("input+target", "input"):
            raise ValueError(f"recipe fields must be 'input+target' or 'input', not {self.fields!r}")

    def text(self, example: Example) -> str:
        if self.fields == "input+target" and example.target is not None:
            return f"{self.instruction}{example.input}{self.separator}{example.target}"
        return f"{self.instruction}{example.input}"


@dataclass
class Card:
    embedder_id: str
    embedder_revision: str
    text_recipe: TextRecipe
    n_examples: int
    centroid: torch.Tensor  # (dim,), unit norm
    nearest: list[dict]  # the training examples closest to the centroid, most central first
    examples: torch.Tensor | None = None  # (m, dim) per-example embeddings, m <= CARD_MAX_EXAMPLE_EMBEDDINGS
    source: dict = field(default_factory=dict)  # where the training data came from
    created_at: str = ""
    lorahub_version: str = __version__

    @property
    def dim(self) -> int:
        return int(self.centroid.shape[0])

    @property
    def embedder_key(self) -> str:
        return f"{self.embedder_id}@{self.embedder_revision}"

    def metadata(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "embedder": {"id": self.embedder_id, "revision": self.embedder_revision},
            "dim": self.dim,
            "n_examples": self.n_examples,
            "recipe": asdict(self.text_recipe),
            "nearest_examples": self.nearest,
            "example_embeddings": 0 if self.examples is None else int(self.examples.shape[0]),
            "source": self.source,
            "created_at": self.created_at,
            "lorahub_version": self.lorahub_version,
        }

    def save(self, folder: Path) -> dict[str, str]:
        """Write both files atomically (tensors first); returns {file name: sha256}."""
        tensors = {"centroid": self.centroid.contiguous()}
        if self.examples is not None:
            tensors["examples"] = self.examples.contiguous()
        atomic_write_bytes(folder / CARD_TENSORS, save(tensors, metadata={"format": str(FORMAT_VERSION)}))
        tensors_hash = sha256_file(folder / CARD_TENSORS)
        atomic_write_json(folder / CARD_JSON, {**self.metadata(), "tensors_sha256": tensors_hash})
        return {CARD_TENSORS: tensors_hash, CARD_JSON: sha256_file(folder / CARD_JSON)}

    @classmethod
    def load(cls, folder: Path, name: str = "") -> Card:
        json_path, tensors_path = folder / CARD_JSON, folder / CARD_TENSORS
        label = name or str(folder)
        if not json_path.is_file() or not tensors_path.is_file():
            raise NotFoundError(
                f"'{label}' has no embedding card.", f"Build one with: lorahub card build {label} --data train.jsonl"
            )
        for path in (json_path, tensors_path):  # a link out of the folder would read whatever it points to
            if not path.resolve().is_relative_to(folder.resolve()):
                raise IntegrityError(
                    f"the embedding card of '{label}': {path.name} is a link to '{path.resolve()}', outside "
                    "the adapter's folder; it was not read.",
                    f"Delete the link and rebuild the card with: lorahub card build {label} --data train.jsonl",
                )
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
            if meta.get("tensors_sha256") != sha256_file(tensors_path):
                raise ValueError("the tensors file does not match the hash in the JSON file")
            tensors = load_file(tensors_path)
            card = cls(
                embedder_id=meta["embedder"]["id"],
                embedder_revision=meta["embedder"]["revision"],
                text_recipe=TextRecipe(**meta["recipe"]),
                n_examples=int(meta["n_examples"]),
                centroid=tensors["centroid"].float(),
                nearest=list(meta.get("nearest_examples", [])),
                examples=tensors.get("examples"),
                source=meta.get("source", {}),
                created_at=meta.get("created_at", ""),
                lorahub_version=meta.get("lorahub_version", ""),
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError, SafetensorError) as error:
            raise IntegrityError(
                f"the embedding card of '{label}' is damaged ({error}).",
                f"Rebuild it with: lorahub card build {label} --data train.jsonl",
            ) from None
        if card.centroid.ndim != 1 or (card.examples is not None and card.examples.shape[-1] != card.dim):
            raise IntegrityError(f"the embedding card of '{label}' has tensors of the wrong shape.", "Rebuild it.")
        return card


def build_card(
    examples: list[Example],
    embedder: Embedder,
    text_recipe: TextRecipe = TextRecipe(),
    *,
    source: dict | None = None,
    keep_embeddings: int = CARD_MAX_EXAMPLE_EMBEDDINGS,
    progress=None,
) -> Card:
    """Embed the examples and summarise them: normalised centroid, most central examples, a capped sample."""
    if not examples:
        raise ValueError("a card needs at least one example")
    vectors = embedder.encode([text_recipe.text(e) for e in examples], progress=progress)  # (n, dim), unit rows
    mean = vectors.mean(dim=0)
    centroid = mean / mean.norm().clamp_min(1e-12)
    order = torch.argsort(vectors @ centroid, descending=True)
    nearest = [
        {"input": examples[i].input, "target": examples[i].target} for i in order[:CARD_NEAREST_EXAMPLES].tolist()
    ]
    # An evenly spaced sample keeps the spread of the data, unlike the most central ones.
    if keep_embeddings and len(examples) > keep_embeddings:
        sample = torch.linspace(0, len(examples) - 1, keep_embeddings).round().long()
        kept = vectors[sample]
    else:
        kept = vectors if keep_embeddings else None
    return Card(
        embedder_id=embedder.id,
        embedder_revision=embedder.revision,
        text_recipe=text_recipe,
        n_examples=len(examples),
        centroid=centroid,
        nearest=nearest,
        examples=kept,
        source=source or {},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
