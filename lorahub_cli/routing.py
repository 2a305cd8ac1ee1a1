"""Requests to compositions: which adapters answer each input, with which weights, over one bank.

Two routers, each returning one `Route` per input (used by serving and by eval's instance method):

- `RetrievalRouter` (LoraRetriever): every input retrieves its own top-k adapters by
  per-input retrieval against the registry's cards, and composes them with w = 1/k:
  mixture = the linear formula (the average of the k modules' outputs),
  fusion = the elementwise formula (the average of A and of B), single = top-1 alone.
- `ShotRouter` (iLoraComp, the output of `compose --level instance`): `route(texts)` sends
  every input to its most similar shot, answered by that shot's composition alone.

A `Route` names bank columns, so `weight_matrix` turns a list of routes into the
(rows, N) matrix that `LoraBank.weights` and `generation.generate` take.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InputError

# compose mode -> the bank formula its rows run under; single is a one-hot row of either.
COMPOSE_MODES = {"mixture": "linear", "fusion": "elementwise", "single": "elementwise"}


@dataclass(frozen=True)
class Route:
    """The composition one input gets: bank columns and their weights, under one bank formula."""

    columns: tuple[int, ...]
    weights: tuple[float, ...]
    formula: str  # linear | elementwise
    info: dict = field(default_factory=dict, compare=False)  # what to tell the user: adapters, shot, scores


def weight_matrix(routes: list[Route], n: int) -> torch.Tensor:
    """(rows, n) float32: row b holds route b's weights in its columns, zeros elsewhere."""
    W = torch.zeros(len(routes), n)
    for row, route in enumerate(routes):
        W[row, list(route.columns)] = torch.tensor(route.weights)
    return W


def check_mode(mode: str) -> str:
    if mode not in COMPOSE_MODES:
        raise InputError(
            f"compose mode '{mode}' is not one of {', '.join(COMPOSE_MODES)}.",
            "Use mixture (average of outputs), fusion (average of A and B) or single (top-1).",
        )
    return mode


class RetrievalRouter:
    """Per-input top-k retrieval over `index`; bank column i is `index.ids[i]`."""

    retrieves = True  # requests choose k and the compose mode

    def __init__(self, index, embedder, *, elementwise_ok: bool):
        self.index, self.embedder = index, embedder
        self.names = list(index.ids)
        # One-hot rows are exact under either formula; elementwise is cheaper per token.
        self.single_formula = "elementwise" if elementwise_ok else "linear"
        self.elementwise_ok = elementwise_ok

    def route(self, texts: list[str], ks: list[int], modes: list[str]) -> list[Route]:
        from .io import Example
        from .retrieval import per_input

        for k, mode in zip(ks, modes):
            check_mode(mode)
            if k < 1:
                raise InputError(f"k = {k} must be 1 or more.", "Use -k 3 (LoraRetriever's setting).")
            if mode == "fusion" and not self.elementwise_ok:
                raise InputError(
                    "fusion averages A and B, which needs adapters of one rank and one scaling.",
                    "Use --compose mixture.",
                )
        ranked = per_input(self.index, self.embedder, [Example(t) for t in texts], max(ks)).inputs
        column = {name: i for i, name in enumerate(self.names)}
        routes = []
        for k, mode, matches in zip(ks, modes, ranked):
            chosen = matches[: 1 if mode == "single" else k]
            weights = tuple(1.0 / len(chosen) for _ in chosen)
            formula = self.single_formula if mode == "single" else COMPOSE_MODES[mode]
            adapters = [{"id": m.id, "weight": w, "score": m.score} for m, w in zip(chosen, weights)]
            routes.append(
                Route(tuple(column[m.id] for m in chosen), weights, formula, {"compose": mode, "adapters": adapters})
            )
        return routes


class ShotRouter:
    """An instance-level composition: bank column j is compositions/shot-j; inputs go to their nearest shot."""

    retrieves = False  # k and the compose mode do not apply

    def __init__(self, recipe, shots: torch.Tensor, embedder, *, elementwise_ok: bool):
        from .retrieval import normalise

        self.recipe, self.embedder = recipe, embedder  # recipe: an instance-level compose.recipe.Recipe
        self.shots = normalise(shots.float())  # (K, dim)
        self.names = [entry["folder"] for entry in recipe.compositions]
        self.formula = "elementwise" if elementwise_ok else "linear"

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
            routes.append(Route((j,), (1.0,), self.formula, info))
        return routes
