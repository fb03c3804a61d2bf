"""finetune: LoRA/QLoRA fine-tuning of encoder-free multimodal models, from a recipe to a served adapter."""
