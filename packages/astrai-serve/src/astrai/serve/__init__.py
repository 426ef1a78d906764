"""AstrAI serving: OpenAI- and Anthropic-compatible LitServe server over the core engine."""

import warnings

# torch warns at import when numpy is missing; an inference-only install has no numpy and needs none.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
