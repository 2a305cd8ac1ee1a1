"""What a weight card costs, and how fast ranking by weight cards is at scale.

    python bench/weight_cards.py size      # card bytes vs adapter bytes, build time, per shape, rank and dtype
    python bench/weight_cards.py rank [--cards 10000] [--library registry/demo]
    python bench/weight_cards.py peft [--library registry/demo]   # PEFT's 15 power-iteration steps vs exact v_1

size: synthetic PEFT folders (random factors; neither size nor time depends on the values) of three shapes:
  demo   the demo library's T5 (d_model 128; q, v of 3 encoder + 3 decoder blocks, cross-attention too: 18 modules)
  t5-large  LoraHub's flan-t5-large modules (d_model 1024; q, v everywhere: 144 modules)
  llama-7b  q_proj, v_proj of 32 blocks, 4096 x 4096 (64 modules)
Build time is `write_weight_card(folder)` end to end: read the adapter, hash it, QR + small SVD per module, write.

rank: an index of N random cards of the library's shape (its modules, widths and rank); the query is the demo
base's layer inputs on a held-out task's 5 shots (real token counts); retrieval's ranking (two stages) and the
default scorer over every card, timed after the forward pass (median of --repeats), and how much of the
one-stage top-k the two stages keep.

peft: on every module of the demo library, |cos| between PEFT's Arrow prototype (its own function, rng_seed 0)
and the exact top right singular vector, with the gap S_2 / S_1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lorahub_cli.compose.adapters import LoraAdapter, load_adapter, save_adapter
from lorahub_cli.demo import library
from lorahub_cli.eval.tasks import split
from lorahub_cli.io import sha256_file
from lorahub_cli.models import load_base_model
from lorahub_cli.settings import WEIGHTS
from lorahub_cli.spectral import scores
from lorahub_cli.spectral.card import WEIGHT_CARD, write_weight_card
from lorahub_cli.spectral.svd import lora_svd


def t5_modules(blocks: int, d: int) -> list[tuple[str, int, int]]:
    """(path, d_in, d_out) of q and v in every attention of a T5 with `blocks` encoder and decoder blocks."""
    attentions = (("encoder", [(0, "SelfAttention")]), ("decoder", [(0, "SelfAttention"), (1, "EncDecAttention")]))
    return [
        (f"{side}.block.{b}.layer.{i}.{attention}.{p}", d, d)
        for side, layers in attentions
        for b in range(blocks)
        for i, attention in layers
        for p in ("q", "v")
    ]


SHAPES = {
    "demo": t5_modules(3, 128),
    "t5-large": t5_modules(24, 1024),
    "llama-7b": [(f"model.layers.{b}.self_attn.{p}_proj", 4096, 4096) for b in range(32) for p in ("q", "v")],
}


def synthetic(folder: Path, shape: str, r: int, dtype: torch.dtype) -> Path:
    generator = torch.Generator().manual_seed(r)
    modules = {
        path: (
            torch.randn(r, d_in, generator=generator).to(dtype),
            torch.randn(d_out, r, generator=generator).to(dtype),
        )
        for path, d_in, d_out in SHAPES[shape]
    }
    targets = sorted({path.rsplit(".", 1)[1] for path, _, _ in SHAPES[shape]})
    adapter = LoraAdapter(folder.name, "bench/base", r, 2 * r, targets, "SEQ_2_SEQ_LM", modules)
    return save_adapter(adapter, folder)


def size(args) -> None:
    print(f"load {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    columns = "shape, modules, r, adapter dtype, adapter, card, card / adapter, with prototypes, with V, build, "
    columns += "of which hashing the adapter"
    print("| " + " | ".join(columns.split(", ")) + " |\n" + "| --- " * 11 + "|")
    for shape in args.shapes.split(","):
        for r in (4, 8, 16):
            for dtype in (torch.float32, torch.bfloat16):
                with tempfile.TemporaryDirectory() as tmp:
                    folder = synthetic(Path(tmp) / "a", shape, r, dtype)
                    adapter_bytes = (folder / "adapter_model.safetensors").stat().st_size
                    seconds, hashing = [], []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        write_weight_card(folder)
                        seconds.append(time.perf_counter() - start)
                        start = time.perf_counter()
                        sha256_file(folder / "adapter_model.safetensors")
                        hashing.append(time.perf_counter() - start)
                    card = (folder / WEIGHT_CARD).stat().st_size
                d_in = sum(d for _, d, _ in SHAPES[shape])
                # the alternatives: + one float32 prototype per module; + every right singular vector (float32)
                prototypes, vectors = card + 4 * d_in, card + 4 * r * d_in
                share = lambda size, whole=adapter_bytes: f"{100 * size / whole:.2f}%"  # noqa: E731
                print(
                    f"| {shape} | {len(SHAPES[shape])} | {r} | {str(dtype).split('.')[1]} "
                    f"| {adapter_bytes / 1e6:.3f} MB | {card / 1e3:.1f} kB | {share(card)} | {share(prototypes)} "
                    f"| {share(vectors)} | {1000 * statistics.median(seconds):.0f} ms "
                    f"| {1000 * statistics.median(hashing):.0f} ms |"
                )


def demo_query(root: Path):
    base = load_base_model(str(library.base_model_path(root)), dtype="float32", device="cpu")
    task = library.heldout_tasks(root)[0]["name"]
    examples = library.heldout_examples(task, root)
    shots = [examples[i] for i in split(examples, 1, 5)[0]]
    modules = sorted(load_adapter(next(iter(sorted((root / library.ADAPTERS_DIR).iterdir())))).modules)
    start = time.perf_counter()
    inputs = scores.capture_layer_inputs(base, shots, modules).merged()
    return inputs, time.perf_counter() - start, base


def rank(args) -> None:
    """The ranking retrieval runs (spectral/library.WeightScorer.rank) on N random cards of the demo shape, after
    the forward pass: the default two stages (the Arrow-centroid shortlist over every card, then the default
    scorer on the shortlist and a sample), beside the default scorer over every card (phase A's one stage)."""
    from lorahub_cli.spectral.library import References, WeightLibrary, WeightScorer

    shape = load_adapter(next(iter(sorted((args.library / library.ADAPTERS_DIR).iterdir()))))  # the library's
    # an index keeps a card's leading directions only (settings.WEIGHTS card_directions), not the adapter's rank
    n, r, modules = args.cards, min(shape.r, WEIGHTS["card_directions"]), sorted(shape.modules)
    width = {m: shape.modules[m][0].shape[1] for m in modules}
    generator = torch.Generator().manual_seed(0)
    # rows diag(S) V^T with S falling 1, 1/2, 1/3, ... (random directions: nearly orthogonal at these widths)
    fall = 1 / torch.arange(1, r + 1, dtype=torch.float32)
    spectra = {
        m: (scores.unit(torch.randn(n, r, width[m], generator=generator)) * fall[:, None]).reshape(n * r, -1)
        for m in modules
    }
    index = scores.WeightIndex(
        ids=[f"bench/{i:05d}" for i in range(n)],
        modules=modules,
        rank=r,
        prototypes={m: scores.unit(spectra[m].view(n, r, -1)[:, 0]) for m in modules},  # v_1, as a card's
        spectra=spectra,
        present=torch.ones(n, len(modules), dtype=torch.bool),
    )
    inputs, forward, base = demo_query(args.library)
    references = References(WeightLibrary(index, "bench", []), base, None, 0, 256)
    start = time.perf_counter()
    for scorer in (scores.DEFAULT_SCORER, scores.SHORTLIST_SCORER):
        references.reference(scorer, True)  # once per registry state and base model; cached on disk by lorahub
    setup = time.perf_counter() - start
    two_stage = WeightScorer(references.library, base, references)
    one_stage = WeightScorer(references.library, base, references, shortlist=n)
    two_stage.first()  # the bfloat16 copy of the prototypes: made once per index
    tokens = {m: int(x.shape[0]) for m, x in inputs.x.items()}
    print(f"load {os.getloadavg()}, torch threads {torch.get_num_threads()}, {n} cards (library shape, {r} directions)")
    low, high = min(tokens.values()), max(tokens.values())
    print(f"query: 5 shots; tokens per module {low}-{high}; forward pass {1000 * forward:.0f} ms")
    print(f"background and reference scores (once per registry state, cached): {setup:.1f} s")
    rankers = {
        "two stages, weight cards only (retrieve on a registry without data cards)": (two_stage, False),
        "two stages with the library's spread (a registry that also has data cards)": (two_stage, True),
        "one stage (default scorer on every card)": (one_stage, True),
    }
    samples = {name: [] for name in rankers}
    found = {}
    for _ in range(args.repeats):  # side by side in each repeat, so load affects all alike
        for name, (ranker, spread) in rankers.items():
            start = time.perf_counter()
            values = ranker.rank(inputs, True, spread).values
            found[name] = torch.topk(values, 20, dim=1).indices[0]
            samples[name].append(time.perf_counter() - start)
    print(f"| ranking | time after the forward pass (median of {args.repeats}) |")
    print("| --- | --- |")
    for name, seconds in samples.items():
        print(f"| {name} | {1000 * statistics.median(seconds):.1f} ms |")
    full, short = found["one stage (default scorer on every card)"], found[next(iter(rankers))]
    for k in (1, 3, 20):
        overlap = len(set(full[:k].tolist()) & set(short[:k].tolist()))
        print(f"top-{k} of the one-stage ranking kept by the two stages: {overlap}/{k}")


def peft(args) -> None:
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    config = ArrowConfig(rng_seed=0)
    config.task_adapter_names, config.gks_adapter_names = [], []
    agreement, gaps = [], []
    for folder in sorted((args.library / library.ADAPTERS_DIR).iterdir()):
        adapter = load_adapter(folder)
        for A, B in adapter.modules.values():
            layer = ArrowLoraLinearLayer(A.shape[1], config)
            theirs = layer.top_right_singular_vec_from_BA(A, B).double()
            spectrum = lora_svd(A, B, adapter.scaling)
            agreement.append(abs(float(theirs @ spectrum.Vh[0])))
            gaps.append(float(spectrum.S[1] / spectrum.S[0]))
    quantiles = lambda xs: [round(q, 5) for q in (min(xs), statistics.median(xs), max(xs))]  # noqa: E731
    print(f"{len(agreement)} modules; |cos(PEFT's v_1, exact v_1)| min/median/max {quantiles(agreement)}")
    print(f"below 0.999: {sum(a < 0.999 for a in agreement)}; S_2 / S_1 min/median/max {quantiles(gaps)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["size", "rank", "peft"])
    parser.add_argument("--shapes", default="demo,t5-large,llama-7b")
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--library", type=Path, default=library.demo_dir())
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"size": size, "rank": rank, "peft": peft}[args.what](args)


if __name__ == "__main__":
    main()
