"""AdamW for bfloat16 weights that keeps a float32 master copy of every weight.

This is the mixed-precision recipe of Megatron-LM and DeepSpeed's bf16 mode: the model holds
bf16 weights, so forward and backward run on them directly (no per-step cast of float32
weights, bf16 gradients); the optimizer holds, per weight, a float32 master copy and float32
moments, applies the AdamW update to the master in float32 and writes its bf16 rounding back
into the model. Updates far smaller than a bf16 step (lr x update ~1e-7 of the weight, while
bf16 resolves ~4e-3) therefore accumulate in the master instead of being rounded away, which is
what makes plain bf16 weights with a bf16 optimizer unsound.

On CUDA one Triton kernel per weight reads the bf16 gradient, the master and the moments once
and writes them (and the bf16 weight) once: 28 bytes a weight, against 40 for float32 weights
under autocast (cast in forward, float32 gradient, fused AdamW). Elsewhere the same arithmetic
runs as torch ops. Float32 weights in the same optimizer are their own master.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch-ops path below serves
    triton = None

_MOMENTS = ("exp_avg", "exp_avg_sq")
_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _adamw_master_kernel(
        grad_ptr,
        master_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        param_ptr,
        n_elements,
        beta1,
        beta2,
        eps,
        decay,
        step_size,
        bias_correction2_sqrt,
        WRITE_PARAM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(master_ptr + offsets, mask=mask, other=0.0)
        m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
        m = m + (1.0 - beta1) * (g - m)  # lerp, as torch's AdamW
        v = beta2 * v + (1.0 - beta2) * g * g
        # Round-to-nearest sqrt and division (Triton's defaults are approximate): parity with torch.
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        w = w * decay - step_size * tl.div_rn(m, denom)
        tl.store(master_ptr + offsets, w, mask=mask)
        tl.store(exp_avg_ptr + offsets, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
        if WRITE_PARAM:
            tl.store(param_ptr + offsets, w.to(param_ptr.dtype.element_ty), mask=mask)


def _update_torch(p, grad, master, exp_avg, exp_avg_sq, beta1, beta2, eps, decay, step_size, bc2_sqrt) -> None:
    g = grad.float()
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    master.mul_(decay).addcdiv_(exp_avg, denom, value=-step_size)
    if master is not p:
        p.copy_(master)


def _update_triton(p, grad, master, exp_avg, exp_avg_sq, beta1, beta2, eps, decay, step_size, bc2_sqrt) -> None:
    n = p.numel()
    _adamw_master_kernel[(triton.cdiv(n, _BLOCK),)](
        grad,
        master,
        exp_avg,
        exp_avg_sq,
        p,
        n,
        beta1,
        beta2,
        eps,
        decay,
        step_size,
        bc2_sqrt,
        WRITE_PARAM=master is not p,
        BLOCK=_BLOCK,
    )


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, as torch.optim.AdamW) whose state
    holds a float32 ``master`` copy of each non-float32 weight and float32 moments.

    The master starts as the float32 value of the (already rounded) bf16 weight. ``fused``:
    the Triton kernel (default: when Triton is installed and the weights are on CUDA).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        fused: bool | None = None,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"MasterWeightAdamW: need lr, eps, weight_decay >= 0 and betas in [0, 1), got "
                f"lr={lr}, eps={eps}, weight_decay={weight_decay}, betas={betas}"
            )
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        on_cuda = all(p.is_cuda for g in self.param_groups for p in g["params"])
        if fused and (triton is None or not on_cuda):
            raise ValueError("MasterWeightAdamW: fused=True needs Triton and every weight on a CUDA device")
        self.fused = on_cuda and triton is not None if fused is None else fused

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            if p.dtype != torch.float32:
                state["master"] = p.detach().float()
            for key in _MOMENTS:
                state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps = float(group["lr"]), group["betas"], group["eps"]
            decay = 1 - lr * group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("MasterWeightAdamW does not take sparse gradients")
                state = self._state(p)
                state["step"] += 1
                step = state["step"]
                master = state.get("master", p)
                args = (
                    p,
                    p.grad,
                    master,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    beta1,
                    beta2,
                    eps,
                    decay,
                    lr / (1 - beta1**step),
                    math.sqrt(1 - beta2**step),
                )
                # The kernel walks flat memory: every operand must be laid out contiguously.
                fused = self.fused and all(t.is_contiguous() for t in args[:5])
                (_update_triton if fused else _update_torch)(*args)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating-point state to its parameter's dtype on load, which would turn the
        # float32 masters and moments into bf16: put the saved float32 tensors back afterwards.
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            for key in ("master", *_MOMENTS):
                if key in saved.get(i, {}):
                    self.state[p][key] = saved[i][key].to(device=p.device, dtype=torch.float32)


def closure_loss(closure):
    """An optimizer step's closure (forward and backward again, as LBFGS-style callers pass), run
    with gradients on inside the step's no_grad; None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
