"""Requests to compositions: which adapters answer each input, with which weights, over one bank.

Two routers, each returning one `Route` per input (used by serving and by eval's instance method):

- `RetrievalRouter` (LoraRetriever): every input retrieves its own top-k adapters by
  per-input retrieval against the registry's cards (data cards, weight cards or both:
  retrieval.Retriever), and composes them with w = 1/k:
  mixture = the bank's linear mode (the average of the k modules' outputs),
  fusion = its elementwise mode (the average of A and of B), single = top-1 alone;
  scored = the linear mode with the input's own weights from its retrieval scores
  (`score_weights`: w = softmax(s / temperature) over its k), so no two inputs share a composition;
  or routes every token of it among all the bank's adapters (arrow: Arrow's top-k softmax
  over prototype alignment, per token and layer, the bank's arrow mode).
- `ShotRouter` (iLoraComp, the output of `compose --level instance`): `route(texts)` sends
  every input to its most similar shot, answered by that shot's composition alone.
- `AdapterRouter` (`generate --adapter`): every input is answered by one adapter, a task-level
  composition or any PEFT LoRA folder, at weight 1.

A `Route` names bank columns and their weights: `route.row`, a SparseRow, is what
`generation.generate` and `decoding.Decoder` take, sparse all the way to the bank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .compose.bank import SparseRow
from .errors import InputError
from .settings import SERVE

# compose mode -> the bank mode its rows run under; single is a one-hot row of either.
COMPOSE_MODES = {
    "mixture": "linear",
    "fusion": "elementwise",
    "single": "elementwise",
    "scored": "linear",
    "arrow": "arrow",
}


@dataclass(frozen=True)
class Route:
    """The composition one input gets: bank columns and their weights, under one bank mode."""

    columns: tuple[int, ...]
    weights: tuple[float, ...]
    mode: str  # linear | elementwise
    info: dict = field(default_factory=dict, compare=False)  # what to tell the user: adapters, shot, scores

    @property
    def row(self) -> SparseRow:
        return SparseRow(self.columns, self.weights)


def check_compose(compose: str) -> str:
    if compose not in COMPOSE_MODES:
        raise InputError(
            f"compose mode '{compose}' is not one of {', '.join(COMPOSE_MODES)}.",
            "Use mixture (average of outputs), fusion (average of A and B), single (top-1), scored (outputs "
            "weighted by retrieval scores) or arrow (Arrow's per-token routing).",
        )
    return compose


def score_weights(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Composition weights from retrieval scores: w_i = exp(s_i / t) / sum_j exp(s_j / t) over the last dimension
    (an input's k retrieved adapters): positive, summing to 1, larger for the nearer adapter; t -> 0 is top-1,
    t -> inf is 1/k. scores (..., k) -> weights (..., k)."""
    if not temperature > 0:
        raise InputError(f"the score temperature is {temperature}.", "Give a temperature above 0.")
    return torch.softmax(scores.double() / temperature, dim=-1).float()


