"""PEFT LoRA adapter folders as plain tensors: read, check compatibility, write.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (or, for old
adapters such as the 196 LoraHub modules, a pickled `adapter_model.bin`). Saved keys
look like `base_model.model.<module path>.lora_A.weight`; here a module is keyed by
`<module path>` alone, which is also its name inside the transformers model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from ..errors import InputError, NotFoundError
from ..io import read_json
from ..registry.store import CONFIG_FILE, PEFT_DEFAULT_ALPHA, PICKLE_FILE, SAFETENSORS_FILE, lora_config_problem

if TYPE_CHECKING:
    from peft import LoraConfig

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


@dataclass
class LoraAdapter:
    """One LoRA adapter: its config fields and, per module path, A (r x d_in) and B (d_out x r).

    The delta of a module is `scaling * B @ A`, a (d_out x d_in) matrix, whatever the layer
    type: for GPT-2's Conv1D (`fan_in_fan_out`) PEFT transposes it only when merging.
    """

    name: str
    base_model_name_or_path: str | None
    r: int
    lora_alpha: float
    target_modules: list[str] | str
    task_type: str | None
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    fan_in_fan_out: bool = False
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def delta(self, module: str) -> torch.Tensor:
        A, B = self.modules[module]
        dtype = torch.promote_types(A.dtype, torch.float32)
        return self.scaling * (B.to(dtype) @ A.to(dtype))  # (d_out, r) @ (r, d_in) -> (d_out, d_in)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Keys and tensors exactly as PEFT saves them (no adapter name in the keys)."""
        state = {}
        for module, (A, B) in self.modules.items():
            state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.contiguous()
            state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B.contiguous()
        return state

    def peft_config(self) -> LoraConfig:
        """The config under which PEFT rebuilds exactly `scaling * B @ A`."""
        from peft import (
            LoraConfig,  # here, not at import: reading an adapter (a registry add's weight card) needs no PEFT
        )

        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            target_modules=self.target_modules,
            task_type=self.task_type,
            fan_in_fan_out=self.fan_in_fan_out,
            use_rslora=self.use_rslora,
            base_model_name_or_path=self.base_model_name_or_path,
            lora_dropout=0.0,
            bias="none",
        )


