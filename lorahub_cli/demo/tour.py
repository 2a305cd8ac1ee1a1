"""`lorahub demo`: the whole pipeline on the shipped demo library, offline, in seconds (docs/demo.md).

Mirror the demo adapters into a registry, split one held-out task into shots and a test set,
retrieve modules for the shots, search their weights, answer the test set with the base model
and with the composition, and write the composed adapter as a PEFT folder.

The demo keeps what it made in its own folder, the demo home (`--home`, default HOME-demo beside the
lorahub home), so that a user can go on from there with the everyday commands, offline:

    lorahub-demo.json            what the demo wrote there, with hashes (the folder is the demo's)
    registry/                    the demo registry: LORAHUB_HOME for the next commands
    tasks/<task>/shots.jsonl     the held-out task's shots, and inputs.jsonl, five of its test inputs
    compositions/<task>/         the demo's composition of the task (replaced when the demo runs it again)

It never writes into a folder it did not make, and replaces only files it wrote that nobody changed since.
"""

from __future__ import annotations

import json
import shlex
import time
from collections import Counter
from pathlib import Path

from ..errors import InputError
from ..io import Example, atomic_write_bytes, atomic_write_json, read_json, sha256_file
from ..quiet import no_progress
from . import library

MARKER = "lorahub-demo.json"
REGISTRY, TASKS, COMPOSITIONS = "registry", "tasks", "compositions"
INPUTS = 5  # test inputs in tasks/<task>/inputs.jsonl: enough to see answers, few enough to read them


def run(store, out: Path, **options) -> dict:
    """Run the demo into `store` and `out` (with `overwrite`, replacing a composition written there before);
    returns what happened (the `--json` answer)."""
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
    overwrite: bool = False,
) -> dict:
    import torch

    from .. import retrieval
    from ..compose import pipeline
    from ..compose.bank import LoraBank
    from ..compose.folder import write_composition
    from ..compose.search import SearchConfig
    from ..eval.scoring import exact_match, normalize, score
    from ..generation import generate
    from ..models import load_base_model

    start = time.perf_counter()
    stage = progress_factory or no_progress
    heldout = {t["name"]: t for t in library.heldout_tasks(path)}
    upstream = library.upstream_tasks(path)
    with stage("Mirroring the demo adapters", len(upstream)) as advance:
        library.mirror(store, progress=advance, path=path)
    few, test = task_split(task, seed, shots, path)

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
    folder = write_composition(out, composition.recipe, composition.adapters, overwrite=overwrite)

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
    return text + fixed + (f", and {result['lost']} the other way round." if result["lost"] else ".")


def scores(result: dict) -> list[str]:
    """The three exact-match scores, one a line, each named in words."""
    em = result["exact_match"]
    rows = [
        (em["composed"], "composed (the retrieved modules with the searched weights)"),
        (em["zero-shot"], "the base model alone (zero-shot)"),
        (result["majority_answer"], "always giving the most frequent answer"),
    ]
    head = f"Exact match on the {result['test']} test inputs (the share of answers equal to the target):"
    return [head] + [f"  {value:5.1f}%  {name}" for value, name in rows]


def verdict(result: dict) -> str:
    """What the demo's numbers mean against both baselines (zero-shot, the most frequent answer), in plain words,
    in lines of at most 80 characters."""
    zero, composed = result["exact_match"]["zero-shot"], result["exact_match"]["composed"]
    majority = result["majority_answer"]
    beats_zero, beats_majority = composed > zero, composed > majority
    if beats_zero and beats_majority:
        return (
            f"Above both baselines, by {composed - max(zero, majority):.1f} points over the better of the two:\n"
            "the retrieved modules carry a skill the base model lacks."
        )
    if beats_zero:
        return (
            "Above the base model but not above always giving the most frequent answer:\n"
            "the composition learnt what answers are common here, not the skill."
        )
    if beats_majority:
        return (
            "Above always giving the most frequent answer, not above the base model alone:\n"
            "the modules did not add to what the base model already does."
        )
    return (
        "Below both baselines: no retrieved module carries what this task needs, or\n"
        "the weights could not combine them (docs/demo.md, where composition fails)."
    )


