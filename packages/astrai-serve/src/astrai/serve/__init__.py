"""AstrAI serving: OpenAI- and Anthropic-compatible LitServe server over the core engine."""
