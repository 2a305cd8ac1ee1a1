"""Which adapters fit: cosine similarity between embedded examples and adapters' cards, or (for adapters
without training data) scores from their weight cards (spectral/), or both.

Three levels, as in the papers:
- task (BatchComp): the mean of the shots' embeddings against every card, top-k.
- instance (iLoraComp): top-k for every shot; each test input is routed to its most similar shot.
- per input (LoraRetriever): top-k for every input line on its own.
All vectors are L2-normalised, so a cosine is one matrix product; results are
sorted most similar first (the released iLoraComp code sorts ascending and so
picks the least similar adapters).

`Retriever` chooses the card (`by`): data cards, weight cards, or auto — every adapter by its data card
when it has one, else by its weight card. A ranking that mixes the two puts them on one scale by
standardising each kind (`merge`): z = (score - mean) / spread, the data cosines over the adapters with a
data card, the weight scores over every adapter with a weight card; every match says which card ranked it
and its own score (docs/retrieval.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cards.card import Card, TextRecipe
from .cards.embedder import Embedder, load_embedder
from .errors import InputError, LorahubError, NotFoundError
from .io import Example
from .registry.store import AdapterRecord, Store
from .settings import WEIGHTS

BY = ("auto", "data", "weights")


def top_k(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k.

    queries (q, d) and keys (n, d) with unit rows -> (scores, indices), each (q, min(k, n)), descending."""
    scores = queries @ keys.T  # (q, n)
    return torch.topk(scores, min(k, keys.shape[0]), dim=1, largest=True, sorted=True)


def normalise(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class Match:
    """One adapter of a ranking and its score: the cosine similarity to the query (data cards), the calibrated
    weight score (weight cards) or, in a mixed ranking, the z-score of the card that ranked it (`card`: data
    or weights) with that card's own score (`raw`)."""

    id: str
    score: float  # rounded to 6 decimals
    card: str | None = None
    raw: float | None = None

    def to_json(self) -> dict:
        if self.card is None:
            return {"id": self.id, "score": self.score}
        return {"id": self.id, "score": self.score, "card": self.card, "raw": self.raw}


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
    by: str = "data"  # data (cosines) | weights (calibrated weight scores) | mixed (z-scores of both)
    about: dict = field(default_factory=dict)  # how weight cards scored: scorer, dtype, base model, left out

    def to_json(self) -> dict:
        ranked = lambda matches: [m.to_json() for m in matches]  # noqa: E731
        head = {"level": self.level, "by": self.by, **({"weights": self.about} if self.about else {})}
        if self.level in ("task", "query"):
            return {**head, "results": ranked(self.results)}
        if self.level == "instance":
            return {
                **head,
                "shots": [{"index": j, "results": ranked(shot)} for j, shot in enumerate(self.shots)],
                "routes": [r.to_json() for r in self.routes],
            }
        return {**head, "inputs": [{"index": j, "results": ranked(row)} for j, row in enumerate(self.inputs)]}


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
                "Build cards with: lorahub card build ID --data train.jsonl (or registry add ... --data), "
                "or rank by the adapters' weights: --by weights.",
            )
        return cls.from_records(records)

    @classmethod
    def from_records(cls, records: list[AdapterRecord]) -> CardIndex:
        """The card index of carded records of one base model."""
        return cls.from_cards({r.id: Card.load(r.path, r.id) for r in records}, one_base_model(records))

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


def one_base_model(records: list[AdapterRecord]) -> str:
    bases = sorted({r.base_model for r in records})
    if len(bases) > 1:
        raise InputError(
            f"the registry holds adapters for several base models ({', '.join(bases)}).",
            "Choose one with --base-model.",
        )
    return bases[0]


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


# --- data cards, weight cards or both ---------------------------------------------------------------------


def check_by(by: str) -> str:
    if by not in BY:
        raise InputError(
            f"--by '{by}' is not one of {', '.join(BY)}.",
            "Use auto (each adapter's data card, else its weight card), data or weights.",
        )
    return by


