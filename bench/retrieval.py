"""Retrieval latency against a large card library: `python bench/retrieval.py [--cards 10000]`.

Builds a registry of N adapters whose cards hold random unit vectors (timings
do not depend on the values), loads it as lorahub retrieve does, then times
one query: embedding the text, and ranking the library (one float32 matrix
product + top-k). A per-card loop of cosine similarities, the way naive
retrieval code scores modules one at a time, runs side by side for the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lorahub_cli import retrieval
from lorahub_cli.cards.card import Card, TextRecipe
from lorahub_cli.cards.embedder import load_embedder
from lorahub_cli.registry import Store
from lorahub_cli.registry.mirror import add_local
from lorahub_cli.settings import shipped_dir


def timed(fn, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def build_library(home: Path, n: int, embedder) -> None:
    store = Store(home)
    adapter = shipped_dir() / "examples" / "adapters" / "sentiment"
    vectors = retrieval.normalise(torch.randn(n, embedder.dim, generator=torch.Generator().manual_seed(0)))
    for i in range(n):
        record = add_local(store, adapter, name=f"bench/{i:05d}").record
        card = Card(embedder.id, embedder.revision, TextRecipe(), 100, vectors[i], [])
        store.update_card(record.id, card.save(record.path), card.embedder_key)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    embedder = load_embedder()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build_library(Path(tmp), args.cards, embedder)
        build = time.perf_counter() - start
        start = time.perf_counter()
        index = retrieval.CardIndex.from_store(Store(Path(tmp)))
        load = time.perf_counter() - start
    query_text = "Review: The plot was dull and the acting felt clumsy. Is this movie review positive or negative?"
    query = embedder.encode([query_text])
    embed = timed(lambda: embedder.encode([query_text]), 20)
    ranked = timed(lambda: retrieval.top_k(query, index.matrix, 20), args.repeats)
    rows = list(index.matrix)
    loop = timed(
        lambda: sorted(
            ((float(torch.cosine_similarity(query[0], row, dim=0)), i) for i, row in enumerate(rows)), reverse=True
        )[:20],
        5,
    )
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"cards: {args.cards} x {index.matrix.shape[1]} float32")
    print(f"build registry (add + card per adapter): {build:.1f} s; load all cards: {load:.2f} s")
    print(f"embed one query (MiniLM-L6, median of 20): {ms(embed):.2f} ms")
    print(f"rank {args.cards} cards, top-20 (median of {args.repeats}): {ms(ranked):.3f} ms")
    print(f"per-card cosine loop, top-20 (median of 5): {ms(loop):.1f} ms  -> {ms(loop) / ms(ranked):.0f}x slower")


if __name__ == "__main__":
    main()
