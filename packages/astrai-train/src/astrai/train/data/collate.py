"""Turning rows into batches, and the one rule every data module follows for labels.

``labels[t]`` is the token the model must predict after reading ``input_ids[: t + 1]``
(the shift happens here, in the data, not in the loss); ``IGNORE`` marks positions without
a target. Batches are padded on the right to the longest row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE = -100


def shifted_labels(ids: Sequence[int], mask: Sequence[int] | None = None) -> list[int]:
    """Targets aligned with ``ids``: the next token where ``mask`` marks it as trainable,
    ``IGNORE`` elsewhere. The last position never has a target, so a sample's labels never
    reach into whatever follows it in a packed row."""
    nxt = list(ids[1:])
    if mask is not None:
        nxt = [t if m else IGNORE for t, m in zip(nxt, mask[1:])]
    return [*nxt, IGNORE]


def _pad(rows: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _attention_mask(rows: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    lengths = torch.tensor([len(r) for r in rows])
    return (torch.arange(length)[None, :] < lengths[:, None]).long()


def collate_lm(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows with ``input_ids``, ``labels`` and optionally ``position_ids`` (packed rows).

    Padding gets ``pad_id`` / ``IGNORE`` / attention 0; padding in a packed row restarts its
    positions at 0 so the model treats it as one more (label-free) sample.
    """
    length = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": _pad([r["input_ids"] for r in rows], pad_id, length),
        "labels": _pad([r["labels"] for r in rows], IGNORE, length),
        "attention_mask": _attention_mask([r["input_ids"] for r in rows], length),
    }
    if "position_ids" in rows[0]:
        positions = [list(r["position_ids"]) + list(range(length - len(r["position_ids"]))) for r in rows]
        batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
    return batch


def collate_windows(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Equal-length pre-training windows: stacked, nothing to pad."""
    return {key: torch.stack([torch.as_tensor(r[key], dtype=torch.long) for r in rows]) for key in rows[0]}


def collate_dpo(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected padded to one common length, so a module can run them as one batch."""
    length = max(len(r[f"{side}_input_ids"]) for r in rows for side in ("chosen", "rejected"))
    batch: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        ids = [r[f"{side}_input_ids"] for r in rows]
        batch[f"{side}_input_ids"] = _pad(ids, pad_id, length)
        batch[f"{side}_labels"] = _pad([r[f"{side}_labels"] for r in rows], IGNORE, length)
        batch[f"{side}_attention_mask"] = _attention_mask(ids, length)
    refs = [r.get("ref_chosen_logps") for r in rows] + [r.get("ref_rejected_logps") for r in rows]
    if all(v is not None for v in refs):
        batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in rows], dtype=torch.float32)
    return batch