def standardise(values: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
    """(q, n) scores as z-scores per row, (value - mean) / std, with the row's own mean and population std
    unless given; a row whose spread is zero (one adapter, or all alike) is all 0."""
    if mean is None:
        mean, std = values.mean(dim=1), values.std(dim=1, unbiased=False)
    std = std[:, None]
    return torch.where(std > 1e-12, (values - mean[:, None]) / std.clamp_min(1e-12), torch.zeros_like(values))


def merge(parts: list[tuple[str, list[str], torch.Tensor, torch.Tensor, torch.Tensor]], k: int) -> list[list[Match]]:
    """One ranking per query row of several kinds of score on one scale: each part (card, ids, scores (q, n),
    the scores' mean (q,) and std (q,) over the kind's whole population) standardised (`standardise`), then the
    top k of all parts together, each match with its card and its own score. -inf (not scored) stays last."""
    ids = [i for _, part_ids, *_ in parts for i in part_ids]
    cards = [card for card, part_ids, *_ in parts for _ in part_ids]
    raw = torch.cat([values for _, _, values, _, _ in parts], dim=1)
    z = torch.cat([standardise(values, mean, std) for _, _, values, mean, std in parts], dim=1)
    top, order = torch.topk(z, min(k, z.shape[1]), dim=1)
    return [
        [
            Match(ids[i], round(float(v), 6), cards[i], round(float(raw[row, i]), 6))
            for v, i in zip(vs, os)
            if v > float("-inf")
        ]
        for row, (vs, os) in enumerate(zip(top.tolist(), order.tolist()))
    ]


class Retriever:
    """What ranks the registry's adapters for `retrieve`, `compose --modules auto` and routed serving: their
    data cards (`cards`, queried with the cards' embedder), their weight cards (`weights`: a
    spectral.library.WeightScorer over every adapter), or, with `by` auto, each adapter by its data card if it
    has one and by its weight card otherwise (a mixed ranking: `merge`).

    `embedder`: the embedder's name (None: the cards', else the default); loaded when first needed (instance
    routing embeds inputs only, which needs no card)."""

    def __init__(self, by: str, cards: CardIndex | None, weights=None, embedder: str | None = None):
        self.by = check_by(by)
        self.cards = cards if by != "weights" else None
        self.weights = weights if by != "data" else None
        self.embedder_name, self._embedder = embedder, None
        self.not_ranked: dict | None = None  # auto only: {"ids", "problem"} of adapters left out of every ranking
        carded = set(self.cards.ids) if self.cards else set()
        self.weight_ids = [i for i in self.weights.ids if i not in carded] if self.weights else []
        if self.cards is None and not self.weight_ids:
            raise NotFoundError("no adapter can be ranked.", "Add adapters with: lorahub registry add SOURCE")

    @property
    def kind(self) -> str:
        """data | weights | mixed: what the scores of this retriever's rankings are."""
        if not self.weight_ids:
            return "data"
        return "weights" if self.cards is None else "mixed"

    @property
    def ids(self) -> list[str]:
        return sorted((self.cards.ids if self.cards else []) + self.weight_ids)

    @property
    def instruction(self) -> str:
        """What precedes an input when it is embedded (the cards' instruction; none without cards)."""
        return self.cards.text_recipe.instruction if self.cards else TextRecipe().instruction

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = (
                self.cards.embedder(self.embedder_name) if self.cards else load_embedder(self.embedder_name)
            )
        return self._embedder

    @property
    def embedder_key(self) -> str:
        if self.cards:
            return f"{self.cards.embedder_id}@{self.cards.embedder_revision}"
        return self.embedder.key

    def about(self) -> dict:
        if self.not_ranked:
            return {"not_ranked": self.not_ranked}
        if not self.weight_ids:
            return {}
        about = dict(self.weights.description)
        if self.weights.library.left_out:
            about["left_out"] = self.weights.library.left_out
        return about

    def _ranked(self, examples: list[Example], with_target: bool, merged: bool, k: int) -> list[list[Match]]:
        """Per query (one for all `examples` when `merged`, else one each), the top k."""
        parts = []
        if self.cards is not None:
            queries = _embed(self.cards, self.embedder, examples, with_target)
            if merged:
                queries = normalise(queries.mean(dim=0, keepdim=True))
            if not self.weight_ids:
                values, order = top_k(queries, self.cards.matrix, k)
                return [self.cards.matches(values[j], order[j]) for j in range(values.shape[0])]
            cosines = queries @ self.cards.matrix.T
            parts.append(("data", self.cards.ids, cosines, cosines.mean(dim=1), cosines.std(dim=1, unbiased=False)))
        # the library's mean and spread matter only when the weight scores are standardised against data cosines
        found = self.weights.score(
            examples if with_target else [Example(e.input) for e in examples], merged, spread=self.cards is not None
        )
        position = {i: p for p, i in enumerate(self.weights.ids)}
        values = found.values[:, [position[i] for i in self.weight_ids]]
        if self.cards is None:
            top, order = torch.topk(values, min(k, values.shape[1]), dim=1)
            return [
                [Match(self.weight_ids[i], round(float(v), 6)) for v, i in zip(vs, os) if v > float("-inf")]
                for vs, os in zip(top.tolist(), order.tolist())
            ]
        parts.append(("weights", self.weight_ids, values, found.mean, found.std))
        return merge(parts, k)

    def _ranking(self, level: str, **parts) -> Ranking:
        return Ranking(level, by=self.kind, about=self.about(), **parts)

    def task(self, shots: list[Example], k: int) -> Ranking:
        """BatchComp: one ranking for all shots (data cards: their mean embedding; weight cards: their tokens)."""
        return self._ranking("task", results=self._ranked(shots, True, True, k)[0])

    def query(self, text: str, k: int) -> Ranking:
        return self._ranking("query", results=self._ranked([Example(text)], False, False, k)[0])

    def per_shot(self, shots: list[Example], k: int) -> list[list[Match]]:
        return self._ranked(shots, True, False, k)

    def instance(self, shots: list[Example], k: int, inputs: list[Example] | None = None) -> Ranking:
        """iLoraComp: top-k per shot; each input goes to its nearest shot (both embedded as inputs only)."""
        ranking = self._ranking("instance", shots=self.per_shot(shots, k))
        if inputs:
            texts = lambda rows: embed_inputs(self.embedder, self.instruction, [e.input for e in rows])  # noqa: E731
            route_scores, shot_ids = route(texts(shots), texts(inputs))
            ranking.routes = [
                ShotRoute(i, int(j), round(float(s), 6))
                for i, (j, s) in enumerate(zip(shot_ids.tolist(), route_scores.tolist()))
            ]
        return ranking

    def per_input(self, inputs: list[Example], k: int) -> Ranking:
        """LoraRetriever: every input ranks the adapters on its own (without a target)."""
        return self._ranking("input", inputs=self._ranked(inputs, False, False, k))

    @classmethod
    def from_store(
        cls, store: Store, by: str = WEIGHTS["by"], base_model: str | None = None, embedder=None, base=None
    ) -> Retriever:
        """The retriever over `store`'s adapters (of `base_model`). `base(name)` loads the base model the weight
        cards are scored on (the one the adapters record); it is called only when some adapter is ranked by its
        weight card."""
        from .spectral.library import References, WeightScorer, cache_dir, registry_index

        check_by(by)
        records = store.list(base_model)
        carded = [r for r in records if r.has_card]
        if by == "data" or (by == "auto" and records and len(carded) == len(records)):
            return cls("data", CardIndex.from_store(store, base_model), embedder=embedder)
        if not records:
            where = f" for base model '{base_model}'" if base_model else ""
            raise NotFoundError(f"the registry has no adapters{where}.", "Add some with: lorahub registry add SOURCE")
        name = one_base_model(records)
        cards = CardIndex.from_records(carded) if by == "auto" and carded else None
        try:
            model = base(name)
        except LorahubError as error:
            if cards is None:
                raise
            # auto with data cards: rank those, and say which adapters were not ranked and why (a base model
            # that cannot be loaded here, e.g. offline, should not stop what needs no model)
            retriever = cls("data", cards, embedder=embedder)
            retriever.not_ranked = {
                "ids": sorted(r.id for r in records if not r.has_card),
                "problem": f"their weight cards need the base model, which could not be loaded: {error.message}",
            }
            return retriever
        library = registry_index(store, records)
        references = References(
            library, model, cache_dir(store), WEIGHTS["background_seed"], WEIGHTS["background_sequences"]
        )
        return cls(by, cards, WeightScorer(library, model, references), embedder)
