"""Training options: NEFTune noise (SFT), the torch.compile mode, adapter-only LoRA save/load,
gradient SNR and MoE router load in the logged metrics. (WSD is in test_optimizers.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader
from trainhelp import CycleBatches, make_trainer

from astrai.core.errors import AstraiError
from astrai.train.seq_module import SeqModule
from astrai.train.sft_module import SFTModule


# -- NEFTune -------------------------------------------------------------------------------------
def test_neftune_adds_uniform_noise_of_the_paper_scale_in_training_only(model_config_json):
    alpha, batch, seq, dim = 5.0, 4, 64, 32
    module = SFTModule(model=model_config_json, neftune_alpha=alpha, export_on_fit_end=False)
    embed = module.model.model.embed_tokens
    ids = torch.randint(10, 300, (batch, seq), generator=torch.Generator().manual_seed(0))
    clean = F.embedding(ids, embed.weight).detach()
    bound = alpha / math.sqrt(seq * dim)  # alpha / sqrt(L * d)

    torch.manual_seed(0)
    module.train()
    noise = (embed(ids) - clean).detach()
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert noise.abs().max() > 0.99 * bound  # 8192 uniform draws reach close to the bound
    assert noise.var().item() == pytest.approx(bound**2 / 3, rel=0.05)  # Var U(-b, b) = b^2 / 3
    assert abs(noise.mean().item()) < 0.03 * bound
    assert not torch.equal(embed(ids), embed(ids))  # fresh noise on every forward

    with torch.no_grad():  # generation: no gradients, no noise, even in train mode
        assert torch.equal(embed(ids), clean)
    module.eval()  # validation / test
    assert torch.equal(embed(ids), clean)
    plain = SFTModule(model=model_config_json, export_on_fit_end=False)
    plain.model.load_state_dict(module.model.state_dict())
    plain.eval()
    torch.testing.assert_close(module(ids), plain(ids), rtol=0, atol=0)


def test_neftune_leaves_validation_unchanged(tmp_path, model_config_json):
    module = SFTModule(model=model_config_json, neftune_alpha=10.0, export_on_fit_end=False)
    plain = SFTModule(model=model_config_json, export_on_fit_end=False)
    plain.model.load_state_dict(module.model.state_dict())
    val = DataLoader(CycleBatches(8, 16, seed=0), batch_size=4)
    (noisy,) = make_trainer(tmp_path).validate(module, val, verbose=False)
    (clean,) = make_trainer(tmp_path).validate(plain, val, verbose=False)
    assert noisy["val/loss"] == clean["val/loss"]
    # training does see the noise: the training loss of one batch differs
    batch = next(iter(val))
    module.train(), plain.train()
    _, out_noisy = module.compute_loss(batch, "train")
    _, out_clean = plain.compute_loss(batch, "train")
    assert not torch.equal(out_noisy.loss, out_clean.loss)


def test_neftune_alpha_is_checked(model_config_json):
    with pytest.raises(AstraiError, match="model.neftune_alpha must be a number >= 0"):
        SFTModule(model=model_config_json, neftune_alpha=-1.0)


# -- torch.compile mode ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_compile_mode_reaches_torch_compile(model_config_json, monkeypatch, mode):
    module = SeqModule(model=model_config_json, compile=True, compile_mode=mode)
    calls = []
    monkeypatch.setattr(module.model, "compile", lambda **kwargs: calls.append(kwargs))
    module.configure_model()
    module.configure_model()  # Lightning may call it again: compiled once
    assert calls == [{"mode": mode}]


def test_compile_mode_is_checked(model_config_json):
    with pytest.raises(AstraiError, match="model.compile_mode must be one of .*'max-autotune-no-cudagraphs'"):
        SeqModule(model=model_config_json, compile=True, compile_mode="fast")
    with pytest.raises(AstraiError, match="model.compile_mode is 'max-autotune' but model.compile is false"):
        SeqModule(model=model_config_json, compile_mode="max-autotune")


def test_compile_mode_is_a_cli_flag(model_config_json, capsys):
    from astrai.train.cli import cli_main

    args = [
        "fit",
        "--model=seq",
        f"--model.model={model_config_json}",
        "--model.compile=true",
        "--data=pretrain",
        "--data.tokenizer=unused",
        "--data.train=unused.jsonl",
    ]
    with pytest.raises(SystemExit):
        cli_main([*args, "--model.compile_mode=max-autotune", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["compile_mode"] == "max-autotune"
    with pytest.raises(SystemExit):  # jsonargparse refuses it, naming the flag and the allowed values
        cli_main([*args, "--model.compile_mode=fast", "--print_config"])
    assert "compile_mode" in capsys.readouterr().err
