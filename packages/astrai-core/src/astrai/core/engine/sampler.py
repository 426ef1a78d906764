"""Batched sampling on the logits' device; the order of the steps is documented in params.py.

Every row of the batch carries its own parameters; the filters run on the whole batch
at once and only when at least one row uses them. An unseeded row's draw is an exponential
race: the token with the largest p / E, E ~ Exp(1) drawn per token, is an exact sample from p
(E = 0 cannot happen, and U = 0 gives E = inf: that token loses), so one argmax samples every row.

A seeded row inverts its cumulative distribution at one uniform number, a hash of its seed and
the position of the token it draws (`seeded_uniform`), so its output depends neither on what
else is in the batch nor on how often it was drawn before (a recomputed step draws the same
token). Why not a torch.Generator per row: its noise takes one kernel launch per row and step,
which on a GPU made a batch of 512 seeded rollouts host-bound (the hash costs one entry in the
per-row numbers that cross anyway; the inversion, two passes over the batch's probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .device_transfer import HostCopy, to_device
from .outputs import TokenLogprob
from .params import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    seed: int | None  # the sample's 64-bit key (request_intake), None when unseeded
    prompt_ids: list[int]
    output_ids: list[int]
    position: int = 0  # where the drawn token lands in its sequence: a seeded draw's counter


class Sampler:
    """vocab_limit: ids at or above it (embedding padding the tokenizer cannot decode) are never drawn.

    Device work is queued without waiting: per-row numbers cross in one transfer, and the
    sampled tokens (with their logprobs, when asked for) come back with a single wait, which
    `draw` leaves to the caller.
    """

    def __init__(self, vocab_limit: int | None = None):
        self.vocab_limit = vocab_limit

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list[TokenLogprob | None]]:
        return self.draw(logits, rows).result()

    @torch.inference_mode()
    def draw(self, logits: torch.Tensor, rows: list[SampleRow]) -> Drawn:
        """Queue the draw; the tokens stay on the device until Drawn.result() reads them."""
        # Widening bf16 to float32 is exact, so greedy rows can take the argmax of the logits as they are.
        x = logits
        params = [r.params for r in rows]
        # The samples of one request share its parameters: the batch-wide checks look at each
        # set once (a GRPO step of 512 rows has 64), not at every row.
        shared = list({id(p): p for p in params}.values())
        if any(p.has_penalties for p in shared):
            x = apply_penalties(x.float(), rows)
        if self.vocab_limit is not None and self.vocab_limit < x.shape[-1]:
            x = x[:, : self.vocab_limit]
        greedy = [p.greedy for p in params]
        tokens = x.argmax(-1) if all(greedy) else self._draw(x.float(), rows, params, shared, greedy)
        return Drawn(tokens, rows, *_queue_read(logits, tokens, rows, shared))

    def _draw(
        self,
        x: torch.Tensor,
        rows: list[SampleRow],
        params: list[SamplingParams],
        shared: list[SamplingParams],
        greedy: list[bool],
    ) -> torch.Tensor:
        """Draw every row (params: each row's; shared: the distinct ones; greedy: each row's flag)."""
        seeded = [r.seed is not None for r in rows]
        vocab = x.shape[-1]
        top_k = any(p.top_k > 0 for p in shared)
        k_max = min(max(p.top_k for p in shared), vocab)
        numbers = torch.tensor(
            [
                [p.temperature or 1.0 for p in params],
                [min(p.top_k, vocab) if p.top_k > 0 else k_max for p in params],
                [float(p.top_k <= 0) for p in params],  # top-k off
                [p.top_p if p.top_p < 1 else 2.0 for p in params],  # 2: nothing reaches it, top-p off
                [p.min_p for p in params],
                [float(g) for g in greedy],
            ],
            dtype=torch.float32,
        )
        numbers = torch.cat([numbers, row_uniforms(rows, seeded)[None]])
        (numbers,) = to_device([numbers], x.device)
        temps, ks, k_off, top_p, min_p, is_greedy, uniform = numbers
        scaled = x / temps[:, None]
        if top_k:
            scaled = top_k_filter(scaled, ks.long(), k_max, k_off.bool())
        if any(p.top_p < 1 for p in shared):
            scaled = top_p_filter(scaled, top_p)
        probs = scaled.softmax(-1)
        if any(p.min_p > 0 for p in shared):
            probs = min_p_filter(probs, min_p)
        if all(seeded):
            tokens = invert_cdf(probs, uniform)
        else:
            # E = -log(U), U ~ Uniform[0, 1): several times faster than exponential_() on CPU.
            tokens = (probs / torch.rand_like(probs).log_().neg_()).argmax(-1)
            if any(seeded):
                tokens = torch.where(uniform >= 0, invert_cdf(probs, uniform.clamp(min=0)), tokens)
        if any(greedy):
            tokens = torch.where(is_greedy.bool(), x.argmax(-1), tokens)
        return tokens


_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
_GOLDEN, _MIX1, _MIX2 = 0x9E37_79B9_7F4A_7C15, 0xBF58_476D_1CE4_E5B9, 0x94D0_49BB_1331_11EB


def seeded_uniform(seed: int, position: int) -> float:
    """A number in [0, 1) that depends only on (seed, position): splitmix64 of the pair, its top
    24 bits (exact in float32, the dtype it crosses to the device in). The definition, in
    Python integers; the sampler computes it for a whole batch at once (seeded_uniforms)."""
    z = (seed + (position + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return ((z ^ (z >> 31)) >> 40) / float(1 << 24)


def _int64(x: int) -> int:
    """A 64-bit pattern as the signed integer an int64 tensor holds."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 patterns (torch's is arithmetic: mask the sign's copies off)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def seeded_uniforms(seeds: list[int], positions: list[int]) -> torch.Tensor:
    """seeded_uniform of every (seed, position) pair, as a float32 CPU tensor, bit for bit: int64
    tensor arithmetic wraps as the 64-bit masks above do. A step of 512 seeded rows spent
    more host time on the Python loop than on everything else the sampler prepares."""
    z = torch.tensor([_int64(s) for s in seeds], dtype=torch.int64)
    z = z + (torch.tensor(positions, dtype=torch.int64) + 1) * _int64(_GOLDEN)
    z = (z ^ _shift_right(z, 30)) * _int64(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _int64(_MIX2)
    return _shift_right(z ^ _shift_right(z, 31), 40).to(torch.float32) / float(1 << 24)


def row_uniforms(rows: list[SampleRow], seeded: list[bool]) -> torch.Tensor:
    """Each row's seeded uniform, -1 for an unseeded row (seeded: whether each row has a seed;
    float32, on the host)."""
    if not any(seeded):
        return torch.full((len(rows),), -1.0)
    uniforms = seeded_uniforms([r.seed or 0 for r in rows], [r.position for r in rows])
    return uniforms if all(seeded) else torch.where(torch.tensor(seeded), uniforms, -1.0)


def invert_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Each row's token where its cumulative probability first exceeds uniform (B,) in [0, 1)
    times the row's total (probs need not sum to 1). The target stays below the total, so the
    chosen token always has probability > 0 (the cumulative sum only rises on such tokens)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniform[:, None] * total, total * (1 - 2**-20))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Repetition penalty on tokens of prompt or output; frequency and presence on output counts."""
    device, vocab = logits.device, logits.shape[-1]
    active = [r.params.has_penalties for r in rows]
    outputs = [r.output_ids if a else [] for r, a in zip(rows, active)]
    prompts = [r.prompt_ids if a else [] for r, a in zip(rows, active)]
    factors = torch.tensor(
        [[r.params.repetition_penalty, r.params.frequency_penalty, r.params.presence_penalty] for r in rows],
        dtype=torch.float32,
    )
    out_index, out_weight = _padded(outputs)
    prompt_index, prompt_weight = _padded(prompts)
    out_index, prompt_index = to_device([out_index, prompt_index], device)
    out_weight, prompt_weight, factors = to_device([out_weight, prompt_weight, factors], device)
    counts = torch.zeros(len(rows), vocab, device=device).scatter_add_(1, out_index, out_weight)
    in_prompt = torch.zeros(len(rows), vocab, device=device).scatter_add_(1, prompt_index, prompt_weight) > 0
    rep, freq, pres = factors[:, 0:1], factors[:, 1:2], factors[:, 2:3]
    seen = in_prompt | (counts > 0)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - freq * counts - pres * (counts > 0).float()


def _padded(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids padded to one width (host tensors), and weights that are 1 on real ids."""
    width = max(1, max(len(i) for i in ids))
    index = torch.tensor([i + [0] * (width - len(i)) for i in ids], dtype=torch.long)
    weight = torch.tensor([[1.0] * len(i) + [0.0] * (width - len(i)) for i in ids], dtype=torch.float32)
    return index, weight


