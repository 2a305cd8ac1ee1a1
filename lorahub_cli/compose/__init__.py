"""Composition of LoRA adapters: PEFT folders as tensors (`adapters`), the formulas
that merge them (`formulas`), and the bank that evaluates many compositions in one
forward pass (`bank`). See docs/composition.md for the mathematics."""
