"""Training metrics: perplexity (a torchmetrics Metric), tokens per second, and model FLOPs utilisation.

MFU = achieved model FLOPs / peak FLOPs of the device. Model FLOPs per token follow the
usual convention (PaLM, nanoGPT): 6 per weight of every matrix multiply a token goes through
(2 forward, 4 backward), plus the attention scores and weighted sum, 6 * layers * heads *
(qk_dim + v_dim) * seq_len, without halving for causality. Peak FLOPs come from Lightning's
table of accelerators (by device name and compute dtype), or from the user; on a CPU there is
no meaningful peak, so MFU is None unless the user supplies one.
"""

from __future__ import annotations

import re
import time
from collections import deque

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from torch import nn
from torchmetrics.aggregation import MeanMetric

from astrai.core.config import ModelConfig
from astrai.core.moe import MoE


class Perplexity(MeanMetric):
    """exp(token-weighted mean NLL), aggregated across batches and processes.

    Update with a batch's summed NLL and its token count: update(nll_sum / n, weight=n).
    """

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute())


def matmul_params(model: nn.Module) -> float:
    """Weights a token multiplies through in one forward pass: every nn.Linear weight, counting
    only the activated share (top_k / n_experts) of routed MoE experts. The embedding lookup is
    not a matmul; a tied output head is counted through lm_head."""
    total = 0.0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".experts." not in f".{name}.":
            total += module.weight.numel()
        elif isinstance(module, MoE):
            routed = sum(m.weight.numel() for m in module.experts.modules() if isinstance(m, nn.Linear))
            total += routed * module.top_k / module.n_experts
    return total


def attention_dims(config: ModelConfig) -> tuple[int, int]:
    """(qk_dim, v_dim) of one head."""
    if config.attn_type == "mla":
        return config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    return config.head_dim, config.head_dim


