"""The precision a weight search evaluates its candidates in, and the model copy that runs it.

The base model is frozen during a search; only the N composition weights move. So the search may
evaluate candidates on a cheaper copy of the base model (bf16 weights, or int8 weights with dynamic
int8 activations) while the LoRA path (the bank) stays fp32 and the answer stays fp32: the pipeline
re-scores the best candidates on the fp32 model and reports fp32 numbers only (docs/compose.md).

    fp32  the fp32 model itself: no copy
    bf16  a bf16 copy of the frozen base weights (+50% of the model's memory); fast where the hardware
          has bf16 matrix units: AMX or AVX512-BF16 CPUs, CUDA with bf16
    int8  a copy whose linear layers other than the bank's hold int8 weights and quantise their
          activations per token (torch.ao dynamic quantisation, x86/fbgemm kernels); CPU only, and no
          gradients through those layers, so gradient-free optimisers only
    auto  fp32 for now: on AMX the bf16 search was 2x faster but ended 11-17% worse than the fp32 search on
          2 of 2 fixtures (docs/benchmarks.md), which breaks the rule that `auto` must not cost quality, and
          would make the same command give different weights on different CPU kinds; on AVX512-BF16 without AMX
          the subspace search with its fp32 finish gained no time in bf16 and peaked 40% higher (the bf16 copy)
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .. import models
from ..errors import InputError
from ..models import BaseModel

PRECISIONS = ("auto", "fp32", "bf16", "int8")
# precision -> the dtype its activations are computed in (int8: the weights only; models.DTYPES names load dtypes)
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}


def resolve(requested: str, device: torch.device, *, gradient: bool) -> str:
    """The precision to search in: `requested`, or the machine's best for `auto`; a one-line error when the
    machine (or a gradient optimiser) cannot run it, never a silent slowdown."""
    if requested not in PRECISIONS:
        raise InputError(f"--search-precision '{requested}' is not known.", f"Choose one of: {', '.join(PRECISIONS)}.")
    if requested == "auto":
        return "fp32"
    if requested == "bf16" and not _fast_bf16(device):
        where = "this GPU" if device.type == "cuda" else "this CPU (no AMX or AVX512-BF16 instructions)"
        raise InputError(
            f"--search-precision bf16: {where} would emulate bf16, many times slower than fp32.",
            "Use --search-precision auto or fp32.",
        )
    if requested == "int8":
        if device.type != "cpu":
            raise InputError(
                f"--search-precision int8 runs on CPU only, not on {device}.",
                "Use --search-precision auto, fp32 or bf16.",
            )
        if gradient:
            raise InputError(
                "--search-precision int8 has no gradients, so it cannot run a gradient optimiser.",
                "Use --optimizer ngopt (or cma, de, random), or --search-precision auto.",
            )
        if _int8_engine() is None:
            raise InputError(
                "--search-precision int8: this torch build has no int8 CPU kernels (fbgemm, x86 or onednn).",
                "Use --search-precision auto or fp32.",
            )
    return requested


def _fast_bf16(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else models.cpu_has_fast_bf16()


def _supported_engines() -> list[str]:
    return torch.backends.quantized.supported_engines


def _int8_engine() -> str | None:
    try:
        from torch.ao.quantization import quantize_dynamic  # noqa: F401  (deprecated in torch 2.13, still shipped)
    except ImportError:
        return None
    engines = _supported_engines()
    return next((e for e in ("x86", "fbgemm", "onednn") if e in engines), None)


def search_model(answer: BaseModel, precision: str, keep: set[str]) -> BaseModel:
    """The model a search in `precision` evaluates candidates on, made from the fp32 `answer` model without
    changing it. `keep`: names of the layers the bank wraps; they keep their fp32 nn.Linear (int8)."""
    if precision == "fp32":
        return answer
    dtype = COMPUTE_DTYPES[precision]
    # A structural copy whose parameters are bf16 copies (bf16) or the answer's own tensors (int8, where
    # the quantised layers get their own int8 weights): the fp32 model is never duplicated.
    memo = {}
    for tensor in [*answer.model.parameters(), *answer.model.buffers()]:
        if id(tensor) not in memo:
            cast = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor
            memo[id(tensor)] = nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) else cast
    model = copy.deepcopy(answer.model, memo)
    if precision == "int8":
        _quantize_int8(model, keep)
    return BaseModel(
        model.eval(), answer.tokenizer, answer.is_seq2seq, answer.device, dtype, answer.name, answer.trust_remote_code
    )


def _quantize_int8(model: nn.Module, keep: set[str]) -> None:
    """torch.ao dynamic quantisation of every nn.Linear outside `keep`, in place. torchao, its maintained
    replacement, was 1.4x slower per evaluation on CPU here and would be a new dependency
    (docs/benchmarks.md#search-precision-amx), so torch.ao it is while torch ships it. Its int8 linear passes no
    gradient to its input (silently), which is why int8 is refused for gradient optimisers."""
    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = _int8_engine()
    targets = {name for name, module in model.named_modules() if type(module) is nn.Linear and name not in keep}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice: see the docstring
        quantize_dynamic(model, targets, dtype=torch.qint8, inplace=True)
