"""Bringing adapters into the store: from a Hub repository (pinned to a commit) or a local folder.

Every adapter ends up as adapter_config.json + adapter_model.safetensors. A
pickle adapter_model.bin is read with torch.load(weights_only=True), which
refuses arbitrary objects, converted, and the original file's hash recorded.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..cards.card import CARD_FILES, Card
from ..errors import InputError, IntegrityError, LorahubError
from ..io import read_json, sha256_file
from .store import (
    CONFIG_FILE,
    PEFT_DEFAULT_ALPHA,
    PICKLE_FILE,
    SAFETENSORS_FILE,
    AdapterRecord,
    Store,
    check_id,
    lora_config_problem,
    nonfinite_tensors,
    text_problem,
)

WANTED = (CONFIG_FILE, SAFETENSORS_FILE, PICKLE_FILE, "README.md", *CARD_FILES)


@dataclass
class MirrorResult:
    id: str
    status: str  # added | updated | skipped | failed
    revision: str | None = None
    message: str = ""
    record: AdapterRecord | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "status": self.status, "revision": self.revision, "message": self.message}


def _read_config(folder: Path, label: str, shown: str) -> dict:
    """The adapter's config; errors name `shown`, where the user's copy is (not the staging folder)."""
    config = read_json(folder / CONFIG_FILE, f"Re-save '{label}' with PEFT.", shown=shown)
    if not isinstance(config, dict):
        raise InputError(
            f"{shown} is not a JSON object (it holds a {type(config).__name__}).", f"Re-save '{label}' with PEFT."
        )
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InputError(
            f"'{label}' is not a LoRA adapter (peft_type {config.get('peft_type')!r}).",
            "lorahub stores PEFT LoRA adapters only.",
        )
    for key in ("r", "target_modules", "base_model_name_or_path"):
        if config.get(key) is None:
            raise InputError(f"'{label}' has no '{key}' in {CONFIG_FILE}.", "Re-save the adapter with PEFT.")
    base_model = config["base_model_name_or_path"]
    if problem := lora_config_problem(config) or text_problem("base_model_name_or_path", base_model, False):
        raise InputError(f"{shown}: {problem}.", f"Re-save '{label}' with PEFT.")
    return config


def _convert_pickle(folder: Path, label: str) -> dict:
    """Replace adapter_model.bin by adapter_model.safetensors; returns what was converted."""
    import torch
    from safetensors.torch import save_file

    original = folder / PICKLE_FILE
    digest = sha256_file(original)
    try:
        state = torch.load(original, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for unsafe or broken pickles
        raise InputError(
            f"'{label}': {PICKLE_FILE} cannot be loaded safely "
            f"({type(error).__name__}: {str(error).splitlines()[0][:120]}).",
            "Only plain tensor state dicts are accepted; convert it to safetensors yourself if you trust it.",
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"'{label}': {PICKLE_FILE} is not a state dict of tensors.", "Re-save the adapter with PEFT.")
    # safetensors refuses shared or non-contiguous storage; clone each tensor.
    save_file(
        {k: v.detach().clone().contiguous() for k, v in state.items()},
        folder / SAFETENSORS_FILE,
        metadata={"format": "pt"},
    )
    original.unlink()
    return {"file": PICKLE_FILE, "sha256": digest}


def _check_weights(folder: Path, label: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(folder / SAFETENSORS_FILE, framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # noqa: BLE001 - a truncated file raises a bare SafetensorError
        raise IntegrityError(
            f"'{label}': {SAFETENSORS_FILE} is damaged ({error}).", "Download or save it again."
        ) from None
    if not any("lora_A" in k for k in keys) or not any("lora_B" in k for k in keys):
        raise InputError(f"'{label}': {SAFETENSORS_FILE} holds no lora_A/lora_B weights.", "Is this a LoRA adapter?")
    if bad := nonfinite_tensors(folder / SAFETENSORS_FILE):
        raise InputError(
            f"'{label}': {SAFETENSORS_FILE} holds NaN or inf in {len(bad)} tensor(s), e.g. {bad[0]}.",
            "The adapter is broken; retrain or re-export it.",
        )


def _shipped_card(folder: Path, label: str, warn) -> Card | None:
    """A card that came with the adapter, kept only if it loads; a broken one is dropped, not fatal."""
    card = None
    if all((folder / name).is_file() for name in CARD_FILES):
        try:
            card = Card.load(folder, label)
        except LorahubError as error:
            warn(f"{label}: ignoring its embedding card: {error.message}")
    if card is None:
        for name in CARD_FILES:
            (folder / name).unlink(missing_ok=True)
    return card


def ingest(
    store: Store,
    staged: Path,
    *,
    adapter_id: str,
    source: str,
    source_type: str,
    revision: str | None,
    expected_base_model: str | None,
    shown: str,
    card_job=None,
    warn=lambda message: None,
) -> AdapterRecord:
    """Validate and normalise a staged adapter folder, build its cards, then commit it to the store.

    `card_job` is a prepared card (registry.cards.CardJob): it is built into the staged folder, so the adapter
    becomes visible with its card or not at all. The weight card (`store.weight_card`) is built there too; an
    adapter it cannot be built for (one that lorahub's composition cannot load either) is stored without one.
    """
    config = _read_config(staged, adapter_id, shown)
    base_model = config["base_model_name_or_path"]
    if expected_base_model and base_model != expected_base_model:
        raise InputError(
            f"'{adapter_id}' was trained on '{base_model}', not '{expected_base_model}'.",
            "Drop --base-model or choose adapters for that base model.",
        )
    converted = None
    if not (staged / SAFETENSORS_FILE).is_file():
        if not (staged / PICKLE_FILE).is_file():
            raise InputError(
                f"'{adapter_id}' has no {SAFETENSORS_FILE} or {PICKLE_FILE}.", "Is this a LoRA adapter folder?"
            )
        converted = _convert_pickle(staged, adapter_id)
    else:
        (staged / PICKLE_FILE).unlink(missing_ok=True)
    _check_weights(staged, adapter_id)
    if store.weight_card is not None:  # always made here from the weights, never taken from the source
        try:
            store.weight_card(staged, adapter_id, sha256_file(staged / SAFETENSORS_FILE))
        except LorahubError as error:
            warn(f"{adapter_id}: stored without a weight card: {error.message}")
    if card_job is None:
        card = _shipped_card(staged, adapter_id, warn)
    else:
        card = card_job.build(adapter_id)
        card.save(staged)
    files = {p.name: sha256_file(p) for p in sorted(staged.iterdir()) if p.is_file()}
    targets = config["target_modules"]
    record = AdapterRecord(
        id=adapter_id,
        source=source,
        source_type=source_type,
        revision=revision,
        base_model=base_model,
        peft_type="LORA",
        r=int(config["r"]),
        lora_alpha=float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
        target_modules=sorted(targets) if isinstance(targets, list) else [str(targets)],
        task_type=config.get("task_type"),
        files=files,
        size=sum((staged / name).stat().st_size for name in files),
        folder="",
        converted_from=converted,
        card_status="ready" if card else "none",
        card_embedder=card.embedder_key if card else None,
    )
    key = revision or files[SAFETENSORS_FILE]
    return store.commit(record, staged, key)


def _existing(store: Store, adapter_id: str, source: str, replace: bool) -> AdapterRecord | None:
    """The id's current record; another source's adapter is replaced only when asked."""
    existing = store.find(check_id(adapter_id))
    if existing and existing.source != source and not replace:
        raise InputError(
            f"'{adapter_id}' already holds an adapter from '{existing.source}', not '{source}'.",
            "Pass --replace to replace it (its card goes with it), or choose another --name.",
        )
    return existing


def add_local(
    store: Store,
    folder: Path,
    *,
    name: str | None = None,
    base_model: str | None = None,
    replace: bool = False,
    card_job=None,
    warn=lambda m: None,
) -> MirrorResult:
    folder = Path(folder).expanduser().resolve()
    if not (folder / CONFIG_FILE).is_file():
        raise InputError(
            f"'{folder}' has no {CONFIG_FILE}.", "Give a PEFT adapter folder (saved with save_pretrained)."
        )
    adapter_id = folder.name if name is None else name
    existed = _existing(store, adapter_id, str(folder), replace) is not None
    with store.staging() as staged:
        for file in WANTED:
            if (folder / file).is_file():
                shutil.copy2(folder / file, staged / file)
        record = ingest(
            store,
            staged,
            adapter_id=adapter_id,
            source=str(folder),
            source_type="local",
            revision=None,
            expected_base_model=base_model,
            shown=str(folder / CONFIG_FILE),
            card_job=card_job,
            warn=warn,
        )
    return MirrorResult(adapter_id, "updated" if existed else "added", None, record=record)


def add_hub(
    store: Store,
    repo_id: str,
    *,
    revision: str | None = None,
    name: str | None = None,
    base_model: str | None = None,
    force: bool = False,
    replace: bool = False,
    card_job=None,
    warn=lambda m: None,
) -> MirrorResult:
    """Mirror a Hub repo at a pinned commit; a re-run at the same commit is skipped."""
    from huggingface_hub import snapshot_download

    from ..hub import api, endpoint, hub_errors

    adapter_id = repo_id if name is None else name
    existing = _existing(store, adapter_id, repo_id, replace)
    with hub_errors(repo_id, revision):
        info = api().model_info(repo_id, revision=revision)
    if existing and existing.source == repo_id and existing.revision == info.sha and not force and card_job is None:
        return MirrorResult(adapter_id, "skipped", info.sha, "already mirrored at this commit", existing)
    names = {s.rfilename for s in info.siblings or []}
    if CONFIG_FILE not in names:
        raise InputError(
            f"Hub repo '{repo_id}' is not a LoRA adapter: it has no {CONFIG_FILE}.",
            "Give the id of a PEFT adapter repository.",
        )
    with store.staging() as staged, hub_errors(repo_id, revision):
        download = staged / "download"
        snapshot_download(
            repo_id,
            revision=info.sha,
            allow_patterns=[n for n in WANTED if n in names],
            local_dir=download,
            max_workers=2,
            endpoint=endpoint(),
        )
        for file in WANTED:
            if (download / file).is_file():
                (download / file).rename(staged / file)
        shutil.rmtree(download)
        record = ingest(
            store,
            staged,
            adapter_id=adapter_id,
            source=repo_id,
            source_type="hub",
            revision=info.sha,
            expected_base_model=base_model,
            shown=f"{repo_id}/{CONFIG_FILE}",
            card_job=card_job,
            warn=warn,
        )
    return MirrorResult(adapter_id, "updated" if existing else "added", info.sha, record=record)


def is_local_source(source: str) -> bool:
    """A SOURCE that exists on disk (or looks like a path) is a folder; anything else a Hub repo id."""
    path = Path(source).expanduser()
    return path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1
