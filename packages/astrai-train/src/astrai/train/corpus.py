"""Deprecated: the quickstart's corpus moved to `astrai.train.quickstart.corpus` (demo data is
kept apart from the training library). `python -m astrai.train.corpus` still works, with a warning."""

import warnings

from .quickstart.corpus import Question, load_questions, main, write_corpus

warnings.warn(
    "astrai.train.corpus moved to astrai.train.quickstart.corpus; import it from there "
    "(python -m astrai.train.quickstart.corpus --out DIR)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["Question", "load_questions", "main", "write_corpus"]

if __name__ == "__main__":
    main()