class RetrievalRouter:
    """Per-input top-k retrieval with `retriever` (a retrieval.Retriever); bank column i is `retriever.ids[i]`.
    `arrow`: the bank's Arrow routing is on (top-k and temperature), so compose arrow is served."""

    retrieves = True  # requests choose k and the compose mode

    def __init__(
        self,
        retriever,
        *,
        elementwise_ok: bool,
        arrow: tuple[int, float] | None = None,
        score_temperature: float = SERVE["score_temperature"],
    ):
        self.retriever, self.score_temperature = retriever, score_temperature
        self.names = list(retriever.ids)
        # One-hot rows are exact in either mode; elementwise is cheaper per token.
        self.single_mode = "elementwise" if elementwise_ok else "linear"
        self.elementwise_ok, self.arrow = elementwise_ok, arrow

    def route(self, texts: list[str], ks: list[int], composes: list[str]) -> list[Route]:
        from .io import Example

        for k, compose in zip(ks, composes):
            check_compose(compose)
            if k < 1:
                raise InputError(f"k = {k} must be 1 or more.", "Use -k 3 (LoraRetriever's setting).")
            if compose == "fusion" and not self.elementwise_ok:
                raise InputError(
                    "fusion averages A and B, which needs adapters of one rank and one scaling.",
                    "Use --compose mixture.",
                )
            if compose == "arrow" and self.arrow is None:
                raise InputError("this server does not route with Arrow.", "Start it with --compose arrow.")
        retrieved = [i for i, compose in enumerate(composes) if compose != "arrow"]
        ranked = dict(zip(retrieved, self._ranked([Example(texts[i]) for i in retrieved], ks, retrieved)))
        column = {name: i for i, name in enumerate(self.names)}
        routes = []
        for i, (k, compose) in enumerate(zip(ks, composes)):
            if compose == "arrow":
                top_k, temperature = self.arrow
                every = tuple(range(len(self.names)))
                info = {"compose": "arrow", "top_k": top_k, "temperature": temperature, "candidates": len(every)}
                routes.append(Route(every, (1.0,) * len(every), "arrow", info))
                continue
            chosen = ranked[i][: 1 if compose == "single" else k]
            weights = tuple(1.0 / len(chosen) for _ in chosen)
            if compose == "scored":
                found = torch.tensor([m.score for m in chosen])
                weights = tuple(score_weights(found, self.score_temperature).tolist())
            mode = self.single_mode if compose == "single" else COMPOSE_MODES[compose]
            adapters = [{"id": m.id, "weight": w, "score": m.score} for m, w in zip(chosen, weights)]
            for entry, m in zip(adapters, chosen):
                if m.card is not None:
                    entry["card"] = m.card
            routes.append(
                Route(tuple(column[m.id] for m in chosen), weights, mode, {"compose": compose, "adapters": adapters})
            )
        return routes

    def _ranked(self, examples, ks: list[int], rows: list[int]):
        if not examples:
            return []
        return self.retriever.per_input(examples, max(ks[i] for i in rows)).inputs


class ShotRouter:
    """An instance-level composition: bank column j is compositions/shot-j; inputs go to their nearest shot."""

    retrieves = False  # k and the compose mode do not apply

    def __init__(self, recipe, shots: torch.Tensor, embedder, *, elementwise_ok: bool):
        from .retrieval import normalise

        self.recipe, self.embedder = recipe, embedder  # recipe: an instance-level compose.recipe.Recipe
        self.shots = normalise(shots.float())  # (K, dim)
        self.names = [entry["folder"] for entry in recipe.compositions]
        self.mode = "elementwise" if elementwise_ok else "linear"

    def route(self, texts: list[str]) -> list[Route]:
        """Every input to its nearest shot (k and the compose mode do not apply)."""
        from .retrieval import embed_inputs, route

        scores, shot_ids = route(self.shots, embed_inputs(self.embedder, self.recipe.router["instruction"], texts))
        routes = []
        for j, score in zip(shot_ids.tolist(), scores.tolist()):
            entry = self.recipe.compositions[j]
            adapters = [{"id": m["id"], "weight": m["weight"]} for m in entry["modules"]]
            info = {
                "compose": "instance",
                "shot": j,
                "composition": entry["folder"],
                "score": round(score, 6),
                "adapters": adapters,
            }
            routes.append(Route((j,), (1.0,), self.mode, info))
        return routes


class AdapterRouter:
    """One adapter answers every input: bank column 0 at weight 1 (a one-hot row is exact in either bank mode)."""

    retrieves = False  # k and the compose mode do not apply

    def __init__(self, name: str, *, elementwise_ok: bool):
        self.names = [name]
        self.mode = "elementwise" if elementwise_ok else "linear"

    def route(self, texts: list[str]) -> list[Route]:
        info = {"compose": "adapter", "adapters": [{"id": self.names[0], "weight": 1.0}]}
        return [Route((0,), (1.0,), self.mode, info) for _ in texts]
