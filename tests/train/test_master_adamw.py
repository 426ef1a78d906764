"""bf16 weights with float32 master weights: MasterWeightAdamW and the param_dtype option."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from train_helpers import TINY_MODEL, CycleBatches, make_trainer

from astrai.core.config import ModelConfig
from astrai.core.transformer import CausalLM
from astrai.train.master_adamw import MasterWeightAdamW
from astrai.train.optimizers import build_optimizer
from astrai.train.pretrain_module import PretrainModule

REPO = Path(__file__).resolve().parents[2]
SETTINGS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def _weights(dtype, seed=0, shapes=((6, 5), (7,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _groups(params, decay=0.1):
    return [{"params": params[:1], "weight_decay": decay}, {"params": params[1:], "weight_decay": 0.0}]


def _grads(params, step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(dtype) for p in params]


def test_float32_weights_follow_torch_adamw():
    ours, ref = _weights(torch.float32), _weights(torch.float32)
    opt = MasterWeightAdamW(_groups(ours), **SETTINGS)
    ref_opt = torch.optim.AdamW(_groups(ref), foreach=False, **SETTINGS)
    for step in range(6):
        for p, q, g in zip(ours, ref, _grads(ours, step, torch.float32)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert "master" not in opt.state[ours[0]]  # a float32 weight is its own master


def test_bf16_weights_keep_a_float32_master_on_the_float32_trajectory():
    """The master follows exactly what float32 AdamW does with the same (bf16) gradients; the
    model's weight is the master rounded to bf16."""
    ours = _weights(torch.bfloat16)
    ref = [p.detach().float().requires_grad_() for p in ours]  # the same starting values
    opt = MasterWeightAdamW(_groups(ours), **SETTINGS)
    ref_opt = torch.optim.AdamW(_groups(ref), foreach=False, **SETTINGS)
    for step in range(6):
        for p, q, g in zip(ours, ref, _grads(ours, step, torch.bfloat16)):
            p.grad, q.grad = g, g.float()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        state = opt.state[p]
        assert p.dtype == torch.bfloat16
        assert {state[k].dtype for k in ("master", "exp_avg", "exp_avg_sq")} == {torch.float32}
        torch.testing.assert_close(state["master"], q.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(p.detach(), state["master"].to(torch.bfloat16))


def test_small_updates_accumulate_instead_of_rounding_away():
    """Why the master exists: at lr 1e-4 each update is far below a bf16 step near 1.0 (2^-7),
    so AdamW on bf16 weights never moves them; the master accumulates the updates until the
    bf16 weight moves too."""
    start = torch.ones(64, dtype=torch.bfloat16)
    plain, ours = start.clone().requires_grad_(), start.clone().requires_grad_()
    plain_opt = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    opt = MasterWeightAdamW([ours], lr=1e-4, weight_decay=0.0)
    for _ in range(60):
        plain.grad, ours.grad = torch.ones_like(start), torch.ones_like(start)
        plain_opt.step()
        opt.step()
    assert torch.equal(plain.detach(), start)
    master = opt.state[ours]["master"]
    assert master.max().item() == pytest.approx(1 - 60 * 1e-4, abs=1e-6)
    assert (ours.detach() < 1).all()


def test_checkpoint_round_trip_keeps_float32_state():
    params = _weights(torch.bfloat16)
    opt = MasterWeightAdamW(_groups(params), **SETTINGS)
    for step in range(3):
        for p, g in zip(params, _grads(params, step, torch.bfloat16)):
            p.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    copies = [p.detach().clone().requires_grad_() for p in params]
    loaded = MasterWeightAdamW(_groups(copies), **SETTINGS)
    loaded.load_state_dict(torch.load(buffer))
    for p, q in zip(params, copies):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert loaded.state[q][key].dtype == torch.float32, key  # torch would cast them to bf16
            assert torch.equal(loaded.state[q][key], opt.state[p][key])
    for step in range(3, 5):  # and both go on identically
        for p, q, g in zip(params, copies, _grads(params, step, torch.bfloat16)):
            p.grad, q.grad = g, g.clone()
        opt.step()
        loaded.step()
    for p, q in zip(params, copies):
        assert torch.equal(opt.state[p]["master"], loaded.state[q]["master"])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="lr"):
        MasterWeightAdamW(_weights(torch.bfloat16), lr=-1.0)
    with pytest.raises(ValueError, match="fused=True"):
        MasterWeightAdamW(_weights(torch.bfloat16), fused=True)  # CPU weights


