"""Optimizers (AdamW, Muon) and LR schedules (cosine with warmup, SGDR, warmup-stable-decay)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from astrai.core.config import ModelConfig
from astrai.core.errors import AstraiError
from astrai.core.transformer import CausalLM
from astrai.train.optimizers import Muon, build_optimizer, newton_schulz
from astrai.train.schedulers import WarmupCosine, WarmupSGDR, build_scheduler


# -- Newton-Schulz ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 16), (32, 8), (8, 48)])
def test_newton_schulz_gives_a_near_orthogonal_matrix(shape):
    g = torch.Generator().manual_seed(0)
    # Singular values spread over two orders of magnitude (five quintic steps do not lift
    # directions much weaker than that, which is fine for a gradient).
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g))
    k = min(shape)
    s = torch.logspace(0, -2, k)
    m = u[:, :k] @ torch.diag(s) @ v[:, :k].T
    assert torch.linalg.svdvals(m).max() / torch.linalg.svdvals(m).min() > 50

    o = newton_schulz(m, steps=5)
    sv = torch.linalg.svdvals(o.double())
    assert sv.min() > 0.6 and sv.max() < 1.2, sv  # all directions now move by about the same amount
    polar = (u[:, :k] @ v[:, :k].T).double()  # the exact orthogonal factor U V^T
    cos = (o.double() * polar).sum() / (o.double().norm() * polar.norm())
    assert cos > 0.95


# -- AdamW part of Muon ----------------------------------------------------------------------
def test_muon_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ours = Muon(
        [{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    ref = torch.optim.AdamW(
        [{"params": [a2], "weight_decay": 0.1}, {"params": [b2], "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=False,
    )
    for _ in range(5):
        grads = torch.randn(5, 3), torch.randn(7)
        for p, q, grad in ((a, a2, grads[0]), (b, b2, grads[1])):
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, a2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, b2, rtol=1e-6, atol=1e-7)


def test_muon_update_is_orthogonal_and_rms_matched():
    w = torch.zeros(64, 16, requires_grad=True)
    opt = Muon([{"params": [w], "use_muon": True}], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0)
    w.grad = torch.randn(64, 16)
    opt.step()
    update = -w.detach()
    sv = torch.linalg.svdvals(update / (0.2 * math.sqrt(64)))
    assert sv.min() > 0.5 and sv.max() < 1.3
    # RMS of an orthogonal 64x16 update scaled by 0.2*sqrt(64): 0.2 * sqrt(64 * 16 / (64 * 16)) ~ 0.2
    assert 0.1 < update.pow(2).mean().sqrt().item() < 0.3


def test_muon_rejects_non_matrix_groups():
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [torch.zeros(3, requires_grad=True)], "use_muon": True}])


def test_muon_reduces_a_regression_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    target = x @ torch.randn(32, 16)
    model = nn.Sequential(nn.Linear(32, 64, bias=False), nn.Tanh(), nn.Linear(64, 16))
    opt = build_optimizer(model, "muon", lr=0.05, weight_decay=0.0)
    assert any(g.get("use_muon") for g in opt.param_groups)
    losses = []
    for _ in range(60):
        loss = (model(x) - target).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.1 * losses[0]


# -- parameter groups ---------------------------------------------------------------------------
def _tiny_lm(**kw) -> CausalLM:
    return CausalLM(ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, ffn_dim=32, **kw))


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = _tiny_lm()
    opt = build_optimizer(model, "muon", weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    adam = {names[id(p)]: g["weight_decay"] for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert "model.layers.0.self_attn.q_proj.weight" in muon and "model.layers.1.mlp.down_proj.weight" in muon
    assert "model.embed_tokens.weight" not in muon and "lm_head.weight" not in muon
    assert adam["model.embed_tokens.weight"] == 0.1 and adam["lm_head.weight"] == 0.1
    assert adam["model.norm.weight"] == 0.0  # no decay on 1-D gains
    assert len(muon) + len(adam) == len(list(model.parameters()))


def test_adamw_skips_frozen_params_and_decays_matrices_only():
    model = _tiny_lm(tie_embeddings=True)
    model.model.layers[0].requires_grad_(False)
    opt = build_optimizer(model, "adamw", weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})  # the tied weight appears once
    assert all(p.requires_grad for p in params)
    for g in opt.param_groups:
        assert all((p.ndim >= 2) == (g["weight_decay"] > 0) for p in g["params"])


def test_build_optimizer_errors_are_clear():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer(_tiny_lm(), "sgd")
    frozen = _tiny_lm().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW needs CUDA")
def test_adamw_is_fused_on_cuda():
    opt = build_optimizer(_tiny_lm().cuda(), "adamw")
    assert opt.defaults["fused"]


# -- schedules ------------------------------------------------------------------------------------
def _lrs(name, steps, **kw):
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, name, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_values():
    lrs = _lrs("cosine", 30, warmup_steps=4, total_steps=24, min_lr_ratio=0.1)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for step in range(4, 30):
        progress = min(1.0, (step - 4) / 20)
        assert lrs[step] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lrs[24:] == pytest.approx([0.1] * 6)  # flat at the floor after the decay


def test_sgdr_restarts_with_growing_cycles():
    lrs = _lrs("sgdr", 40, warmup_steps=2, cycle_steps=5, cycle_mult=2.0, min_lr_ratio=0.0)
    restarts = [s for s in range(3, 40) if lrs[s] > lrs[s - 1] + 1e-9]
    assert restarts == [2 + 5, 2 + 5 + 10, 2 + 5 + 10 + 20]
    assert all(lrs[s] == pytest.approx(1.0) for s in [2, *restarts])
    # within the second cycle (length 10) the multiplier follows a cosine
    assert lrs[7 + 5] == pytest.approx(0.5)


def test_constant_schedule_warms_up_then_stays():
    assert _lrs("constant", 6, warmup_steps=2) == pytest.approx([0.5, 1, 1, 1, 1, 1])


def test_schedule_state_survives_a_round_trip():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, "cosine", warmup_steps=2, total_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched2 = build_scheduler(opt2, "cosine", warmup_steps=2, total_steps=10)
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_schedule_errors_name_the_setting():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="max_steps or model.schedule.decay_steps"):
        build_scheduler(opt, "cosine", total_steps=None)
    with pytest.raises(ValueError, match="cycle_steps"):
        build_scheduler(opt, "sgdr")
    with pytest.raises(ValueError, match="scheduler must be one of"):
        build_scheduler(opt, "step")
    assert WarmupCosine(0, 10)(0) == 1.0 and WarmupSGDR(0, 4)(4) == 1.0


@pytest.mark.parametrize("kind", ["muon", "master_adamw"])
def test_step_runs_a_closure_with_gradients_on_and_returns_its_loss(kind):
    from astrai.train.master_adamw import MasterWeightAdamW

    w = nn.Parameter(torch.ones(4, 4))
    opt = Muon([{"params": [w], "use_muon": True}], lr=0.1) if kind == "muon" else MasterWeightAdamW([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()  # fails under the step's no_grad unless the closure gets gradients back
        return loss

    assert float(opt.step(closure)) == 16.0
    assert float(w.sum()) < 16.0  # the step used the gradient the closure made
    assert opt.step() is None


# -- warmup-stable-decay ------------------------------------------------------------------------
def _wsd_expected(step, warmup, total, fraction, shape, floor):
    """The WSD multiplier written out from its definition (not from the module under test)."""
    if step < warmup:
        return (step + 1) / warmup
    decay_len = max(1, round(fraction * total))
    start = total - decay_len
    if step < start:
        return 1.0
    p = min(1.0, (step - start) / decay_len)
    f = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "1-sqrt": 1 - math.sqrt(p)}[shape]
    return floor + (1 - floor) * f


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_warms_up_stays_then_decays_in_the_chosen_shape(shape):
    lrs = _lrs("wsd", 26, warmup_steps=4, total_steps=20, decay_fraction=0.25, decay_shape=shape, min_lr_ratio=0.1)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # warmup
    assert lrs[4:16] == pytest.approx([1.0] * 12)  # stable until the last 25% (5 of 20 steps)
    # chosen steps of the decay, against the formulas: p = (step - 15) / 5
    checks = {15: 0.0, 16: 0.2, 17: 0.4, 18: 0.6, 19: 0.8, 20: 1.0}
    for step, p in checks.items():
        f = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "1-sqrt": 1 - math.sqrt(p)}[shape]
        assert lrs[step] == pytest.approx(0.1 + 0.9 * f), step
    assert lrs[20:] == pytest.approx([0.1] * 6)  # flat at the floor after the decay
    for step in range(26):
        assert lrs[step] == pytest.approx(_wsd_expected(step, 4, 20, 0.25, shape, 0.1))


def test_wsd_defaults_and_resume():
    # defaults: 1-sqrt over the last 20%, down to min_lr_ratio (0.1 in build_scheduler)
    lrs = _lrs("wsd", 100, total_steps=100)
    assert lrs[79] == 1.0 and lrs[80] == pytest.approx(1.0)
    assert lrs[85] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(5 / 20)))
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, "wsd", total_steps=10, decay_fraction=0.5, decay_shape="linear")
    for _ in range(7):
        opt.step(), sched.step()
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched2 = build_scheduler(opt2, "wsd", total_steps=10)  # other settings: the state restores them
    sched2.load_state_dict(sched.state_dict())
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(0.1 + 0.9 * (1 - 3 / 5))


def test_wsd_errors_name_the_field():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(AstraiError, match="max_steps or model.schedule.decay_steps"):
        build_scheduler(opt, "wsd")
    with pytest.raises(AstraiError, match=r"model.schedule.decay_fraction must be in \(0, 1\]"):
        build_scheduler(opt, "wsd", total_steps=10, decay_fraction=0.0)
    with pytest.raises(AstraiError, match="model.schedule.decay_shape must be one of"):
        build_scheduler(opt, "wsd", total_steps=10, decay_shape="sqrt")
    with pytest.raises(AstraiError, match="model.schedule.warmup_steps .* lower it or model.schedule.decay_fraction"):
        build_scheduler(opt, "wsd", total_steps=10, warmup_steps=9, decay_fraction=0.5)


def test_wsd_is_a_module_option(model_config_json, trainer_factory, tiny_data):
    """schedule.name: wsd through the training module: the length is trainer.max_steps."""
    from astrai.train.pretrain_module import PretrainModule

    module = PretrainModule(
        model=model_config_json,
        optimizer={"lr": 0.01},
        schedule={"name": "wsd", "warmup_steps": 2, "decay_fraction": 0.5, "decay_shape": "linear"},
        export={"on_fit_end": False},
    )
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = trainer_factory(max_steps=8, callbacks=[Record()])
    trainer.fit(module, datamodule=tiny_data())
    assert lrs == pytest.approx([0.01 * _wsd_expected(s, 2, 8, 0.5, "linear", 0.1) for s in range(8)])
