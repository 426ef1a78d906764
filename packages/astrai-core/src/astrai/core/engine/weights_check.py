"""The check of update_weights: new weights must match the served model, whole, before any is copied.

The same names (a tied weight may come under one of its names) and the same shapes. The front
door (engine.py) checks before it takes the step lock, so a bad push fails without waiting
for a step.
"""

from __future__ import annotations

from ..errors import AstraiError


def check_state(own: dict, state: dict) -> None:
    """Names and shapes of new weights must match the served model's (tied weights may come once)."""
    by_storage: dict[int, list[str]] = {}
    for name, t in own.items():
        by_storage.setdefault(t.data_ptr(), []).append(name)
    missing = {m for m in set(own) - set(state) if not any(o in state for o in by_storage[own[m].data_ptr()])}
    unexpected = set(state) - set(own)
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise AstraiError(
            "update_weights: the weights do not match the served model; "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}, shape mismatches {shapes[:5]}"
        )
