"""A weight card: what retrieval and Arrow need from an adapter's weights, with no training data.

One file beside the adapter, `lorahub_weights.safetensors`:
  sigma  (L, r) float32     each targeted module's singular values of s B A, descending
  core   (L, m, r) float32  the first m rows of K per module: diag(sigma) V^T = K A (spectral/svd.py), so
                            K[:m] A = the m leading right singular vectors, scaled by their singular values
and, in the safetensors header, the module paths (the L rows, sorted), r, m, the scaling, the sha256 of the
adapter weights it was built from, and the sha256 of all of that plus the tensor bytes.

The right singular vectors themselves are not stored: with the adapter's A they are one small product away,
and storing them would cost r d_in floats per module, as much as A. What the card holds is (m r + r) floats
per module against the adapter's r (d_in + d_out): a share (m + 1) / (d_in + d_out) of an fp32 adapter plus
the header. m = min(r, settings.WEIGHTS["card_directions"]) (4): the leading directions carry nearly all of
a trained delta's energy, and keeping all r would cost (r + 1) / (2 d), 9% of the demo's r = 16, d = 96
adapters (docs/weights.md has the sizes and the accuracy with 1, 4 and all 16 directions).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .. import __version__
from ..compose.adapters import LoraAdapter, load_adapter
from ..errors import IntegrityError, NotFoundError
from ..io import atomic_write_bytes, sha256_file
from ..registry.store import PICKLE_FILE, SAFETENSORS_FILE, WEIGHT_CARD
from ..settings import WEIGHTS
from .svd import lora_svd

FORMAT_VERSION = 2  # 1 (phase A) stored all r rows of K
REBUILD = "lorahub registry rebuild"
SIGMA_RTOL = 1e-4  # a card read against its own adapter reproduces sigma to fp32 rounding; another's does not


@dataclass
class WeightCard:
    modules: list[str]  # module paths, sorted; row l of sigma and core
    rank: int
    scaling: float
    sigma: torch.Tensor  # (L, r) float32
    core: torch.Tensor  # (L, m, r) float32: the first m rows of K
    adapter_sha256: str  # of the weights file the card was built from
    lorahub_version: str = __version__

    def metadata(self) -> dict[str, str]:
        return {
            "format": str(FORMAT_VERSION),
            "modules": json.dumps(self.modules),
            "rank": str(self.rank),
            "directions": str(self.directions),
            "scaling": repr(self.scaling),
            "adapter_sha256": self.adapter_sha256,
            "lorahub_version": self.lorahub_version,
        }

    @property
    def directions(self) -> int:
        """m: the leading right singular directions the card gives per module."""
        return self.core.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"sigma": self.sigma.float().contiguous(), "core": self.core.float().contiguous()}

    def save(self, folder: Path) -> dict[str, str]:
        """Write the card atomically; returns {file name: sha256}."""
        meta, tensors = self.metadata(), self.tensors()
        meta["sha256"] = _digest(meta, tensors)
        atomic_write_bytes(Path(folder) / WEIGHT_CARD, save(tensors, metadata=meta))
        return {WEIGHT_CARD: sha256_file(Path(folder) / WEIGHT_CARD)}

    @classmethod
    def load(cls, folder: Path, name: str = "") -> WeightCard:
        path, label = Path(folder) / WEIGHT_CARD, name or str(folder)
        if not path.is_file():
            raise NotFoundError(f"'{label}' has no weight card.", f"Build one with: {REBUILD}")
        try:
            raw = path.read_bytes()
            tensors = load(raw)
            meta = _header_metadata(raw)
            if meta.get("format") != str(FORMAT_VERSION):
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT_VERSION}")
            if meta.pop("sha256", None) != _digest(meta, tensors):
                raise ValueError("its contents do not match the sha256 it records")
            card = cls(
                modules=json.loads(meta["modules"]),
                rank=int(meta["rank"]),
                scaling=float(meta["scaling"]),
                sigma=tensors["sigma"],
                core=tensors["core"],
                adapter_sha256=meta["adapter_sha256"],
                lorahub_version=meta.get("lorahub_version", ""),
            )
            L, r, m = len(card.modules), card.rank, int(meta["directions"])
            if card.sigma.shape != (L, r) or card.core.shape != (L, m, r) or not 1 <= m <= r:
                raise ValueError(
                    f"tensors of shape {tuple(card.sigma.shape)}, {tuple(card.core.shape)} for {L} x {m} x {r}"
                )
        except (ValueError, KeyError, TypeError, OSError, RuntimeError, SafetensorError) as error:
            raise damaged(label, error) from None
        return card

    def spectra(self, adapter: LoraAdapter, name: str = "") -> dict[str, torch.Tensor]:
        """Per module, the m leading rows of diag(S) V^T = K A (m x d_in, float32): the scaled right singular
        vectors as rows.

        Raises IntegrityError if the adapter is not the one the card was built from (other modules, or
        singular values that its A does not reproduce)."""
        label = name or adapter.name
        if sorted(adapter.modules) != self.modules or adapter.r != self.rank:
            raise damaged(label, ValueError("it describes other modules or another rank than the adapter's"))
        out = {}
        for row, module in enumerate(self.modules):
            A = adapter.modules[module][0].to(torch.float64)
            rows = self.core[row].to(torch.float64) @ A  # (m, d_in)
            sigma = self.sigma[row, : self.directions].to(torch.float64)
            if not torch.allclose(rows.norm(dim=1), sigma, rtol=SIGMA_RTOL, atol=SIGMA_RTOL * float(sigma[0])):
                raise damaged(label, ValueError(f"module '{module}' does not reproduce its singular values"))
            out[module] = rows.float()
        return out

    def prototypes(self, adapter: LoraAdapter, name: str = "") -> dict[str, torch.Tensor]:
        """Per module, Arrow's prototype: the top right singular vector (d_in,), unit norm; zero for a zero delta."""
        spectra = self.spectra(adapter, name)
        return {m: prototype(spectra[m], self.sigma[row]) for row, m in enumerate(self.modules)}


