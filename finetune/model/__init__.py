"""The base model and what goes on it: loading (`load`), model families, LoRA, adapters, generation."""
