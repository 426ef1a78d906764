"""AstrAI core: models, tokenizer, checkpoints and the inference engine."""

from .errors import AstraiError, require
from .sizes import parse_bytes

__all__ = ["AstraiError", "parse_bytes", "require"]
