"""A trainable retriever (LoraRetriever, section 3.2): the card embedder fine-tuned contrastively.

The registry's adapters are split by task: a fraction (LoraRetriever: 40%) trains, the
rest is held out. A training step takes B adapters, two different examples of each
adapter's training data (anchor and positive), and minimises sentence-transformers'
MultipleNegativesRankingLoss: every anchor must be nearer its own positive than the
other B - 1 positives (other adapters' examples: the negatives). Every text carries
LoraRetriever's instruction prefix, as queries and inputs-only cards do.

Evaluation is retrieval of held-out adapters (unseen tasks) among all adapters: each
adapter's centroid is made, as its card would be, from the first half of its examples;
queries are examples from the second half of a held-out adapter's data. Top-1 and top-3
accuracy are reported for the untuned and the tuned embedder on the same split.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..settings import LORARETRIEVER_INSTRUCTION, RETRIEVER

METADATA_FILE = "lorahub_retriever.json"


@dataclass
class RetrieverConfig:
    tasks_fraction: float = RETRIEVER["tasks_fraction"]
    epochs: int = RETRIEVER["epochs"]
    batch_size: int = RETRIEVER["batch_size"]
    learning_rate: float = RETRIEVER["learning_rate"]
    warmup_fraction: float = RETRIEVER["warmup_fraction"]
    max_examples: int = RETRIEVER["max_examples"]
    eval_queries: int = RETRIEVER["eval_queries"]
    instruction: str = LORARETRIEVER_INSTRUCTION
    seed: int = RETRIEVER["seed"]

    def __post_init__(self):
        if not 0 < self.tasks_fraction < 1:
            raise InputError(
                f"--tasks-fraction {self.tasks_fraction} must be between 0 and 1.", "Example: --tasks-fraction 0.4"
            )
        if min(self.epochs, self.batch_size, self.max_examples, self.eval_queries) < 1 or self.batch_size < 2:
            raise InputError(
                "epochs, max examples and eval queries must be 1 or more, batch size 2 or more.",
                "Example: --epochs 1 --batch-size 32",
            )
        if self.learning_rate <= 0 or not 0 <= self.warmup_fraction < 1:
            raise InputError(
                "the learning rate must be positive and the warm-up fraction in [0, 1).", "Example: --lr 2e-5"
            )


@dataclass
class Split:
    train: list[str]
    held_out: list[str]


def split_adapters(ids: list[str], fraction: float, seed: int) -> Split:
    """A seeded split by adapter (task): at least two to train on and one held out."""
    if len(ids) < 3:
        raise InputError(
            f"training a retriever needs at least 3 adapters with cards, not {len(ids)}.",
            "Add adapters with: lorahub registry add SOURCE --data train.jsonl",
        )
    shuffled = sorted(ids)
    random.Random(seed).shuffle(shuffled)
    n_train = min(len(ids) - 1, max(2, round(fraction * len(ids))))
    return Split(sorted(shuffled[:n_train]), sorted(shuffled[n_train:]))


def _halves(examples: list[str]) -> tuple[list[str], list[str]]:
    """(card part, query part): a held-out query never helped make the centroid it is ranked against."""
    middle = max(1, len(examples) // 2)
    return examples[:middle], examples[middle:] or examples[:1]


def retrieval_accuracy(encode, data: dict[str, list[str]], held_out: list[str], config: RetrieverConfig) -> dict:
    """Top-1 / top-3 accuracy of held-out adapters' queries ranked among all adapters' centroids.

    `encode(texts)` returns L2-normalised embeddings (n, dim); texts already carry the instruction.
    """
    ids = sorted(data)
    prefix = config.instruction
    centroids = torch.stack([encode([prefix + t for t in _halves(data[i])[0]]).mean(dim=0) for i in ids])
    centroids = centroids / centroids.norm(dim=-1, keepdim=True)  # (n, dim)
    hits1 = hits3 = total = 0
    for adapter in held_out:
        queries = _halves(data[adapter])[1][: config.eval_queries]
        ranked = (encode([prefix + q for q in queries]) @ centroids.T).topk(min(3, len(ids)), dim=1).indices  # (q, 3)
        truth = ids.index(adapter)
        hits1 += int((ranked[:, 0] == truth).sum())
        hits3 += int((ranked == truth).any(dim=1).sum())
        total += len(queries)
    return {"top1": round(hits1 / total, 4), "top3": round(hits3 / total, 4), "queries": total}


def _loss_class():
    try:  # sentence-transformers >= 6 moved the losses
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    return MultipleNegativesRankingLoss


def _steps(data: dict[str, list[str]], train: list[str], config: RetrieverConfig) -> list[list[tuple[str, str]]]:
    """Every step's (anchor, positive) pairs, one pair per adapter, B distinct adapters a step."""
    rng = random.Random(config.seed)
    usable = [i for i in train if len(data[i]) >= 2]
    if len(usable) < 2:
        raise InputError(
            "at least two training adapters need two or more examples each.", "Lower --tasks-fraction or add data."
        )
    per_step = min(config.batch_size, len(usable))
    examples = sum(len(data[i]) for i in usable)
    steps = []
    for _ in range(config.epochs * max(1, math.ceil(examples / (2 * per_step)))):
        steps.append([tuple(rng.sample(data[i], 2)) for i in rng.sample(usable, per_step)])
    return steps