def top_k_filter(x: torch.Tensor, k: torch.Tensor, k_max: int, off: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits; rows where `off` is set keep all. k (B,) <= k_max."""
    kth = x.topk(k_max, dim=-1).values.gather(1, (k - 1)[:, None])
    return x.masked_fill((x < kth) & ~off[:, None], float("-inf"))


def top_p_filter(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (B,); p > 1 keeps all."""
    probs, order = x.softmax(-1).sort(dim=-1, descending=True)
    drop_sorted = probs.cumsum(-1) - probs >= p[:, None]  # mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return x.masked_fill(drop, float("-inf"))


def min_p_filter(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p (B,) times the row's most likely token."""
    return probs.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, 0.0)


class Drawn:
    """A queued draw: `tokens` (B,) on the device, and their host copies (with logprobs) in flight."""

    def __init__(self, tokens: torch.Tensor, rows: list[SampleRow], copy: HostCopy, wanted: list[int]):
        self.tokens, self._rows, self._copy, self._wanted = tokens, rows, copy, wanted

    def result(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """The sampled tokens as ints, and the logprobs rows asked for: one wait for the device."""
        token_list, *extra = self._copy.wait()
        out: list[TokenLogprob | None] = [None] * len(self._rows)
        if self._wanted:
            chosen, *alternatives = extra  # the top values and ids, when a row asked for any
            top_v, top_i = alternatives or (None, None)
            for j, i in enumerate(self._wanted):
                k = self._rows[i].params.logprobs
                top = list(zip(top_i[j][:k], top_v[j][:k])) if k else []
                out[i] = TokenLogprob(token_list[i], chosen[j], top)
        return token_list, out


def _queue_read(
    logits: torch.Tensor, tokens: torch.Tensor, rows: list[SampleRow], shared: list[SamplingParams]
) -> tuple[HostCopy, list[int]]:
    """Start copying the tokens, and the logprobs rows ask for, to the host (shared: the rows'
    distinct parameters).

    Logprobs are those of the raw logits (the model's distribution, whole vocabulary)."""
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not wanted:
        return HostCopy(tokens), wanted
    raw, chosen_tokens = logits, tokens
    if len(wanted) < len(rows):
        (idx,) = to_device([torch.tensor(wanted, dtype=torch.long)], logits.device)
        raw, chosen_tokens = logits.index_select(0, idx), tokens.index_select(0, idx)
    lp = raw.float().log_softmax(-1)
    chosen = lp.gather(1, chosen_tokens[:, None])[:, 0]
    k_max = min(max(p.logprobs for p in shared if p.logprobs is not None), lp.shape[-1])
    if not k_max:  # only the chosen tokens' (rollouts): no alternatives to copy back
        return HostCopy(tokens, chosen), wanted
    top_v, top_i = lp.topk(k_max, dim=-1)
    return HostCopy(tokens, chosen, top_v, top_i), wanted
