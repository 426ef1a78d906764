"""Byte sizes as people write them in configs and on command lines: 2GiB, 512MB, 1.5G, 4096.

One parser for every size setting (the engine's ``kv_cache_memory``, astrai-serve's sizes,
``save_pretrained``'s ``max_shard_size``), so a value one of them accepts the others accept too.
"""

from __future__ import annotations

import re
from decimal import Decimal

from .errors import AstraiError

# A number (integer or decimal) and an optional unit: K/M/G/T with "i" for powers of 1024, with or
# without the B, in any case ("2G" and "2gb" are 2 * 10**9, "2GiB" and "2Gi" are 2 * 2**30).
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgt]?i?b?)\s*", re.IGNORECASE)
_SCALES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
HINT = "use a number of bytes or a size like 2GiB, 512MB or 1.5G"


def parse_bytes(value: int | float | str, field: str = "size", error: type[AstraiError] = AstraiError) -> int:
    """Bytes in ``value``: a positive int, or a string like "2GiB", "512 MB", "1.5G", "4096".

    A bad value raises ``error`` naming ``field``, the way ``require`` words its messages.
    """
    if isinstance(value, bool):  # YAML's `yes` is not a size, although True == 1
        raise error(f"{field} {value!r} is not a size; {HINT}")
    if isinstance(value, int):
        return _positive(value, value, field, error)
    match = _SIZE.fullmatch(str(value))
    scale = _SCALES.get(match.group(2).lower().removesuffix("b")) if match else None
    if scale is None:
        raise error(f"{field} {value!r} is not a size; {HINT}")
    return _positive(int(Decimal(match.group(1)) * scale), value, field, error)


def _positive(size: int, value: object, field: str, error: type[AstraiError]) -> int:
    if size <= 0:
        raise error(f"{field} must be positive, got {value!r}")
    return size
