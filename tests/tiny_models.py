"""Tiny random T5 / Llama / GPT-2 models and PEFT LoRA adapters for them, with no download.

Adapters get random NON-ZERO lora_B: a fresh PEFT LoRA is a no-op, and a test that
composes no-ops passes whatever the formula.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 64
KINDS = ("t5", "llama", "gpt2")
TARGETS = {"t5": ["q", "v"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
TASK_TYPES = {"t5": "SEQ_2_SEQ_LM", "llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM"}


@pytest.fixture(scope="module")
def one_thread():
    """Use as `pytestmark = pytest.mark.usefixtures("one_thread")`. Tiny matmuls gain nothing
    from threads, and two OpenMP threads spinning against another process on a 2-core
    machine made test files five times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_t5(seed: int = 0, layers: int = 2, vocab: int = VOCAB) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    # Two key/value heads for four query heads: v_proj is 32 -> 16, so d_out != d_in is exercised.
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2, vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=1
    )
    return GPT2LMHeadModel(config).eval()


def tiny_model(kind: str, seed: int = 0, layers: int = 2, vocab: int = VOCAB):
    return {"t5": tiny_t5, "llama": tiny_llama, "gpt2": tiny_gpt2}[kind](seed=seed, layers=layers, vocab=vocab)


def save_tiny_base(kind: str, path: str | Path, seed: int = 0):
    """A tiny random model saved with a byte-level tokenizer (ByT5's: no vocabulary file, no download).

    Returns the model; `AutoModel*.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)` load it.
    """
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer(extra_ids=0)  # ids: 0 pad, 1 </s>, 2 unk, 3 + byte
    model = tiny_model(kind, seed=seed, vocab=len(tokenizer))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return model


def kind_of(model) -> str:
    return model.config.model_type


def make_lora_adapter(
    model,
    path: str | Path,
    *,
    r: int = 4,
    alpha: float = 8,
    target_modules: list[str] | None = None,
    seed: int = 0,
    base_model_name: str | None = None,
    use_rslora: bool = False,
) -> Path:
    """Save a PEFT LoRA folder for `model` (left untouched) with random A and B drawn from `seed`.

    A ~ N(0, 1/d_in) and B ~ N(0, std(base weight)^2), so each delta is of the order of
    the base weight it modifies: large enough to move logits, small enough for bf16.
    """
    kind = kind_of(model)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules or TARGETS[kind],
        task_type=TASK_TYPES[kind],
        fan_in_fan_out=kind == "gpt2",
        use_rslora=use_rslora,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name or f"tiny-random/{kind}"
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in peft_model.modules():
            if isinstance(layer, LoraLayer):
                A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, d_in), (d_out, r)
                A.copy_(torch.randn(A.shape, generator=generator) / A.shape[1] ** 0.5)
                B.copy_(torch.randn(B.shape, generator=generator) * layer.get_base_layer().weight.std())
    # save_embedding_layers=False: "auto" asks the Hub whether the vocabulary changed.
    peft_model.save_pretrained(str(path), save_embedding_layers=False)
    return Path(path)


def make_adapters(model, folder: str | Path, n: int, *, ranks=None, alphas=None, **kwargs) -> list[Path]:
    """`n` adapters for `model` in folder/a0 ... folder/a{n-1}, seeds 0..n-1 (ranks 4, alpha 8 by default)."""
    ranks = ranks or [4] * n
    alphas = alphas or [8] * n
    return [
        make_lora_adapter(model, Path(folder) / f"a{i}", r=ranks[i], alpha=alphas[i], seed=i, **kwargs)
        for i in range(n)
    ]


def tiny_batch(model, rows: int, length: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids for `rows` rows; T5 also gets decoder inputs."""
    generator = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(2, VOCAB, (rows, length), generator=generator)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if kind_of(model) == "t5":
        batch["decoder_input_ids"] = torch.randint(2, VOCAB, (rows, length - 2), generator=generator)
    return batch


def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits.float()  # (rows, T, vocab)
