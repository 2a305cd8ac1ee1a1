"""Base models for composition: loading (seq2seq or decoder-only), dtype and device, and the few-shot loss.

The loss is teacher-forced cross-entropy over target tokens only. For a set of
K examples it is the mean over all their target tokens,

    L = sum_k sum_t CE(k, t) / sum_k T_k,

which does not depend on how the examples are batched (the reference divides a
batch mean by the number of examples, so its scale changes with batch size).
"""

from __future__ import annotations

import functools
import platform
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import InputError
from .io import Example

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AMX or AVX512-BF16), where bf16 beats fp32.

    Without them torch emulates bf16 and a matrix product is tens of times slower than fp32.
    """
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@contextmanager
def torch_threads(n: int):
    """Run torch with `n` intra-op threads, then restore. Tiny models gain nothing from threads, and on a
    busy 2-core machine two spinning OpenMP threads made the demo's 1.4M-parameter model 75x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device '{device}' is not a torch device.", "Use auto, cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device '{device}' asks for CUDA, which this machine does not have.", "Use --device cpu.")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 where it is fast (CUDA with bf16 support, CPUs with AMX/AVX512-BF16), else float32."""
    if dtype == "auto":
        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"--dtype '{dtype}' is not supported.", "Use auto, float32 or bfloat16.")
    return DTYPES[dtype]


@dataclass
class BaseModel:
    model: torch.nn.Module
    tokenizer: object
    is_seq2seq: bool
    device: torch.device
    dtype: torch.dtype
    name: str | None = None  # what it was loaded from, to load it again in another dtype
    trust_remote_code: bool = False
    _fp32: BaseModel | None = field(default=None, repr=False)

    def fp32(self) -> BaseModel:
        """This model in float32, loaded once from `name` when it runs in another dtype: every number a user
        reads as a result (a loss, an objective) is computed on it, whatever dtype the search ran in.
        Reloaded, not upcast, because upcasting bf16 weights does not give back the checkpoint's fp32 ones."""
        if self.dtype == torch.float32:
            return self
        if self._fp32 is None:
            if self.name is None:
                raise InputError(
                    f"this {self.dtype} model has no name to load it again in float32.", "Load it with load_base_model."
                )
            self._fp32 = load_base_model(
                self.name, dtype="float32", device=str(self.device), trust_remote_code=self.trust_remote_code
            )
        return self._fp32


LOCAL_MODELS = {"lorahub-demo/tiny-flan-t5": ("demo", "base")}
"""Base models that ship inside lorahub (not on the Hub), by the name their adapters record -> folder
under the shipped registry data. `load_base_model` resolves these names without touching the network."""


def local_model_path(name: str) -> Path | None:
    """Where a base model that ships inside lorahub is, or None for any other name."""
    from .settings import shipped_dir

    parts = LOCAL_MODELS.get(name)
    return shipped_dir().joinpath(*parts) if parts else None


def load_base_model(
    name_or_path: str, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False
) -> BaseModel:
    """Load a seq2seq or causal LM and its tokenizer, frozen, in eval mode; a LOCAL_MODELS name loads lorahub's copy."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from .hub import hub_errors
    from .quiet import quiet_loading

    local = local_model_path(name_or_path)
    name_or_path = str(local) if local is not None else name_or_path
    check_model_name(name_or_path)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    with hub_errors(name_or_path), quiet_loading():
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        loader = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
        model = loader.from_pretrained(name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model.to(target).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        # Decoder-only tokenizers often have no pad token; padded positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model, tokenizer, is_seq2seq, target, torch_dtype, name_or_path, trust_remote_code)


def check_model_name(name_or_path: str) -> None:
    """A folder that exists or a well-formed Hub id; transformers would report anything else as an OSError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(name_or_path).expanduser().exists():
        return
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise InputError(
            f"'{name_or_path}' is neither a model folder nor a Hub model id (NAMESPACE/NAME).",
            "Give --model-path the folder of a local copy of the base model.",
        ) from None


@dataclass
class EncodedBatch:
    """K examples as model inputs, plus the labels (-100 outside target tokens)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # (K, T_label)
    n_tokens: torch.Tensor  # (K,) target tokens per example

    def repeat(self, times: int) -> EncodedBatch:
        """The batch tiled `times` times, candidate-major: row p*K + k is example k for candidate p."""
        tile = lambda t: t.repeat(times, *([1] * (t.dim() - 1)))  # noqa: E731
        return EncodedBatch({k: tile(v) for k, v in self.inputs.items()}, tile(self.labels), tile(self.n_tokens))


def _ids(tokenizer, texts: list[str], max_length: int, add_special_tokens: bool = True) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length)["input_ids"]


def encode(
    base: BaseModel, examples: list[Example], *, max_input_length: int = 1024, max_target_length: int = 256
) -> EncodedBatch:
    """Tokenise (input, target) pairs: encoder inputs + labels for seq2seq, prompt + target for causal LMs."""
    if any(e.target is None for e in examples):
        raise InputError(
            "every shot needs a target to compute a loss.",
            'Each line must look like {"input": "...", "target": "..."}.',
        )
    tok, pad = base.tokenizer, base.tokenizer.pad_token_id
    inputs = _ids(tok, [e.input for e in examples], max_input_length)
    if base.is_seq2seq:
        targets = _ids(tok, [e.target for e in examples], max_target_length)
        width, label_width = max(map(len, inputs)), max(map(len, targets))
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in inputs])
        labels = torch.tensor([t + [-100] * (label_width - len(t)) for t in targets])
        batch = {
            "input_ids": ids,
            "attention_mask": (torch.arange(width) < torch.tensor([[len(x)] for x in inputs])).long(),
        }
        batch["decoder_input_ids"] = base.model.prepare_decoder_input_ids_from_labels(labels=labels)
    else:
        # The target continues the prompt after a space; no special tokens inside the sequence.
        targets = _ids(tok, [" " + e.target for e in examples], max_target_length, add_special_tokens=False)
        if tok.eos_token_id is not None:
            targets = [t + [tok.eos_token_id] for t in targets]
        rows = [x + t for x, t in zip(inputs, targets)]
        width = max(map(len, rows))
        # Left padding puts every target at the end, so only the last positions need logits.
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        labels = torch.tensor([[-100] * (width - len(t)) + t for t in targets])
        batch = {"input_ids": ids, "attention_mask": mask}
    n_tokens = (labels != -100).sum(dim=1)
    return EncodedBatch(
        {k: v.to(base.device) for k, v in batch.items()}, labels.to(base.device), n_tokens.to(base.device)
    )


def token_losses(base: BaseModel, batch: EncodedBatch) -> torch.Tensor:
    """Summed target-token cross-entropy per row, shape (rows,), float32. Differentiable."""
    if base.is_seq2seq:
        logits = base.model(**batch.inputs, use_cache=False).logits  # (rows, T_label, vocab)
        labels = batch.labels
    else:
        keep = int((batch.labels != -100).sum(dim=1).max()) + 1
        position_ids = (batch.inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        logits = base.model(**batch.inputs, position_ids=position_ids, use_cache=False, logits_to_keep=keep).logits
        logits, labels = logits[:, :-1], batch.labels[:, -(keep - 1) :]  # position t predicts token t + 1
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (rows, T)
    return ce.sum(dim=1)


def mean_token_loss(sums: torch.Tensor, n_tokens: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-candidate mean over all target tokens: sums and n_tokens are (groups*K,), candidate-major."""
    return sums.view(groups, -1).sum(dim=1) / n_tokens.view(groups, -1).sum(dim=1).clamp_min(1)
