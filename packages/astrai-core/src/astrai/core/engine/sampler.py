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

from ..kernels.dispatch import use_fused
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

    def draw(self, logits: torch.Tensor, rows: list[SampleRow]) -> Drawn:
        """Queue the draw; the tokens stay on the device until Drawn.result() reads them."""
        steps = self.steps(rows, 1, logits.device)
        steps.draw(logits)
        return steps.finish()

    def steps(self, rows: list[SampleRow], count: int, device: torch.device) -> StepDraws:
        """The draws of `rows` in `count` consecutive decode steps (see StepDraws)."""
        return StepDraws(rows, count, device, self.vocab_limit)


def multi_step_ready(params: SamplingParams) -> bool:
    """Whether a row with these parameters can be drawn several steps in a row without the host
    reading its tokens in between: penalties count the output tokens on the host, and top
    alternatives are copied back per step."""
    return not params.has_penalties and not params.logprobs


class StepDraws:
    """The draws of the same rows in `count` consecutive decode steps, queued on the device.

    The rows' numbers (temperature, filters, and each seeded row's uniform at its position and
    at the `count - 1` positions after it) cross to the device once, so the steps after the
    first ask the host for nothing: a multi-step decode (engine_core.py) launches them back to
    back. With count > 1 every row must be multi_step_ready.
    """

    def __init__(self, rows: list[SampleRow], count: int, device: torch.device, vocab_limit: int | None):
        self.rows, self.count, self.vocab_limit = rows, count, vocab_limit
        params = [r.params for r in rows]
        # The samples of one request share its parameters: the batch-wide checks look at each
        # set once (a GRPO step of 512 rows has 64), not at every row.
        self.shared = list({id(p): p for p in params}.values())
        if count > 1 and not all(multi_step_ready(p) for p in self.shared):
            raise ValueError("several steps need rows without penalties or top logprobs (multi_step_ready)")
        self.penalties = any(p.has_penalties for p in self.shared)
        self.greedy = [p.greedy for p in params]
        self.all_greedy = all(self.greedy)
        self.seeded = [r.seed is not None for r in rows]
        self.top_k = any(p.top_k > 0 for p in self.shared)
        self.k_max = max(p.top_k for p in self.shared)
        self.numbers = None if self.all_greedy else self._numbers(params, device)
        self.wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        self.wanted_index = None
        if self.wanted and len(self.wanted) < len(rows):
            (self.wanted_index,) = to_device([torch.tensor(self.wanted, dtype=torch.long)], device)
        self.tokens: list[torch.Tensor] = []  # each step's (B,) tokens, on the device
        self.chosen: list[torch.Tensor] = []  # each step's logprobs of the wanted rows' tokens
        self.alternatives: tuple[torch.Tensor, torch.Tensor] | None = None  # top values and ids (one step)

    def _numbers(self, params: list[SamplingParams], device: torch.device) -> torch.Tensor:
        """Rows: temperature, top-k, top-k off, top-p, min-p, greedy, then one row of uniforms per step."""
        numbers = torch.tensor(
            [
                [p.temperature or 1.0 for p in params],
                [p.top_k if p.top_k > 0 else self.k_max for p in params],
                [float(p.top_k <= 0) for p in params],  # top-k off
                [p.top_p if p.top_p < 1 else 2.0 for p in params],  # 2: nothing reaches it, top-p off
                [p.min_p for p in params],
                [float(g) for g in self.greedy],
            ],
            dtype=torch.float32,
        )
        numbers = torch.cat([numbers, row_uniforms(self.rows, self.seeded, self.count)])
        (numbers,) = to_device([numbers], device)
        return numbers

    @torch.inference_mode()
    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """Queue the next step's draw from ``logits`` (B, vocab); its tokens (B,), on the device."""
        step = len(self.tokens)
        if step >= self.count:
            raise RuntimeError(f"all {self.count} steps of these draws are queued already")
        # Widening bf16 to float32 is exact, so greedy rows can take the argmax of the logits as they are.
        x = logits
        if self.penalties:
            x = apply_penalties(x.float(), self.rows)
        if self.vocab_limit is not None and self.vocab_limit < x.shape[-1]:
            x = x[:, : self.vocab_limit]
        tokens = x.argmax(-1) if self.all_greedy else self._pick(x.float(), step)
        self.tokens.append(tokens)
        self._logprobs(logits, tokens)
        return tokens

    def _pick(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Draw every row of float32 logits ``x`` at ``step``."""
        temps, ks, k_off, top_p, min_p, is_greedy = self.numbers[:6]
        uniform = self.numbers[6 + step]
        vocab = x.shape[-1]
        scaled = x / temps[:, None]
        if self.top_k:
            k_max = min(self.k_max, vocab)
            scaled = top_k_filter(scaled, ks.long().clamp(max=k_max), k_max, k_off.bool())
        if any(p.top_p < 1 for p in self.shared):
            scaled = top_p_filter(scaled, top_p)
        probs = scaled.softmax(-1)
        if any(p.min_p > 0 for p in self.shared):
            probs = min_p_filter(probs, min_p)
        if all(self.seeded):
            tokens = invert_cdf(probs, uniform)
        else:
            # E = -log(U), U ~ Uniform[0, 1): several times faster than exponential_() on CPU.
            tokens = (probs / torch.rand_like(probs).log_().neg_()).argmax(-1)
            if any(self.seeded):
                tokens = torch.where(uniform >= 0, invert_cdf(probs, uniform.clamp(min=0)), tokens)
        if any(self.greedy):
            tokens = torch.where(is_greedy.bool(), x.argmax(-1), tokens)
        return tokens

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """Queue the logprobs the rows ask for: those of the raw logits (the model's
        distribution, whole vocabulary)."""
        if not self.wanted:
            return
        raw, chosen_tokens = logits, tokens
        if self.wanted_index is not None:
            raw, chosen_tokens = logits.index_select(0, self.wanted_index), tokens.index_select(0, self.wanted_index)
        k_max = min(max(p.logprobs for p in self.shared if p.logprobs is not None), raw.shape[-1])
        if not k_max and raw.stride(-1) == 1 and use_fused(raw):
            # Rollouts want only the chosen tokens': one pass over the logits instead of a
            # float32 copy and a full log-softmax (kernels/token_logprobs.py).
            from ..kernels.token_logprobs import token_logprobs

            self.chosen.append(token_logprobs(raw, chosen_tokens))
            return
        lp = raw.float().log_softmax(-1)
        self.chosen.append(lp.gather(1, chosen_tokens[:, None])[:, 0])
        if k_max:  # not for rollouts, which want only the chosen tokens'
            self.alternatives = lp.topk(k_max, dim=-1)

    def finish(self) -> Drawn:
        """Start copying every step's tokens (and logprobs) to the host."""
        if not self.tokens:
            raise RuntimeError("no step was drawn")
        if self.count == 1:
            parts = [self.tokens[0], *self.chosen[:1], *(self.alternatives or ())]
        else:
            parts = [torch.stack(self.tokens), *([torch.stack(self.chosen)] if self.chosen else [])]
        return Drawn(self.tokens[-1], self.rows, HostCopy(*parts), self.wanted, len(self.tokens))


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


def seeded_uniforms(seeds: list[int], positions: list[int] | torch.Tensor) -> torch.Tensor:
    """seeded_uniform of every (seed, position) pair, as a float32 CPU tensor, bit for bit: int64
    tensor arithmetic wraps as the 64-bit masks above do. ``positions`` may also be an int64
    tensor that broadcasts against the seeds (as (steps, 1) + (B,) does). A step of 512 seeded
    rows spent more host time on the Python loop than on everything else the sampler prepares."""
    z = torch.tensor([_int64(s) for s in seeds], dtype=torch.int64)
    z = z + (torch.as_tensor(positions, dtype=torch.int64) + 1) * _int64(_GOLDEN)
    z = (z ^ _shift_right(z, 30)) * _int64(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _int64(_MIX2)
    return _shift_right(z ^ _shift_right(z, 31), 40).to(torch.float32) / float(1 << 24)


def row_uniforms(rows: list[SampleRow], seeded: list[bool], steps: int = 1) -> torch.Tensor:
    """Each row's seeded uniform at its position and the ``steps - 1`` after it, (steps, B), -1
    for an unseeded row (seeded: whether each row has a seed; float32, on the host)."""
    if not any(seeded):
        return torch.full((steps, len(rows)), -1.0)
    positions = torch.tensor([r.position for r in rows], dtype=torch.int64) + torch.arange(steps)[:, None]
    uniforms = seeded_uniforms([r.seed or 0 for r in rows], positions)
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
    """Queued draws: `tokens` (B,), the last step's, on the device, and every step's host copies
    (with logprobs) in flight."""

    def __init__(self, tokens: torch.Tensor, rows: list[SampleRow], copy: HostCopy, wanted: list[int], steps: int = 1):
        self.tokens, self._rows, self._copy, self._wanted, self.steps = tokens, rows, copy, wanted, steps

    def result(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """The sampled tokens of a one-step draw as ints, and the logprobs rows asked for: one
        wait for the device."""
        if self.steps != 1:
            raise RuntimeError(f"a draw of {self.steps} steps: read it with results()")
        return self.results()[0]

    def results(self) -> list[tuple[list[int], list[TokenLogprob | None]]]:
        """Each step's tokens and logprobs, as result() gives one step's: one wait for the device."""
        # StepDraws.finish copied: the tokens, (K, B) for K > 1 steps; the wanted rows' chosen
        # logprobs, shaped alike; for one step, top alternatives (values, ids) when asked for.
        copied = self._copy.wait()
        per_step = (lambda x: x) if self.steps > 1 else (lambda x: [x])  # noqa: E731
        token_lists = per_step(copied[0])
        chosen = per_step(copied[1]) if self._wanted else None
        top_v, top_i = copied[2:] if len(copied) > 2 else (None, None)
        out = []
        for step, token_list in enumerate(token_lists):
            logprobs: list[TokenLogprob | None] = [None] * len(self._rows)
            for j, i in enumerate(self._wanted):
                k = self._rows[i].params.logprobs
                top = list(zip(top_i[j][:k], top_v[j][:k])) if k else []
                logprobs[i] = TokenLogprob(token_list[i], chosen[step][j], top)
            out.append((token_list, logprobs))
        return out
