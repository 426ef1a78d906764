"""Batched sampling on the logits' device; the order of the steps is documented in params.py.

Every row of the batch carries its own parameters; the filters run on the whole batch
at once and only when at least one row uses them. The draw is an exponential race: the
token with the largest p / E, E ~ Exp(1) drawn per token, is an exact sample from p (E = 0
cannot happen, and U = 0 gives E = inf: that token loses), so one argmax samples every row. A seeded row draws its E from its own torch.Generator, so its
output does not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .outputs import TokenLogprob
from .params import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]


class Sampler:
    """vocab_limit: ids at or above it (embedding padding the tokenizer cannot decode) are never drawn."""

    def __init__(self, vocab_limit: int | None = None):
        self.vocab_limit = vocab_limit

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list[TokenLogprob | None]]:
        raw = logits.float()
        x = raw
        if any(r.params.has_penalties for r in rows):
            x = apply_penalties(x, rows)
        if self.vocab_limit is not None and self.vocab_limit < x.shape[-1]:
            x = x.clone() if x is raw else x
            x[:, self.vocab_limit :] = float("-inf")
        greedy = [r.params.greedy for r in rows]
        if all(greedy):
            tokens = x.argmax(-1)
        else:
            tokens = self._draw(x, rows)
            if any(greedy):
                tokens = torch.where(torch.tensor(greedy, device=x.device), x.argmax(-1), tokens)
        token_list = tokens.tolist()
        return token_list, _logprobs(raw, token_list, rows)

    def _draw(self, x: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        device = x.device
        temps = torch.tensor([r.params.temperature or 1.0 for r in rows], device=device)
        x = x / temps[:, None]
        if any(r.params.top_k > 0 for r in rows):
            x = top_k_filter(x, [r.params.top_k for r in rows])
        if any(r.params.top_p < 1 for r in rows):
            x = top_p_filter(x, [r.params.top_p for r in rows])
        probs = x.softmax(-1)
        if any(r.params.min_p > 0 for r in rows):
            probs = min_p_filter(probs, [r.params.min_p for r in rows])
        # E = -log(U), U ~ Uniform[0, 1): several times faster than exponential_() on CPU.
        noise = torch.rand_like(probs)
        for i, r in enumerate(rows):
            if r.generator is not None:
                noise[i].uniform_(generator=r.generator)
        return (probs / noise.log_().neg_()).argmax(-1)


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Repetition penalty on tokens of prompt or output; frequency and presence on output counts."""
    device, vocab = logits.device, logits.shape[-1]
    active = [r.params.has_penalties for r in rows]
    counts = _token_counts([r.output_ids if a else [] for r, a in zip(rows, active)], vocab, device)
    in_prompt = _token_counts([r.prompt_ids if a else [] for r, a in zip(rows, active)], vocab, device) > 0
    rep = torch.tensor([r.params.repetition_penalty for r in rows], device=device)[:, None]
    freq = torch.tensor([r.params.frequency_penalty for r in rows], device=device)[:, None]
    pres = torch.tensor([r.params.presence_penalty for r in rows], device=device)[:, None]
    seen = in_prompt | (counts > 0)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - freq * counts - pres * (counts > 0).float()


def _token_counts(ids: list[list[int]], vocab: int, device) -> torch.Tensor:
    width = max(1, max(len(i) for i in ids))
    index = torch.tensor([i + [0] * (width - len(i)) for i in ids], device=device)
    weight = torch.tensor([[1.0] * len(i) + [0.0] * (width - len(i)) for i in ids], device=device)
    return torch.zeros(len(ids), vocab, device=device).scatter_add_(1, index, weight)


def top_k_filter(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Keep each row's k largest logits (k <= 0: keep all)."""
    vocab = x.shape[-1]
    k_max = min(max(ks), vocab)
    k = torch.tensor([min(k, vocab) if k > 0 else k_max for k in ks], device=x.device)
    kth = x.topk(k_max, dim=-1).values.gather(1, (k - 1)[:, None])
    off = torch.tensor([k <= 0 for k in ks], device=x.device)[:, None]
    return x.masked_fill((x < kth) & ~off, float("-inf"))


def top_p_filter(x: torch.Tensor, ps: list[float]) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (p = 1: keep all)."""
    p = torch.tensor([q if q < 1 else 2.0 for q in ps], device=x.device)[:, None]
    probs, order = x.softmax(-1).sort(dim=-1, descending=True)
    drop_sorted = probs.cumsum(-1) - probs >= p  # mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return x.masked_fill(drop, float("-inf"))


def min_p_filter(probs: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    """Drop tokens less likely than min_p times the row's most likely token."""
    m = torch.tensor(min_ps, device=probs.device)[:, None]
    return probs.masked_fill(probs < m * probs.max(-1, keepdim=True).values, 0.0)


def _logprobs(raw: torch.Tensor, tokens: list[int], rows: list[SampleRow]) -> list[TokenLogprob | None]:
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if not wanted:
        return out
    idx = torch.tensor(wanted, device=raw.device)
    lp = raw.index_select(0, idx).log_softmax(-1)
    chosen = lp.gather(1, torch.tensor([tokens[i] for i in wanted], device=raw.device)[:, None])[:, 0].tolist()
    k_max = min(max(rows[i].params.logprobs for i in wanted), lp.shape[-1])
    top_v, top_i = lp.topk(k_max, dim=-1) if k_max else (lp[:, :0], lp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(wanted):
        k = rows[i].params.logprobs
        out[i] = TokenLogprob(tokens[i], chosen[j], list(zip(top_i[j][:k], top_v[j][:k])))
    return out
