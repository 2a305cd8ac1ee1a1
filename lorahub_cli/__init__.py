"""lorahub: find, compose, evaluate and publish LoRA adapters from a few examples."""

__version__ = "0.1.0"
