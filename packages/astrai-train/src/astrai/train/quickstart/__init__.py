"""The quickstart: a tiny bilingual model taken through its whole life on a CPU (`astrai-quickstart`).

Demo code, kept apart from the training library: the bundled corpus and task (corpus.py), the
chain of runs (chain.py) and the held-out measures of each stage (measures.py). Nothing in
`astrai.train` imports from here.
"""

from .chain import main, verdict

__all__ = ["main", "verdict"]
