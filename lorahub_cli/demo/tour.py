"""`lorahub demo`: the whole pipeline on the shipped demo library, offline, in seconds (docs/demo.md).

Mirror the demo adapters into a registry, split one held-out task into shots and a test set,
retrieve modules for the shots, search their weights, answer the test set with the base model
and with the composition, and write the composed adapter as a PEFT folder.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from ..io import Example
from ..quiet import no_progress
from . import library


def run(store, out: Path, **options) -> dict:
    """Run the demo into `store` and `out`; returns what happened (the `--json` answer)."""
    from ..models import torch_threads

    with torch_threads(library.THREADS):
        return _run(store, out, **options)


def _run(
    store,
    out: Path,
    *,
    task: str,
    seed: int = 1,
    shots: int = 5,
    num_modules: int = 5,
    budget: int = 40,
    max_new_tokens: int = 32,
    progress_factory=None,
    path: Path | None = None,
) -> dict:
    import torch

    from .. import retrieval
    from ..compose import pipeline
    from ..compose.bank import LoraBank
    from ..compose.folder import write_composition
    from ..compose.search import SearchConfig
    from ..eval.scoring import exact_match, normalize, score
    from ..eval.tasks import split
    from ..generation import generate
    from ..models import load_base_model

    start = time.perf_counter()
    stage = progress_factory or no_progress
    heldout = {t["name"]: t for t in library.heldout_tasks(path)}
    examples = library.heldout_examples(task, path)
    upstream = library.upstream_tasks(path)
    with stage("Mirroring the demo adapters", len(upstream)) as advance:
        library.mirror(store, progress=advance, path=path)
    shot_ids, test_ids = split(examples, seed, shots)
    few: list[Example] = [examples[i] for i in shot_ids]
    test = [examples[i] for i in test_ids]

    index = retrieval.CardIndex.from_store(store, library.BASE_MODEL)
    ranking = retrieval.task_level(index, index.embedder(), few, num_modules).results
    base = load_base_model(str(library.base_model_path(path)), dtype="float32", device="cpu")
    options = pipeline.ComposeOptions(
        base_model=library.BASE_MODEL,
        modules=[m.id for m in ranking],
        # LoraHub's search in fp32: the demo gives the result docs/demo.md shows on every CPU.
        search=SearchConfig(optimizer="ngopt", budget=budget, seed=seed, precision="fp32"),
    )
    with stage("Searching composition weights", budget) as advance:
        composition = pipeline.compose_task(
            store,
            few,
            {"task": task, "seed": seed, "count": shots},
            options,
            progress=lambda best: advance(),
            base=base,
        )
    folder = write_composition(out, composition.recipe, composition.adapters)

    inputs = [e.input for e in test]
    with stage("Answering the test set (base model)", len(inputs)) as advance:
        plain = generate(base, inputs, max_new_tokens=max_new_tokens, progress=advance)
    bank = LoraBank(base.model, composition.adapters)
    try:
        with stage("Answering the test set (composed)", len(inputs)) as advance:
            composed = generate(
                base, inputs, bank=bank, weights=torch.ones(1), max_new_tokens=max_new_tokens, progress=advance
            )
    finally:
        bank.remove()

    plain_score, composed_score = score(test, plain), score(test, composed)
    right = [(exact_match(p, e.target), exact_match(c, e.target)) for e, p, c in zip(test, plain, composed)]
    # The examples shown: first those the composition got right and the base did not, then the rest in order.
    order = sorted(range(len(test)), key=lambda i: (right[i] != (False, True), i))
    return {
        "task": task,
        "description": heldout[task].get("description"),
        "type": heldout[task].get("type"),
        "skills": heldout[task].get("skills"),
        "seed": seed,
        "shots": len(few),
        "test": len(test),
        "registry": str(store.home),
        "retrieved": [m.to_json() for m in ranking],
        "weights": composition.recipe.weights,
        "loss": composition.recipe.loss,
        **{
            metric: {"zero-shot": round(plain_score[metric], 1), "composed": round(composed_score[metric], 1)}
            for metric in ("exact_match", "option_letter")
        },
        # The score of always giving the test set's most frequent answer: what "better than chance" must beat.
        "majority_answer": round(100 * Counter(normalize(e.target) for e in test).most_common(1)[0][1] / len(test), 1),
        # Test inputs the composition answers right and the base wrong, and the other way round.
        "gained": sum(r == (False, True) for r in right),
        "lost": sum(r == (True, False) for r in right),
        "examples": [
            {"input": test[i].input, "target": test[i].target, "zero-shot": plain[i], "composed": composed[i]}
            for i in order[:3]
        ],
        "out": str(folder),
        "seconds": round(time.perf_counter() - start, 1),
    }


def explain(result: dict, top: int = 2) -> str:
    """What the composition did, in words: the modules it leaned on, with their weights, and what that fixed."""
    weights = sorted(result["weights"].items(), key=lambda kv: -abs(kv[1]))
    leaned = [f"{name} ({w:+.2f})" for name, w in weights[:top] if abs(w) >= 0.05]
    rest = len(weights) - len(leaned)
    if leaned:
        text = f"The search leaned on {' and '.join(leaned)}"
        text += f"; the other {rest} modules had smaller weights." if rest else "."
    else:
        text = "The search left every module near weight 0: the composition is close to the base model."
    fixed = f" It answers {result['gained']} test inputs right that the base model got wrong"
    fixed += f", and {result['lost']} the other way round." if result["lost"] else "."
    example = next((e for e in result["examples"] if _right(e["composed"], e) and not _right(e["zero-shot"], e)), None)
    if example:
        fixed += (
            f" For example {example['input']!r}: the base answers {example['zero-shot']!r}, "
            f"the composition {example['composed']!r}."
        )
    return text + fixed


def _right(answer: str, example: dict) -> bool:
    from ..eval.scoring import exact_match

    return exact_match(answer, example["target"])


def verdict(result: dict) -> str:
    """What the demo's numbers mean against both baselines (zero-shot, the most frequent answer), in plain words."""
    zero, composed = result["exact_match"]["zero-shot"], result["exact_match"]["composed"]
    majority = result["majority_answer"]
    beats_zero, beats_majority = composed > zero, composed > majority
    if beats_zero and beats_majority:
        return (
            f"Above both baselines: {composed:.1f}% against {zero:.1f}% for the base model alone and "
            f"{majority:.1f}% for always giving the most frequent answer, {composed - max(zero, majority):.1f} "
            "points above the better of the two. The retrieved modules carry a skill the base model lacks."
        )
    if beats_zero:
        return (
            f"Above the base model ({zero:.1f}% -> {composed:.1f}%) but not above always giving the most frequent "
            f"answer ({majority:.1f}%): the composition learnt what answers are common here, not the skill."
        )
    if beats_majority:
        return (
            f"Above always giving the most frequent answer ({majority:.1f}%) but not above the base model alone "
            f"({zero:.1f}% -> {composed:.1f}%): the modules did not add to what the base already does."
        )
    return (
        f"Below both baselines ({composed:.1f}% against {zero:.1f}% zero-shot and {majority:.1f}% for the most "
        "frequent answer): no retrieved module carries what this task needs, or the weights could not combine "
        "them (docs/demo.md, where composition fails)."
    )