def flops_per_token(model: nn.Module, config: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token for sequences of ``seq_len`` tokens."""
    qk_dim, v_dim = attention_dims(config)
    attention = 6 * config.n_layers * config.n_heads * (qk_dim + v_dim) * seq_len
    return 6 * matmul_params(model) + attention


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Theoretical peak of one device for ``dtype`` matmuls; None when unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None
    return get_available_flops(device, dtype)


def precision_dtype(precision: str | int | None) -> torch.dtype:
    """Compute dtype of a Lightning precision setting such as "bf16-mixed" or "32-true"."""
    p = str(precision)
    if "bf16" in p:
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    if p.startswith("64"):
        return torch.float64
    return torch.float32


class Throughput:
    """Tokens per second over a sliding window of recent steps (wall clock, data loading included).

    The first step (compilation, warm-up) is a window endpoint only, never a whole interval.
    """

    def __init__(self, window: int = 20):
        self._marks: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self._tokens = 0

    def update(self, tokens: int, now: float | None = None) -> float | None:
        self._tokens += int(tokens)
        self._marks.append((time.perf_counter() if now is None else now, self._tokens))
        if len(self._marks) < 2:
            return None
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None


class HostCopy:
    """The latest device scalar whose copy to the host has finished, without waiting for it.

    push() starts an asynchronous copy into pinned memory and returns the newest finished copy
    (usually the previous step's value; None before the first one lands). For the progress
    bar: Lightning turns progress-bar values into Python numbers after every step, and for a
    CUDA tensor that means the host waits for every queued kernel. CPU tensors pass through.
    """

    def __init__(self, slots: int = 4):
        self._slots = slots
        self._free: deque[torch.Tensor] = deque()
        self._pending: deque[tuple[torch.cuda.Event, torch.Tensor]] = deque()
        self._latest: torch.Tensor | None = None

    def push(self, value: torch.Tensor) -> torch.Tensor | None:
        value = value.detach()
        if not value.is_cuda:
            return value.float()
        if not self._free and not self._pending:  # pinned buffers once, on the first (untimed) step
            self._free.extend(torch.empty((), dtype=torch.float32, pin_memory=True) for _ in range(self._slots))
        self._collect()
        if self._free:  # else the host is several steps ahead: skip this value rather than wait
            buffer = self._free.popleft()
            buffer.copy_(value.float(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((event, buffer))
        return self._latest

    def __getstate__(self) -> dict:  # pickle / deepcopy (CUDA events cannot be): start afresh
        return {"_slots": self._slots, "_free": deque(), "_pending": deque(), "_latest": None}

    def _collect(self) -> None:
        while self._pending and self._pending[0][0].query():
            _, buffer = self._pending.popleft()
            self._latest = buffer.clone()
            self._free.append(buffer)


def mfu(tokens_per_sec: float | None, flops_per_tok: float, peak: float | None) -> float | None:
    if tokens_per_sec is None or not peak:
        return None
    return tokens_per_sec * flops_per_tok / peak


def _group_names(groups: list[dict]) -> list[str]:
    """Readable names of an optimizer's parameter groups (build_optimizer's: decay, no_decay,
    muon), made unique with the group's index where two would share one."""
    names = []
    for i, group in enumerate(groups):
        name = group.get("name") or (
            "muon" if group.get("use_muon") else "decay" if group.get("weight_decay", 0) > 0 else "no_decay"
        )
        names.append(name if name not in names else f"{name}{i}")
    return names


class GradientSNR:
    """Gradient signal-to-noise ratio of each optimizer parameter group, across the micro-batches
    of one optimizer step (opt-in: model.log_grad_snr).

    For the N micro-batch gradients g_1 .. g_N that add up to one optimizer step (N =
    accumulate_grad_batches x data-parallel ranks), element j of a group has the mean
    m_j = (1/N) sum_i g_ij and the unbiased variance v_j = sum_i (g_ij - m_j)^2 / (N - 1). The
    group's SNR is the ratio of signal to noise power, sum_j m_j^2 / sum_j v_j: above 1 the
    micro-batches agree on the direction, below 1 the step is mostly noise (a larger batch, or
    a lower learning rate, would help). m_j^2 estimates the true mean's square plus v_j / N, so
    the ratio is never much below 1/N. Every g_i carries the same loss scaling (Lightning divides
    each micro-batch's loss by N), which cancels in the ratio.

    Cost: sum_j v_j = (sum_i |g_i|^2 - |sum_i g_i|^2 / N) / (N - 1), so a hook on every
    parameter's gradient adds up |g_i|^2 as each backward produces it (one reduction per
    parameter per backward, no gradient-sized buffer), and |sum_i g_i|^2 is read from the
    accumulated .grad before the optimizer step (before clipping). Under DDP each rank adds its
    own |g_i|^2, summed over ranks at the step; .grad then holds the ranks' mean.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.names = _group_names(optimizer.param_groups)
        self.params = {
            n: [p for p in g["params"] if p.requires_grad] for n, g in zip(self.names, optimizer.param_groups)
        }
        self.squares: dict[str, torch.Tensor | None] = {n: None for n in self.names}
        self.backwards = 0
        self._handles = [p.register_hook(self._hook(name)) for name, params in self.params.items() for p in params]

    def _hook(self, name: str):
        def add(grad: torch.Tensor) -> None:
            sq = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square()
            self.squares[name] = sq if self.squares[name] is None else self.squares[name] + sq

        return add

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def compute(self, world_size: int = 1, sum_over_ranks=None) -> dict[str, torch.Tensor] | None:
        """{group: SNR, "total": SNR of all groups together} for the step about to be taken
        (None with fewer than two micro-batches); starts the next step's sums."""
        n = self.backwards * world_size
        squares, self.squares, self.backwards = self.squares, {k: None for k in self.squares}, 0
        if n < 2:
            return None
        out, signal, noise = {}, 0.0, 0.0
        for name, params in self.params.items():
            total = squares[name]
            if total is None:
                total = torch.zeros((), device=params[0].device)
            if sum_over_ranks is not None:  # on every rank, whether or not it saw gradients
                total = sum_over_ranks(total)
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            # sum_i g_i = world_size x the ranks' mean in .grad
            summed = sum(torch.linalg.vector_norm(g, dtype=torch.float32).square() for g in grads) * world_size**2
            mean_sq = summed / n**2
            var = ((total - summed / n) / (n - 1)).clamp(min=0)
            out[name] = mean_sq / var.clamp(min=torch.finfo(torch.float32).tiny)
            signal, noise = signal + mean_sq, noise + var
        if out:
            out["total"] = signal / noise.clamp(min=torch.finfo(torch.float32).tiny)
        return out


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class RouterLoad:
    """How an MoE model's routers spread tokens over their experts in the last training forward
    (opt-in: model.log_router_load).

    Per MoE layer: the fraction of routed slots (token x top-k choice) each expert received
    (non-padding tokens only, as the balance loss counts them; the fractions sum to 1, uniform
    is 1 / n_experts), the load's coefficient of variation std/mean over the experts (0 when
    even), and the Switch balance term n_experts * sum_e fraction_e * mean router probability_e
    (1 when uniform; the MoE auxiliary loss before moe_aux_loss_coef). Read from forward hooks
    on the routers, recomputing the top-k choice from the router logits the layer computed (no
    second matmul); only forwards that train (module in train mode, gradients on) count, so
    validation, a frozen reference and generation leave the numbers alone.
    """

    def __init__(self, model: nn.Module):
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._valid: dict[int, torch.Tensor | None] = {}
        self._handles = []
        for i, (name, moe) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, MoE)):
            match = _LAYER.search(f".{name}.")
            label = f"layer{match.group(1) if match else i}"
            self._handles.append(moe.register_forward_pre_hook(self._remember_valid))
            self._handles.append(moe.gate.register_forward_hook(self._record(label, moe)))

    def _remember_valid(self, moe: nn.Module, args) -> None:
        self._valid[id(moe)] = args[1] if len(args) > 1 else None

    def _record(self, label: str, moe: MoE):
        def hook(gate: nn.Module, args, logits: torch.Tensor) -> None:
            if not (gate.training and torch.is_grad_enabled()):
                return
            with torch.no_grad():
                probs = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
                chosen = probs.topk(moe.top_k, dim=-1).indices
                # Weights rather than boolean indexing: fixed shapes, so torch.compile keeps one graph.
                valid = self._valid.get(id(moe))
                weight = probs.new_ones(probs.shape[0]) if valid is None else valid.to(probs.dtype)
                counts = probs.new_zeros(moe.n_experts).index_add_(
                    0, chosen.reshape(-1), weight.repeat_interleave(moe.top_k)
                )
                fractions = counts / counts.sum().clamp(min=1)
                mean_probs = (probs * weight[:, None]).sum(0) / weight.sum().clamp(min=1)
                balance = moe.n_experts * (fractions * mean_probs).sum()
                cv = fractions.std(correction=0) / fractions.mean()
                self.stats[label] = (fractions, cv, balance)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def metrics(self) -> dict[str, torch.Tensor]:
        """{"<layer>/expert<e>": fraction, "<layer>/cv": ..., "<layer>/balance": ...}"""
        out = {}
        for label, (fractions, cv, balance) in self.stats.items():
            for e in range(fractions.numel()):
                out[f"{label}/expert{e}"] = fractions[e]
            out[f"{label}/cv"], out[f"{label}/balance"] = cv, balance
        return out
