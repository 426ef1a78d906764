"""The one base class of AstrAI's user-facing errors, and the check that raises them.

A user-facing error is one a person fixes by changing a setting, a file or a request, not
the code: its message names the field or input and says what to use instead. Every such
error class derives from ``AstraiError``, so a command-line tool catches them all in one
place and prints the message instead of a traceback. ``AstraiError`` is a ``ValueError``:
code that catches ``ValueError`` keeps working.

Failures of the program itself (an engine step that crashed, an internal invariant) are
not AstraiErrors and keep their tracebacks.
"""

from __future__ import annotations

from collections.abc import Callable


class AstraiError(ValueError):
    """A user-facing error: the message names the field or input and says what to do instead."""


def require(ok: object, field: str, message: str, error: type[AstraiError] = AstraiError) -> None:
    """Raise ``error("<field> <message>")`` unless ``ok``.

    ``field`` is the name the user wrote (``"SamplingParams.top_p"``, ``"model.epsilon"``), and
    ``message`` continues the sentence: ``require(p > 0, "top_p", f"must be > 0, got {p!r}")``.
    """
    if not ok:
        raise error(f"{field} {message}")


def require_for(owner: str, error: type[AstraiError] = AstraiError) -> Callable[[object, str, str], None]:
    """``require`` for the fields of one object, named as the user writes them: with
    ``check = require_for("SamplingParams")``, ``check(ok, "top_p", "must be ...")`` raises
    "SamplingParams.top_p must be ...". Validators with many checks call it by a short name."""

    def check(ok: object, field: str, message: str) -> None:
        require(ok, f"{owner}.{field}", message, error)

    return check
