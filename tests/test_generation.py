"""Batched generation under per-row weights against PEFT, one unpadded input at a time."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tiny_models import (
    KINDS,
    make_adapters,
    one_thread,  # noqa: F401  (fixture)
    save_tiny_base,
)
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from lorahub_cli.compose.adapters import load_adapter, save_adapter
from lorahub_cli.compose.bank import LoraBank
from lorahub_cli.compose.formulas import combine
from lorahub_cli.errors import InputError
from lorahub_cli.generation import generate
from lorahub_cli.io import Example
from lorahub_cli.models import encode, load_base_model, token_losses

pytestmark = pytest.mark.usefixtures("one_thread")

INPUTS = ["abc", "a much longer input, so the batch is padded", "xy", "hello there", "0123456789"]
NEW_TOKENS = 8


def decode_ids(tokenizer):
    """Decode to token ids: a tiny random model's bytes are mostly invalid UTF-8, which text
    decoding drops, so only ids show every difference."""

    def batch_decode(rows, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in row if int(t) > 2) for row in rows]

    tokenizer.batch_decode = batch_decode
    tokenizer.decode = lambda row, skip_special_tokens=True: batch_decode([row])[0]
    return tokenizer


def load(folder):
    base = load_base_model(str(folder / "base"), dtype="float32", device="cpu")
    decode_ids(base.tokenizer)
    return base


@pytest.fixture(scope="module", params=KINDS)
def world(request, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    model = save_tiny_base(kind, folder / "base")
    paths = make_adapters(model, folder / "adapters", 3, base_model_name=str(folder / "base"))
    return kind, folder, [load_adapter(p) for p in paths]


def peft_generate(kind, folder, adapter, text, tmp_path):
    """PEFT's own model with the composed adapter, one input alone: no padding, no bank."""
    save_adapter(adapter, tmp_path / adapter.name)
    loader = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    model = PeftModel.from_pretrained(loader.from_pretrained(folder / "base"), tmp_path / adapter.name).eval()
    base = load(folder)
    ids = base.tokenizer([text], return_tensors="pt")
    out = model.generate(
        **ids,
        do_sample=False,
        num_beams=1,
        max_new_tokens=NEW_TOKENS,
        pad_token_id=base.tokenizer.pad_token_id,
        eos_token_id=base.tokenizer.eos_token_id,
    )
    if kind != "t5":
        out = out[:, ids["input_ids"].shape[1] :]
    return base.tokenizer.decode(out[0], skip_special_tokens=True).strip()


@pytest.mark.parametrize("formula", ["elementwise", "linear"])
def test_each_row_generates_what_its_own_composition_generates_alone(world, formula, tmp_path):
    kind, folder, adapters = world
    base = load(folder)
    bank = LoraBank(base.model, adapters, mode=formula)
    W = torch.randn(len(INPUTS), 3, generator=torch.Generator().manual_seed(1)) * 4
    together = generate(base, INPUTS, bank=bank, weights=W, max_new_tokens=NEW_TOKENS, batch_size=3)
    for row, text in enumerate(INPUTS):
        adapter = combine(adapters, W[row].tolist(), formula, name=f"row{row}")
        assert together[row] == peft_generate(kind, folder, adapter, text, tmp_path), (kind, formula, row)
    assert len(set(together)) > 1  # the rows really differ, so the comparison can fail


def test_batched_generation_equals_single_requests(world, cpu_kind):
    """In fp32 a row's answer does not depend on what it is batched with. In bf16 (what `--dtype auto` picks on
    AMX / AVX512-BF16 CPUs) padding and batch shape change the rounding, so a near-tie between two tokens
    can flip and the continuation diverge (docs/serve.md); the row's numbers still agree to bf16 precision."""
    kind, folder, adapters = world
    base = load_base_model(str(folder / "base"), dtype="auto", device="cpu")
    assert base.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[cpu_kind]
    decode_ids(base.tokenizer)
    bank = LoraBank(base.model, adapters)
    W = torch.randn(len(INPUTS), 3, generator=torch.Generator().manual_seed(2)) * 4
    together = generate(base, INPUTS, bank=bank, weights=W, max_new_tokens=NEW_TOKENS, batch_size=len(INPUTS))
    alone = [
        generate(base, [text], bank=bank, weights=W[row], max_new_tokens=NEW_TOKENS)[0]
        for row, text in enumerate(INPUTS)
    ]
    assert len(set(alone)) > 1  # the rows really differ, so a mixed-up row would show
    if cpu_kind == "fp32":
        assert together == alone
        return
    # bf16: greedy answers may differ at a near-tie, but the numbers behind them agree to bf16's precision.
    examples = [Example(text, "the answer") for text in INPUTS]
    with torch.no_grad():
        with bank.weights(W):
            batched = token_losses(base, encode(base, examples))
        single = []
        for row, example in enumerate(examples):
            with bank.weights(W[row]):
                single.append(token_losses(base, encode(base, [example])))
    torch.testing.assert_close(batched, torch.cat(single), rtol=5e-3, atol=0)  # bf16 keeps 8 bits: eps 7.8e-3


def test_without_a_bank_it_is_the_base_model_and_order_is_kept(world):
    kind, folder, _ = world
    base = load(folder)
    batched = generate(base, INPUTS, max_new_tokens=NEW_TOKENS, batch_size=2)
    alone = [generate(base, [text], max_new_tokens=NEW_TOKENS)[0] for text in INPUTS]
    assert batched == alone


def test_bad_weights_are_refused(world):
    _, folder, adapters = world
    base = load_base_model(str(folder / "base"), dtype="float32", device="cpu")
    bank = LoraBank(base.model, adapters)
    with pytest.raises(InputError, match="do not fit 5 inputs and 3 adapters"):
        generate(base, INPUTS, bank=bank, weights=torch.ones(4, 3))
    with pytest.raises(InputError, match="without a LoRA bank"):
        generate(base, INPUTS, weights=torch.ones(3))
