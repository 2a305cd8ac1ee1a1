"""Which adapters fit: cosine similarity between embedded examples and adapters' cards.

Three levels, as in the papers:
- task (BatchComp): the mean of the shots' embeddings against every card, top-k.
- instance (iLoraComp): top-k for every shot; each test input is routed to its most similar shot.
- per input (LoraRetriever): top-k for every input line on its own.
All vectors are L2-normalised, so a cosine is one matrix product; results are
sorted most similar first (the released iLoraComp code sorts ascending and so
picks the least similar adapters).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cards.card import Card, TextRecipe
from .cards.embedder import Embedder, load_embedder
from .errors import InputError, NotFoundError
from .io import Example
from .registry.store import Store


def top_k(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k.

    queries (q, d) and keys (n, d) with unit rows -> (scores, indices), each (q, min(k, n)), descending."""
    scores = queries @ keys.T  # (q, n)
    return torch.topk(scores, min(k, keys.shape[0]), dim=1, largest=True, sorted=True)


def normalise(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class Match:
    """One adapter of a ranking and its cosine similarity to the query."""

    id: str
    score: float  # rounded to 6 decimals

    def to_json(self) -> dict:
        return {"id": self.id, "score": self.score}


@dataclass(frozen=True)
class ShotRoute:
    """Instance level: test input `input` goes to its most similar shot."""

    input: int
    shot: int
    score: float

    def to_json(self) -> dict:
        return {"input": self.input, "shot": self.shot, "score": self.score}


@dataclass
class Ranking:
    """What a retrieval finds, most similar first: one ranking (task level, one query), one per shot and the
    inputs' routes (instance level), or one per input (per-input level). `to_json()` is `retrieve --json`."""

    level: str  # task | instance | input | query
    results: list[Match] = field(default_factory=list)  # task, query
    shots: list[list[Match]] = field(default_factory=list)  # instance
    routes: list[ShotRoute] = field(default_factory=list)  # instance, when inputs were given
    inputs: list[list[Match]] = field(default_factory=list)  # input

    def to_json(self) -> dict:
        ranked = lambda matches: [m.to_json() for m in matches]  # noqa: E731
        if self.level in ("task", "query"):
            return {"level": self.level, "results": ranked(self.results)}
        if self.level == "instance":
            return {
                "level": "instance",
                "shots": [{"index": j, "results": ranked(shot)} for j, shot in enumerate(self.shots)],
                "routes": [r.to_json() for r in self.routes],
            }
        return {"level": "input", "inputs": [{"index": j, "results": ranked(row)} for j, row in enumerate(self.inputs)]}


@dataclass
class CardIndex:
    """Every usable card of the registry as one in-memory float32 matrix."""

    ids: list[str]
    matrix: torch.Tensor  # (n, dim), unit rows
    embedder_id: str
    embedder_revision: str
    text_recipe: TextRecipe  # how the cards embedded their examples; queries are embedded the same way
    base_model: str

    @classmethod
    def from_cards(cls, cards: dict[str, Card], base_model: str) -> CardIndex:
        keys = {card.embedder_key for card in cards.values()}
        if len(keys) > 1:
            raise InputError(
                f"the candidate cards were made with different embedders ({', '.join(sorted(keys))}); "
                "their vectors cannot be compared.",
                "Rebuild them with one embedder: lorahub card build ID --embedder NAME ...",
            )
        instructions = {card.text_recipe.instruction for card in cards.values()}
        if len(instructions) > 1:
            raise InputError(
                "the candidate cards use different instructions, so one query cannot match them all.",
                "Rebuild them with one --instruction.",
            )
        first = next(iter(cards.values()))
        ids = sorted(cards)
        matrix = normalise(torch.stack([cards[i].centroid for i in ids]).float())
        return cls(ids, matrix, first.embedder_id, first.embedder_revision, first.text_recipe, base_model)

    @classmethod
    def from_store(cls, store: Store, base_model: str | None = None) -> CardIndex:
        records = [r for r in store.list(base_model) if r.has_card]
        if not records:
            where = f" for base model '{base_model}'" if base_model else ""
            raise NotFoundError(
                f"no adapter in the registry{where} has an embedding card.",
                "Build cards with: lorahub card build ID --data train.jsonl (or registry add ... --data).",
            )
        bases = sorted({r.base_model for r in records})
        if len(bases) > 1:
            raise InputError(
                f"the registry holds adapters for several base models ({', '.join(bases)}).",
                "Choose one with --base-model.",
            )
        return cls.from_cards({r.id: Card.load(r.path, r.id) for r in records}, bases[0])

    def embedder(self, name_or_path: str | None = None) -> Embedder:
        """The embedder the cards were made with; refuses a different one."""
        embedder = load_embedder(name_or_path or self.embedder_id)
        if embedder.key != f"{self.embedder_id}@{self.embedder_revision}":
            raise InputError(
                f"the cards were made with {self.embedder_id}@{self.embedder_revision}, not {embedder.key}.",
                "Query with the cards' embedder, or rebuild the cards with this one.",
            )
        return embedder

    def matches(self, scores: torch.Tensor, indices: torch.Tensor) -> list[Match]:
        return [Match(self.ids[i], round(float(s), 6)) for s, i in zip(scores.tolist(), indices.tolist())]


def embed_inputs(embedder: Embedder, instruction: str, inputs: list[str]) -> torch.Tensor:
    """(n, dim) inputs embedded as every query is, without a target: the instruction, then the input."""
    recipe = TextRecipe("input", instruction)
    return embedder.encode([recipe.text(Example(text)) for text in inputs])


def _embed(index: CardIndex, embedder: Embedder, examples: list[Example], with_target: bool) -> torch.Tensor:
    if not with_target:
        return embed_inputs(embedder, index.text_recipe.instruction, [e.input for e in examples])
    return embedder.encode([index.text_recipe.text(e) for e in examples])


def task_level(index: CardIndex, embedder: Embedder, shots: list[Example], k: int) -> Ranking:
    """BatchComp: one ranking for the mean embedding of all shots."""
    query = normalise(_embed(index, embedder, shots, with_target=True).mean(dim=0, keepdim=True))
    scores, indices = top_k(query, index.matrix, k)
    return Ranking("task", results=index.matches(scores[0], indices[0]))


def route(shot_inputs: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every input, the most similar shot (both embedded as inputs only): (scores, shot indices), each (n,)."""
    scores, indices = top_k(inputs, shot_inputs, 1)
    return scores[:, 0], indices[:, 0]


def instance_level(
    index: CardIndex, embedder: Embedder, shots: list[Example], k: int, inputs: list[Example] | None = None
) -> Ranking:
    """iLoraComp: top-k per shot (input + target); each input goes to its nearest shot (inputs only)."""
    scores, indices = top_k(_embed(index, embedder, shots, with_target=True), index.matrix, k)
    ranking = Ranking("instance", shots=[index.matches(scores[j], indices[j]) for j in range(len(shots))])
    if inputs:
        shot_inputs = _embed(index, embedder, shots, with_target=False)
        route_scores, shot_ids = route(shot_inputs, _embed(index, embedder, inputs, with_target=False))
        ranking.routes = [
            ShotRoute(i, int(j), round(float(s), 6))
            for i, (j, s) in enumerate(zip(shot_ids.tolist(), route_scores.tolist()))
        ]
    return ranking


def per_input(index: CardIndex, embedder: Embedder, inputs: list[Example], k: int) -> Ranking:
    """LoraRetriever: every input ranks the adapters on its own (embedded without a target)."""
    scores, indices = top_k(_embed(index, embedder, inputs, with_target=False), index.matrix, k)
    return Ranking("input", inputs=[index.matches(scores[j], indices[j]) for j in range(len(inputs))])
