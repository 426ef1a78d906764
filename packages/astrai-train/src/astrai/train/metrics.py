"""Training metrics: perplexity (a torchmetrics Metric), tokens per second, and model FLOPs utilisation.

MFU = achieved model FLOPs / peak FLOPs of the device. Model FLOPs per token follow the
usual convention (PaLM, nanoGPT): 6 per weight of every matrix multiply a token goes through
(2 forward, 4 backward), plus the attention scores and weighted sum, 6 * layers * heads *
(qk_dim + v_dim) * seq_len, without halving for causality. Peak FLOPs come from Lightning's
table of accelerators (by device name and compute dtype), or from the user; on a CPU there is
no meaningful peak, so MFU is None unless the user supplies one.
"""

from __future__ import annotations

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