def test_build_optimizer_gives_bf16_weights_master_weights():
    model = CausalLM(ModelConfig(vocab_size=64, **TINY_MODEL)).to(torch.bfloat16)
    assert isinstance(build_optimizer(model, "adamw"), MasterWeightAdamW)
    with pytest.raises(ValueError, match="muon keeps no float32 master"):
        build_optimizer(model, "muon")
    assert type(build_optimizer(model.float(), "adamw")) is torch.optim.AdamW


# -- the Triton kernel ----------------------------------------------------------------------------
_KERNEL_CHECK = textwrap.dedent("""
    import torch
    from astrai.train import master_adamw as ma

    def run(update, dtype, n):
        g = torch.Generator().manual_seed(n)
        p = torch.randn(n, generator=g).to(dtype)
        grad = torch.randn(n, generator=g).to(dtype)
        master = p.float() if dtype != torch.float32 else p
        m, v = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01
        update(p, grad, master, m, v, 0.9, 0.95, 1e-8, 1 - 1e-3 * 0.1, 1e-3 / (1 - 0.9**3), (1 - 0.95**3) ** 0.5)
        return p, master, m, v

    for dtype in (torch.bfloat16, torch.float32):
        for n in (1000, 2 * ma._BLOCK + 37):
            got, want = run(ma._update_triton, dtype, n), run(ma._update_torch, dtype, n)
            for a, b in zip(got[1:], want[1:]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            # the interpreter rounds float32 -> bf16 towards zero (the GPU to nearest): one bf16 step
            torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2**-7, atol=0)
    print("kernel ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernel_matches_the_torch_ops_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _KERNEL_CHECK], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "kernel ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel runs on CUDA")
def test_fused_kernel_matches_the_torch_ops_on_cuda_and_never_syncs():
    shapes = ((3000, 1001), (1001,), (64, 64))
    fused = [p.detach().cuda().requires_grad_() for p in _weights(torch.bfloat16, shapes=shapes)]
    plain = [p.detach().clone().requires_grad_() for p in fused]
    fused_opt = MasterWeightAdamW(_groups(fused), **SETTINGS)
    plain_opt = MasterWeightAdamW(_groups(plain), fused=False, **SETTINGS)
    assert fused_opt.fused
    for step in range(4):
        for p, q, g in zip(fused, plain, _grads(fused, step, torch.bfloat16)):
            p.grad, q.grad = g.cuda(), g.cuda()
        if step > 0:  # compiled on the first step
            torch.cuda.set_sync_debug_mode("error")
        try:
            fused_opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        plain_opt.step()
    for p, q in zip(fused, plain):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused_opt.state[p][key], plain_opt.state[q][key], rtol=1e-5, atol=1e-7)
        assert torch.equal(p.detach(), fused_opt.state[p]["master"].to(torch.bfloat16))


# -- the module option ------------------------------------------------------------------------------
def _module(name="adamw", **kw):
    torch.manual_seed(0)
    return PretrainModule(
        model={"vocab_size": 320, **TINY_MODEL},
        optimizer={"name": name, "lr": 1e-2},
        export={"on_fit_end": False},
        **kw,
    )


def test_bf16_params_train_the_model(tmp_path):
    module = _module(param_dtype="bfloat16")
    trainer = make_trainer(tmp_path, max_steps=30)
    loader = DataLoader(CycleBatches(16, 16), batch_size=4, shuffle=True)
    first = _module().compute_loss(next(iter(loader)), "val")[1].loss.item()
    trainer.fit(module, loader)
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
    assert module.model.model.rotary.inv_freq.dtype == torch.float32  # buffers stay float32
    assert isinstance(trainer.optimizers[0], MasterWeightAdamW)
    assert trainer.callback_metrics["train/loss"] < 0.3 * first


def test_param_dtype_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="param_dtype must be one of"):
        _module(param_dtype="float16")
    loader = DataLoader(CycleBatches(8, 16), batch_size=4)
    with pytest.raises(ValueError, match="muon"):
        make_trainer(tmp_path, max_steps=2).fit(_module("muon", param_dtype="bfloat16"), loader)