def task_split(task: str, seed: int, shots: int, path: Path | None = None) -> tuple[list[Example], list[Example]]:
    """The held-out task's shots and test set, as the demo (and `eval demo`, with the same seed) splits them."""
    from ..eval.tasks import split

    examples = library.heldout_examples(task, path)
    shot_ids, test_ids = split(examples, seed, shots)
    return [examples[i] for i in shot_ids], [examples[i] for i in test_ids]


# --- the demo home ---------------------------------------------------------------------------------


def default_home() -> Path:
    """The demo home: HOME-demo beside the lorahub home, or the demo home whose registry the lorahub home
    already is (after the demo's `export LORAHUB_HOME=...` line, `lorahub demo` runs in the same folder)."""
    from ..settings import home

    lorahub_home = home().expanduser().resolve()
    if lorahub_home.name == REGISTRY and (lorahub_home.parent / MARKER).is_file():
        return lorahub_home.parent
    return lorahub_home.with_name(lorahub_home.name + "-demo")


def check_home(folder: Path) -> Path:
    """Refuse, before any work, a demo home that lorahub demo did not make: an existing folder that is not
    empty and has no MARKER (or a file). Returns `folder` resolved."""
    from ..outputs import check_output

    folder = check_output(folder, into=True)
    hint = "Choose another --home (lorahub demo makes its own folder there)."
    if folder.exists() and not folder.is_dir():
        raise InputError(f"the demo home '{folder}' is a file.", hint)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise InputError(f"'{folder}' holds files and lorahub demo did not make it (it has no {MARKER}).", hint)
    return folder


def open_home(folder: Path) -> dict:
    """Make (or reopen) the demo home `folder`, checked by check_home; returns its MARKER record."""
    marker = folder / MARKER
    if marker.is_file():
        return read_json(marker, f"Remove {marker} and the folder, or choose another --home.")
    folder.mkdir(parents=True, exist_ok=True)
    record = {"format": 1, "made_by": "lorahub demo", "registry": REGISTRY, "files": {}}
    atomic_write_json(marker, record)
    return record


def write_task_files(folder: Path, record: dict, task: str, few: list[Example], test: list[Example]) -> dict:
    """tasks/<task>/shots.jsonl and inputs.jsonl for the next commands. A file the demo wrote is replaced (the
    same content, or another seed's); one changed since it was written is the user's and is kept. Returns
    {"shots", "inputs"}: their paths, and "kept": the files left as they were."""
    files, kept = {}, []
    rows = {
        "shots": [{"input": e.input, "target": e.target} for e in few],
        "inputs": [{"input": e.input} for e in test[:INPUTS]],
    }
    for name, lines in rows.items():
        relative = f"{TASKS}/{task}/{name}.jsonl"
        path = folder / relative
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
        if path.exists() and sha256_file(path) != record["files"].get(relative):
            kept.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            record["files"][relative] = sha256_file(path)
        files[name] = str(path)
    atomic_write_json(folder / MARKER, record)
    return files | {"kept": kept}


def next_commands(folder: Path, task: str, num_modules: int) -> list[str]:
    """The everyday commands on the demo home, offline: go to the task's folder, use the demo registry, retrieve
    for the task's shots, compose them, answer five test inputs with the composition."""
    return [
        f"cd {shell_path(folder)}",
        f'export LORAHUB_HOME="$PWD/{REGISTRY}"',
        f"cd {TASKS}/{task}",
        f"lorahub retrieve --shots shots.jsonl -k {num_modules}",
        f"lorahub compose --shots shots.jsonl -n {num_modules} --out my-lora",
        "lorahub generate --adapter my-lora --inputs inputs.jsonl",
    ]


def shell_path(path: Path) -> str:
    """`path` as a shell word: ~/... under the user's home when that needs no quoting, else quoted."""
    path = Path(path)
    try:
        rest = str(path.relative_to(Path.home()))
    except ValueError:
        return shlex.quote(str(path))
    return f"~/{rest}" if shlex.quote(rest) == rest and rest != "." else shlex.quote(str(path))
