"""The local registry: an SQLite index over a content folder of PEFT LoRA adapters with embedding cards."""

from .store import AdapterRecord, Store

__all__ = ["AdapterRecord", "Store"]
