"""Structured output: a sample constrained to a JSON schema, any JSON object, a regex or a Lark
grammar, by masking the tokens the grammar cannot take next before each draw.

Why llguidance (the grammar engine vLLM and SGLang also use): it computes a step's token mask
from a grammar and the tokenizer's vocabulary in tens of microseconds, JSON Schema included,
and its wheel has no dependencies. Here: `SamplingParams.structured_output` names the
constraint; `Grammars` turns it into a grammar (cached by its text) and gives each constrained
sample a matcher (a copy of one kept per grammar); before a draw the masks of the constrained
rows are filled on the host (in llguidance's thread pool for large batches), sent in one
asynchronous copy and applied to those rows' logits on the device; after the draw each matcher
consumes its token, and a sample whose grammar is complete stops ("stop").

A constrained sample's next mask needs its last token on the host (the matcher must see it
first). With overlapped decode the next step's forward is launched on the device tokens, then
the tokens in flight are read and the matchers fed, and only then are the masks applied and
the draw queued: the forward still overlaps the host's reading. A sample that completed its
grammar in the tokens just read gets one wasted row, as any sample that stops does. Logprobs
of a constrained sample are those of the masked distribution (renormalised over the allowed
tokens).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from ..errors import AstraiError
from ..kernels.dispatch import use_fused

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "regex", "lark")
# Masks filled one matcher after another below this many a step; from it on, in llguidance's
# thread pool. Why: waking a pool of a dozen threads costs more than filling a few dozen masks
# (each takes microseconds, with a real vocabulary too); see bench/RESULTS.md.
PARALLEL_MASKS = 128
CACHED_GRAMMARS = 256  # distinct settings whose grammar (and fresh matcher) are kept, least recent out


def check_spec(spec: Any) -> None:
    """A structured_output setting's shape: one of {"json_schema": {...}}, {"json_object": true},
    {"regex": "..."}, {"lark": "..."}; raises AstraiError naming the field."""
    field = "SamplingParams.structured_output"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise AstraiError(
            f"{field} must be one of {{'json_schema': {{...}}}}, {{'json_object': True}}, "
            f"{{'regex': '...'}}, {{'lark': '...'}}, got {spec!r}"
        )
    kind, value = next(iter(spec.items()))
    if kind == "json_schema" and not isinstance(value, (dict, bool)):
        raise AstraiError(f"{field}['json_schema'] must be a JSON schema (an object), got {type(value).__name__}")
    if kind == "json_object" and value is not True:
        raise AstraiError(f"{field}['json_object'] must be true, got {value!r}")
    if kind in ("regex", "lark") and not (isinstance(value, str) and value):
        raise AstraiError(f"{field}['{kind}'] must be a non-empty string")


def mask_rows(logits: torch.Tensor, masks: torch.Tensor, index: torch.Tensor, shifts_cache: dict) -> None:
    """In place, with torch ops: row index[i] of logits keeps the tokens whose bit is set in
    masks[i] (kernels/token_mask.py does the same in one launch on CUDA)."""
    shifts = shifts_cache.get(logits.device)
    if shifts is None:  # made once per device, not every constrained step
        shifts = shifts_cache[logits.device] = torch.arange(32, device=logits.device, dtype=torch.int32)
    rows = len(index)
    allowed = ((masks.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, : logits.shape[-1]].bool()
    if allowed.shape[-1] < logits.shape[-1]:  # logits wider than the tokenizer's vocabulary
        pad = torch.zeros(rows, logits.shape[-1] - allowed.shape[-1], dtype=torch.bool, device=logits.device)
        allowed = torch.cat([allowed, pad], dim=-1)
    picked = logits.index_select(0, index)
    logits.index_copy_(0, index, picked.masked_fill(~allowed, float("-inf")))


def grammar_text(spec: dict) -> str:
    """The llguidance grammar for a checked structured_output setting."""
    import llguidance

    kind, value = next(iter(spec.items()))
    # Fixed separators, no free whitespace: with it a model could fill its budget with blanks
    # between two tokens of valid JSON (a random one does).
    compact = {"whitespace_flexible": False}
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=compact)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=compact)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    return llguidance.LLMatcher.grammar_from_lark(value)


class Grammars:
    """The engine's grammar side: one llguidance tokenizer (built on first use), grammars cached
    by their text, a matcher per constrained sample, and the masks of a step."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self._lltok = None
        self._executor = None
        self._shifts: dict[torch.device, torch.Tensor] = {}  # bit positions of a mask word
        self._host_masks: torch.Tensor | None = None  # filled in place each step (pinned on CUDA)
        self._host_rows: torch.Tensor | None = None
        self._copied = None  # CUDA event: the last step's copy out of the host buffers has run
        self._use_kernel = True  # kernels/token_mask.py on CUDA, until it fails to build
        self._grammars: dict[str, str] = {}  # spec as canonical JSON -> validated grammar
        # spec as canonical JSON -> a matcher that never takes a token: a request's matcher is
        # its copy, two hundred times cheaper than building one (grammar parse, lexer)
        self._fresh: dict[str, Any] = {}

    def _ll_tokenizer(self):
        if self._lltok is None:
            import llguidance

            if self.tokenizer is None:
                raise AstraiError("SamplingParams.structured_output needs the engine to have a tokenizer")
            eos = sorted(self.eos_ids) or None
            self._lltok = llguidance.LLTokenizer(
                self.tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=eos
            )
        return self._lltok

    def grammar(self, spec: dict) -> str:
        """The validated grammar of a structured_output setting (AstraiError if it has none)."""
        import llguidance

        key = json.dumps(spec, sort_keys=True)
        if _recall(self._grammars, key) is None:
            check_spec(spec)
            try:
                text = grammar_text(spec)
            except (ValueError, RuntimeError) as e:
                raise AstraiError(f"SamplingParams.structured_output: {e}") from None
            error = llguidance.LLMatcher.validate_grammar(text, self._ll_tokenizer())
            if error:
                raise AstraiError(f"SamplingParams.structured_output is not a grammar we can follow: {error}")
            _remember(self._grammars, key, text)
        return self._grammars[key]

    def matcher(self, spec: dict):
        """A new matcher for a checked structured_output setting, at the grammar's start."""
        import llguidance

        key = json.dumps(spec, sort_keys=True)
        fresh = _recall(self._fresh, key)
        if fresh is None:
            fresh = llguidance.LLMatcher(self._ll_tokenizer(), self.grammar(spec), log_level=0)
            _remember(self._fresh, key, fresh)
        return fresh.deep_copy()

    def _parallel(self):
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()  # the grammars' own thread pool: fills masks in parallel
        return self._executor

    def apply(self, logits: torch.Tensor, matchers: list) -> None:
        """Mask, in place, each row of `logits` whose matcher is not None to the tokens it allows."""
        from llguidance.torch import fill_next_token_bitmask, fill_next_token_bitmask_par

        # A stopped matcher (its grammar complete) allows nothing: its row's token is dropped anyway.
        rows = [i for i, m in enumerate(matchers) if m is not None and not (m.is_stopped() or m.is_error())]
        if not rows:
            return
        words = (self.vocab_size + 31) // 32
        # A request's first draw with n > 1 repeats its one matcher: fill each matcher's mask once.
        slot: dict[int, int] = {}
        for i in rows:
            slot.setdefault(id(matchers[i]), len(slot))
        unique = {id(matchers[i]): matchers[i] for i in rows}
        masks, index = self._host_buffers(len(rows), words, logits.device)
        filled = masks[: len(slot)]
        if len(slot) >= PARALLEL_MASKS:
            fill_next_token_bitmask_par(self._parallel(), [(m, slot[k]) for k, m in unique.items()], filled)
        else:
            for k, m in unique.items():
                fill_next_token_bitmask(m, filled, slot[k])
        if len(slot) < len(rows):  # repeated matchers: each row its matcher's mask (a copy, so in order)
            masks[: len(rows)] = masks[[slot[id(matchers[i])] for i in rows]]
        index[: len(rows)] = torch.tensor(rows, dtype=torch.int32)
        # Asynchronous copies from pinned memory: a copy from pageable memory would wait for the
        # forward pass already queued on the device and undo the step overlap.
        masks = masks[: len(rows)].to(logits.device, non_blocking=True)
        index = index[: len(rows)].to(logits.device, non_blocking=True)
        if logits.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(logits.device))
            if self._use_kernel and logits.stride(-1) == 1 and use_fused(logits):
                try:
                    from ..kernels.token_mask import apply_token_masks

                    apply_token_masks(logits, masks, index)
                    return
                except Exception as e:  # a kernel that fails to build: the torch ops do the same
                    log.warning("grammar mask kernel unavailable, masking with torch ops: %s", e)
                    self._use_kernel = False
        mask_rows(logits, masks, index.long(), self._shifts)

    def _host_buffers(self, rows: int, words: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's mask and row-index buffers on the host, kept from step to step (no allocation,
        pinning or extra copy of the masks each step), once the last step's copies out of them
        have run."""
        if self._copied is not None:
            self._copied.synchronize()  # queued a step ago: long done
        if self._host_masks is None or self._host_masks.shape[0] < rows:
            pin = device.type == "cuda"
            self._host_masks = torch.empty((rows, words), dtype=torch.int32, pin_memory=pin)
            self._host_rows = torch.empty(rows, dtype=torch.int32, pin_memory=pin)
        return self._host_masks, self._host_rows


def _recall(cache: dict, key: str):
    """cache[key] (None if absent), now the most recently used."""
    value = cache.pop(key, None)
    if value is not None:
        cache[key] = value
    return value


def _remember(cache: dict, key: str, value) -> None:
    """cache[key] = value, dropping the least recently used past CACHED_GRAMMARS entries."""
    cache[key] = value
    while len(cache) > CACHED_GRAMMARS:
        del cache[next(iter(cache))]
