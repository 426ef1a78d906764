"""AstrAI core: models, tokenizer, checkpoints and the inference engine."""