def prototype(spectrum_rows: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The first row of diag(S) V^T divided by S_1: v_1, or zeros when the delta is zero."""
    return spectrum_rows[0] / sigma[0] if float(sigma[0]) > 0 else torch.zeros_like(spectrum_rows[0])


def damaged(label: str, error: Exception) -> IntegrityError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return IntegrityError(
        f"the weight card of '{label}' is damaged or stale ({reason}).", f"Rebuild it with: {REBUILD}"
    )


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _header_metadata(raw: bytes) -> dict[str, str]:
    # safetensors' load() returns the tensors only; its header (8-byte length, then JSON) holds the metadata.
    size = int.from_bytes(raw[:8], "little")
    if size > len(raw) - 8:
        raise ValueError("the file is truncated")
    return dict(json.loads(raw[8 : 8 + size]).get("__metadata__") or {})


def adapter_weights_file(folder: Path) -> Path:
    """The weights file of an adapter folder: safetensors, or a legacy pickle .bin."""
    folder = Path(folder)
    for name in (SAFETENSORS_FILE, PICKLE_FILE):
        if (folder / name).is_file():
            return folder / name
    raise NotFoundError(f"no {SAFETENSORS_FILE} or {PICKLE_FILE} in '{folder}'.", "Point to a PEFT adapter folder.")


def build_weight_card(
    adapter: LoraAdapter, adapter_sha256: str, directions: int = WEIGHTS["card_directions"]
) -> WeightCard:
    """The card of an adapter already read: one QR-and-small-SVD per module (spectral/svd.py), in float64,
    keeping K's first min(r, directions) rows."""
    modules = sorted(adapter.modules)
    spectra = [lora_svd(*adapter.modules[m], adapter.scaling, vectors=False) for m in modules]
    keep = min(adapter.r, directions)
    return WeightCard(
        modules=modules,
        rank=adapter.r,
        scaling=adapter.scaling,
        sigma=torch.stack([s.S for s in spectra]).float(),
        core=torch.stack([s.K[:keep] for s in spectra]).float(),
        adapter_sha256=adapter_sha256,
    )


def write_weight_card(folder: Path, name: str | None = None, adapter_sha256: str | None = None) -> dict[str, str]:
    """Build the card of a PEFT LoRA folder and write it there (atomically); returns {file name: sha256}.
    `adapter_sha256`: the weights file's known hash (else it is hashed). The registry's `Store.weight_card`."""
    folder = Path(folder)
    adapter = load_adapter(folder, name)
    return build_weight_card(adapter, adapter_sha256 or sha256_file(adapter_weights_file(folder))).save(folder)


def load_checked(folder: Path, name: str = "", adapter_sha256: str | None = None) -> tuple[WeightCard, LoraAdapter]:
    """The card of an adapter folder and the adapter, after checking they belong together.

    `adapter_sha256`: the weights file's known hash (a registry records it), else the file is hashed."""
    folder = Path(folder)
    label = name or folder.name
    card = WeightCard.load(folder, label)
    actual = adapter_sha256 or sha256_file(adapter_weights_file(folder))
    if actual != card.adapter_sha256:
        raise damaged(label, ValueError("it was built from other adapter weights"))
    return card, load_adapter(folder, label)
