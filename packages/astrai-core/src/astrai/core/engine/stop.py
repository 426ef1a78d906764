"""The text side of one sample: incremental detokenisation and stop conditions.

Stop tokens end a sample at once; their text is never added. Stop strings are searched in
the decoded text, so one that spans several tokens is found; the text is cut where it starts.
While streaming, the tail that could still grow into a stop string is held back, so a caller
never sees part of a stop string.
"""

from __future__ import annotations

from collections.abc import Collection

from ..tokenizer import IncrementalDecoder
from .params import SamplingParams


class SampleText:
    def __init__(self, tokenizer, params: SamplingParams, eos_ids: Collection[int]):
        self._decoder = IncrementalDecoder(tokenizer, params.skip_special_tokens) if tokenizer is not None else None
        self._eos_ids = frozenset(() if params.ignore_eos else eos_ids)
        self._user_stop_ids = frozenset(params.stop_token_ids or ())
        self._stops = params.stop_strings
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self.text = ""  # decoded so far; cut at the stop string once one is found
        self._emitted = 0  # characters already handed out as deltas
        self._cut = False

    def append(self, token_id: int) -> tuple[str | None, str | int | None]:
        """Add a generated token; returns (finish_reason, stop_reason), (None, None) to go on."""
        if token_id in self._user_stop_ids:
            return "stop", token_id
        if token_id in self._eos_ids:
            return "stop", None
        if self._decoder is None:
            return None, None
        before = len(self.text)
        self.text += self._decoder.push(token_id)
        if self._stops and len(self.text) > before:
            return self._find_stop(max(self._emitted, before - self._longest_stop + 1))
        return None, None

    def _find_stop(self, start: int) -> tuple[str | None, str | None]:
        hits = [(pos, s) for s in self._stops if (pos := self.text.find(s, start)) >= 0]
        if not hits:
            return None, None
        pos, stop = min(hits)
        self.text, self._cut = self.text[:pos], True
        return "stop", stop

    def delta(self, final: bool) -> str:
        """Text not handed out yet; unless final, minus a tail that may begin a stop string."""
        if final and not self._cut and self._decoder is not None:
            self.text += self._decoder.flush()  # an incomplete UTF-8 tail becomes U+FFFD
        end = len(self.text) if final else len(self.text) - self._held_back()
        out, self._emitted = self.text[self._emitted : end], max(self._emitted, end)
        return out

    def _held_back(self) -> int:
        pending = self.text[self._emitted :]
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(pending)), hold, -1):
                if pending.endswith(stop[:k]):
                    hold = k
                    break
        return hold