def train(model, data: dict[str, list[str]], split: Split, config: RetrieverConfig, progress=None) -> dict:
    """Fine-tune `model` (a SentenceTransformer, changed in place) on the training adapters' data."""
    torch.manual_seed(config.seed)
    steps = _steps(data, split.train, config)
    loss_fn = _loss_class()(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    warmup = max(1, int(config.warmup_fraction * len(steps)))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (len(steps) - s) / max(1, len(steps) - warmup)))
    )
    prefix, losses = config.instruction, []
    model.train()
    for pairs in steps:
        anchors = model.preprocess([prefix + a for a, _ in pairs])
        positives = model.preprocess([prefix + p for _, p in pairs])
        features = [{k: v.to(model.device) for k, v in f.items() if torch.is_tensor(v)} for f in (anchors, positives)]
        loss = loss_fn(features, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(round(loss.item(), 5))
        if progress:
            progress(1)
    model.eval()
    return {"steps": len(steps), "pairs_per_step": len(steps[0]), "loss_first": losses[0], "loss_last": losses[-1]}


def training_data(store, base_model: str | None, max_examples: int) -> dict[str, list[str]]:
    """Each carded adapter's training inputs, read again from the source its card records."""
    from ..cards.card import Card
    from ..cards.data import CardOptions, load_training_data

    data = {}
    for record in store.list(base_model):
        if not record.has_card:
            continue
        source = Card.load(record.path, record.id).source
        hint = f"Rebuild its card from data that is still there: lorahub card build {record.id} --data train.jsonl"
        if source.get("type") == "file":
            if not Path(source["path"]).is_file():
                raise InputError(f"the training data of '{record.id}' ({source['path']}) is gone.", hint)
            examples, _ = load_training_data(CardOptions(data=Path(source["path"]), max_examples=max_examples))
        elif source.get("type") == "hub-dataset":
            spec = (
                source["repo_id"]
                + (f":{source['config']}" if source.get("config") else "")
                + f"@{source.get('split', 'train')}"
            )
            filters = [f"{k}={v}" for k, v in (source.get("filters") or {}).items()]
            examples, _ = load_training_data(CardOptions(dataset=spec, filters=filters, max_examples=max_examples))
        else:
            raise InputError(f"the card of '{record.id}' does not record where its training data came from.", hint)
        data[record.id] = [e.input for e in examples]
    return data


def train_retriever(
    store,
    out: Path,
    config: RetrieverConfig,
    *,
    base_model: str | None = None,
    embedder: str | None = None,
    progress=None,
) -> dict:
    """Train on a split of the registry's carded adapters, evaluate on the rest, save to `out` (checked by
    outputs.check_destination before: api.train_retriever); returns the report."""
    from .. import __version__
    from ..cards.embedder import load_embedder
    from ..io import atomic_write_json
    from ..outputs import write_folder

    data = training_data(store, base_model, config.max_examples)
    split = split_adapters(list(data), config.tasks_fraction, config.seed)
    untrained = load_embedder(embedder)
    model = untrained.trainable_copy()  # the loaded embedder is cached and shared; training changes weights

    def encode(texts: list[str]) -> torch.Tensor:  # the model as it is when called: untuned, then tuned
        return model.encode(texts, convert_to_tensor=True, normalize_embeddings=True).float().cpu()

    began = time.perf_counter()
    untuned = retrieval_accuracy(encode, data, split.held_out, config)
    training = train(model, data, split, config, progress=progress)
    tuned = retrieval_accuracy(encode, data, split.held_out, config)
    report = {
        "base_embedder": untrained.key,
        "config": asdict(config),
        "train_adapters": split.train,
        "held_out_adapters": split.held_out,
        "training": training,
        "untuned": untuned,
        "tuned": tuned,
        "seconds": round(time.perf_counter() - began, 2),
        "lorahub_version": __version__,
    }

    def fill(tmp: Path) -> None:
        model.save(str(tmp))
        atomic_write_json(tmp / METADATA_FILE, report)

    report["out"] = str(write_folder(Path(out), fill, overwrite=False))
    return report