def load_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA folder. Raises NotFoundError for missing files, InputError for
    adapters the composition cannot represent (DoRA, other PEFT types, extra trained weights)."""
    path = Path(path)
    name = name or path.name
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise NotFoundError(f"no {CONFIG_FILE} in '{path}'.", "Point to a PEFT adapter folder.")
    config = read_json(config_path, "Re-download the adapter.")
    _check_config(config, name)
    state = _read_weights(path)
    modules = _split_modules(state, name)
    r = int(config["r"])
    for module, (A, B) in modules.items():
        if A.shape[0] != r or B.shape[1] != r:
            raise InputError(
                f"adapter '{name}': module '{module}' has rank {A.shape[0]}/{B.shape[1]} but r = {r} in its config.",
                "The folder's weights and config do not belong together; re-download the adapter.",
            )
    return LoraAdapter(
        name=name,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        r=r,
        lora_alpha=float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
        target_modules=_normalise_targets(config.get("target_modules")),
        task_type=config.get("task_type"),
        modules=modules,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        use_rslora=bool(config.get("use_rslora", False)),
    )


def _check_config(config: dict, name: str) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(
            f"adapter '{name}' is a {peft_type} adapter; only LoRA adapters can be composed.",
            "Choose a LoRA adapter (peft_type LORA).",
        )
    if config.get("use_dora"):
        raise InputError(
            f"adapter '{name}' is a DoRA adapter (use_dora: true); its magnitude vector cannot be composed.",
            "Choose a plain LoRA adapter.",
        )
    # A per-module rank or alpha would give one adapter several scalings; the formulas
    # and the exported config assume one.
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise InputError(
                f"adapter '{name}' sets {field} = {config[field]}; per-module ranks are not supported.",
                "Choose an adapter with one r and one lora_alpha.",
            )
    if "r" not in config:
        raise InputError(f"adapter '{name}': adapter_config.json has no 'r'.", "Re-download the adapter.")
    if problem := lora_config_problem({**config, "peft_type": peft_type}, targets_required=False):
        raise InputError(f"adapter '{name}': {CONFIG_FILE}: {problem}.", "Re-download the adapter.")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / SAFETENSORS_FILE).is_file():
        return load_file(path / SAFETENSORS_FILE, device="cpu")
    if (path / PICKLE_FILE).is_file():
        # weights_only refuses arbitrary pickled objects: a downloaded .bin cannot run code.
        return torch.load(path / PICKLE_FILE, map_location="cpu", weights_only=True)
    raise NotFoundError(
        f"no {SAFETENSORS_FILE} or {PICKLE_FILE} in '{path}'.", "Point to a complete PEFT adapter folder."
    )


def _split_modules(state: dict[str, torch.Tensor], name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if not match:
            # Biases, modules_to_save, DoRA magnitudes or embedding LoRAs: trained weights
            # that a composition of A and B factors would silently drop.
            raise InputError(
                f"adapter '{name}' holds '{key}', which is not a LoRA A/B weight of a linear layer.",
                "Only adapters with bias='none' and no modules_to_save can be composed.",
            )
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    if not factors:
        raise InputError(f"adapter '{name}' has no LoRA weights.", "Re-download the adapter.")
    modules = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise InputError(
                f"adapter '{name}': module '{module}' has lora_{''.join(pair)} but not both lora_A and lora_B.",
                "Re-download the adapter.",
            )
        modules[module] = (pair["A"], pair["B"])
    return modules


def _normalise_targets(targets) -> list[str] | str:
    # PEFT stores either a regex string or a list (a set, before JSON); sort lists so
    # two configs that name the same layers compare equal.
    if targets is None or isinstance(targets, str):
        return targets
    return sorted(targets)


def check_compatible(adapters: Sequence[LoraAdapter], *, same_rank: bool = False, same_scaling: bool = False) -> None:
    """Raise InputError unless the adapters can be composed: same base model, task type,
    layer layout and targeted modules; optionally the same rank and the same scaling."""
    if not adapters:
        raise InputError("no adapters to compose.", "Give at least one adapter.")
    first = adapters[0]
    checks = [
        ("base model", lambda a: a.base_model_name_or_path, "Compose adapters trained on the same base model."),
        ("task type", lambda a: a.task_type, "Compose adapters of one task type (seq2seq or causal)."),
        ("fan_in_fan_out", lambda a: a.fan_in_fan_out, "Compose adapters saved for the same layer layout."),
    ]
    if same_rank:
        checks.append(("rank r", lambda a: a.r, "This formula needs equal ranks; use --formula linear."))
    if same_scaling:
        hint = "This formula needs equal scalings; use --formula linear."
        checks.append(("scaling lora_alpha/r", lambda a: a.scaling, hint))
    for label, get, hint in checks:
        for other in adapters[1:]:
            if get(other) != get(first):
                raise InputError(
                    f"adapter '{other.name}' has {label} {get(other)!r} but '{first.name}' has {get(first)!r}.", hint
                )
    wanted = set(first.modules)
    for other in adapters[1:]:
        extra, missing = set(other.modules) - wanted, wanted - set(other.modules)
        if extra or missing:
            module, verb = (min(extra), "targets") if extra else (min(missing), "does not target")
            raise InputError(
                f"adapter '{other.name}' {verb} module '{module}', unlike '{first.name}'.",
                "Compose adapters with the same target_modules.",
            )
        for module in wanted:
            shapes = [(a.modules[module][0].shape[1], a.modules[module][1].shape[0]) for a in (first, other)]
            if shapes[0] != shapes[1]:
                raise InputError(
                    f"module '{module}' is (d_in, d_out) = {shapes[1]} in '{other.name}' "
                    f"but {shapes[0]} in '{first.name}'.",
                    "Compose adapters trained on the same base model.",
                )


def save_adapter(adapter: LoraAdapter, path: str | Path) -> Path:
    """Write a PEFT folder that `PeftModel.from_pretrained` loads. Each file is written to a
    temporary name and renamed, so a crash never leaves a half-written adapter behind."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = adapter.peft_config().to_dict()
    # LoraConfig.to_dict keeps target_modules as a set; JSON needs a list.
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    weights_tmp, config_tmp = path / f".{SAFETENSORS_FILE}.tmp", path / f".{CONFIG_FILE}.tmp"
    save_file(adapter.peft_state_dict(), weights_tmp, metadata={"format": "pt"})
    config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(weights_tmp, path / SAFETENSORS_FILE)
    os.replace(config_tmp, path / CONFIG_FILE)
    return path
