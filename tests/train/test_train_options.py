"""Training options: NEFTune noise (SFT), the torch.compile mode, adapter-only LoRA save/load,
gradient SNR and MoE router load in the logged metrics. (WSD is in test_optimizers.py.)"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from train_helpers import TINY_MODEL, CycleBatches, make_trainer

from astrai.core.auto import AutoModel
from astrai.core.errors import AstraiError
from astrai.core.moe import MoE
from astrai.train.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter,
    load_adapter_model,
    read_adapter_config,
)
from astrai.train.adapter import main as adapter_main
from astrai.train.lora import LoRAConfig, LoRALinear
from astrai.train.pretrain_module import PretrainModule
from astrai.train.sft_module import SFTModule


# -- NEFTune -------------------------------------------------------------------------------------
def test_neftune_adds_uniform_noise_of_the_paper_scale_in_training_only(model_config_json):
    alpha, batch, seq, dim = 5.0, 4, 64, 32
    module = SFTModule(model=model_config_json, neftune_alpha=alpha, export={"on_fit_end": False})
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
    plain = SFTModule(model=model_config_json, export={"on_fit_end": False})
    plain.model.load_state_dict(module.model.state_dict())
    plain.eval()
    torch.testing.assert_close(module(ids), plain(ids), rtol=0, atol=0)


def test_neftune_leaves_validation_unchanged(tmp_path, model_config_json):
    module = SFTModule(model=model_config_json, neftune_alpha=10.0, export={"on_fit_end": False})
    plain = SFTModule(model=model_config_json, export={"on_fit_end": False})
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
    module = PretrainModule(model=model_config_json, compile=True, compile_mode=mode)
    calls = []
    monkeypatch.setattr(module.model, "compile", lambda **kwargs: calls.append(kwargs))
    module.configure_model()
    module.configure_model()  # Lightning may call it again: compiled once
    assert calls == [{"mode": mode}]


def test_compile_mode_is_checked(model_config_json):
    with pytest.raises(AstraiError, match="model.compile_mode must be one of .*'max-autotune-no-cudagraphs'"):
        PretrainModule(model=model_config_json, compile=True, compile_mode="fast")
    with pytest.raises(AstraiError, match="model.compile_mode is 'max-autotune' but model.compile is false"):
        PretrainModule(model=model_config_json, compile_mode="max-autotune")


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


# -- adapter-only LoRA save / load ---------------------------------------------------------------
def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(10, vocab, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, chat_model_dir):
    """A LoRA run on chat_model_dir that saved its adapter alone, and the run's own logits."""
    root = tmp_path_factory.mktemp("adapter_run")
    module = PretrainModule(
        model=str(chat_model_dir),
        lora={"rank": 4, "alpha": 8.0, "targets": ["all-linear"]},
        optimizer={"lr": 2e-2},
        export={"adapter": True},
    )
    vocab = module.config.vocab_size
    make_trainer(root, max_steps=3).fit(module, DataLoader(CycleBatches(8, 16, vocab=vocab), batch_size=4))
    module.eval()
    with torch.no_grad():
        logits = module.model(_ids(vocab))
    return root, module, logits


def test_adapter_alone_is_saved_in_peft_layout(trained_adapter, chat_model_dir):
    root, module, _ = trained_adapter
    adapter = root / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == "all-linear"
    assert config["base_model_name_or_path"] == str(Path(chat_model_dir).resolve())
    saved = load_file(str(adapter / ADAPTER_WEIGHTS))
    layers = {n: m for n, m in module.model.named_modules() if isinstance(m, LoRALinear)}
    assert set(saved) == {f"base_model.model.{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    for name, layer in layers.items():  # just the adapters, as trained
        assert torch.equal(saved[f"base_model.model.{name}.lora_A.weight"], layer.lora_A.detach())
        assert torch.equal(saved[f"base_model.model.{name}.lora_B.weight"], layer.lora_B.detach())
    assert any(t.abs().sum() > 0 for k, t in saved.items() if k.endswith("lora_B.weight"))  # it trained


def test_adapter_loads_onto_the_base_directory_with_equal_logits(trained_adapter, chat_model_dir, tmp_path):
    root, module, expected = trained_adapter
    ids = _ids(module.config.vocab_size)
    loaded = load_adapter_model(chat_model_dir, root / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), expected, rtol=0, atol=0)
        merged = load_adapter_model(chat_model_dir, root / "adapter", merge=True)
        torch.testing.assert_close(merged(ids), expected, rtol=1e-5, atol=1e-5)
        # the run's merged export is the same model
        export = AutoModel.from_pretrained(str(root / "export")).eval()
        torch.testing.assert_close(export(ids), merged(ids), rtol=1e-6, atol=1e-6)
        # the command-line merge writes a model directory with the base's tokenizer
        assert adapter_main(["merge", str(chat_model_dir), str(root / "adapter"), str(tmp_path / "merged")]) == 0
        assert (tmp_path / "merged" / "tokenizer.json").is_file()
        again = AutoModel.from_pretrained(str(tmp_path / "merged")).eval()
        torch.testing.assert_close(again(ids), merged(ids), rtol=0, atol=0)
    # a training module started from the adapter (model.adapter) continues from it
    resumed = PretrainModule(
        model=str(chat_model_dir), adapter=str(root / "adapter"), export={"on_fit_end": False}
    ).eval()
    assert resumed.lora_config == LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=["all-linear"])
    with torch.no_grad():
        torch.testing.assert_close(resumed.model(ids), expected, rtol=0, atol=0)
    assert {n for n, p in resumed.model.named_parameters() if p.requires_grad} == {
        n for n, p in module.model.named_parameters() if p.requires_grad
    }


def test_adapter_loads_in_peft_onto_the_transformers_base(trained_adapter, chat_model_dir):
    """The saved adapter is a PEFT LoRA adapter: PEFT puts it on the base in transformers."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root, module, expected = trained_adapter
    base = transformers.AutoModelForCausalLM.from_pretrained(str(chat_model_dir), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(root / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_ids(module.config.vocab_size)).logits, expected, rtol=1e-4, atol=1e-4)


def test_adapter_mismatches_are_named(trained_adapter, chat_model_dir, tmp_path, model_config_json):
    root, _, _ = trained_adapter
    adapter = str(root / "adapter")
    with pytest.raises(AstraiError, match=r"model.lora differs from the config of model.adapter .* \['rank'\]"):
        PretrainModule(
            model=str(chat_model_dir), adapter=adapter, lora={"rank": 8, "alpha": 8.0, "targets": ["all-linear"]}
        )
    with pytest.raises(AstraiError, match="model.export.adapter needs LoRA adapters"):
        PretrainModule(model=model_config_json, export={"adapter": True})
    other = PretrainModule(model={**json.loads(Path(model_config_json).read_text()), "dim": 48, "n_heads": 4})
    with pytest.raises(AstraiError, match=r"q_proj.lora_A.weight has shape \(4, 32\), the model expects \(4, 48\)"):
        load_adapter(other.model, adapter)
    bad = tmp_path / "rslora"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / ADAPTER_CONFIG).read_text())
    (bad / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_rslora": True}))
    with pytest.raises(AstraiError, match="field 'use_rslora' is true"):
        read_adapter_config(bad)
    (bad / ADAPTER_CONFIG).write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    with pytest.raises(AstraiError, match="does not fit this model: .* keys the model has no adapter for"):
        load_adapter(PretrainModule(model=str(chat_model_dir)).model, bad)
    with pytest.raises(AstraiError, match="holds no adapter_config.json"):
        read_adapter_config(tmp_path)


# -- gradient SNR --------------------------------------------------------------------------------
def test_grad_snr_is_mean_squared_over_variance_of_the_micro_batch_gradients(tmp_path, model_config_json):
    module = PretrainModule(
        model=model_config_json, log_grad_snr=True, optimizer={"lr": 1e-3}, export={"on_fit_end": False}
    )
    initial = copy.deepcopy(module.model.state_dict())
    loader = DataLoader(CycleBatches(12, 16, seed=3), batch_size=4)  # three micro-batches, in order
    trainer = make_trainer(tmp_path, max_steps=1, accumulate_grad_batches=3)
    trainer.fit(module, loader)
    logged = trainer.callback_metrics

    # Each micro-batch's own gradient, from a copy of the initial model.
    ref = PretrainModule(model=model_config_json)
    ref.model.load_state_dict(initial)
    named = dict(ref.model.named_parameters())
    grads = [torch.autograd.grad(ref.compute_loss(b, "train")[1].loss, list(named.values())) for b in loader]
    stacked = {n: torch.stack([g[i] for g in grads]).double() for i, n in enumerate(named)}  # (N, *shape)
    groups = {  # build_optimizer's AdamW groups: weight decay on matrices only
        "decay": [n for n, p in named.items() if p.ndim >= 2],
        "no_decay": [n for n, p in named.items() if p.ndim < 2],
    }
    signal = noise = 0.0
    for group, names in groups.items():
        mean_sq = sum((stacked[n].mean(0) ** 2).sum() for n in names)
        var = sum(stacked[n].var(0, correction=1).sum() for n in names)
        assert logged[f"train/grad_snr/{group}"].item() == pytest.approx((mean_sq / var).item(), rel=1e-4)
        signal, noise = signal + mean_sq, noise + var
    assert logged["train/grad_snr"].item() == pytest.approx((signal / noise).item(), rel=1e-4)


def test_grad_snr_needs_several_micro_batches(tmp_path, model_config_json):
    module = PretrainModule(model=model_config_json, log_grad_snr=True, export={"on_fit_end": False})
    with pytest.raises(AstraiError, match="model.log_grad_snr .* set trainer.accumulate_grad_batches >= 2"):
        make_trainer(tmp_path, max_steps=1).fit(module, DataLoader(CycleBatches(4, 16), batch_size=4))


# -- MoE router load ---------------------------------------------------------------------------------
MOE = {
    "vocab_size": 320,
    **TINY_MODEL,
    "init_std": 0.2,
    "ffn_type": "moe",
    "n_routed_experts": 4,
    "n_activated_experts": 2,
    "n_shared_experts": 0,
}


def _padded_rows(n: int = 4, seq: int = 16, pad: int = 5) -> list[dict]:
    rows = []
    for i, row in enumerate(CycleBatches(n, seq, seed=1).rows):
        mask = torch.ones(seq, dtype=torch.long)
        mask[seq - pad * (i % 2) :] = 0  # every other row ends in padding
        labels = row["labels"].masked_fill(mask == 0, -100)
        rows.append({"input_ids": row["input_ids"], "labels": labels, "attention_mask": mask})
    return rows


def test_router_load_matches_the_routers_choices(tmp_path):
    module = PretrainModule(model=MOE, log_router_load=True, export={"on_fit_end": False})
    initial = copy.deepcopy(module.model.state_dict())
    rows = _padded_rows()
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(module, DataLoader(rows, batch_size=4))
    logged = trainer.callback_metrics

    # The routers' inputs in the same forward of a copy of the initial model.
    ref = PretrainModule(model=MOE)
    ref.model.load_state_dict(initial)
    inputs = {}
    for name, m in ref.model.named_modules():
        if isinstance(m, MoE):
            m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0]))
    batch = next(iter(DataLoader(rows, batch_size=4)))
    ref.model.train()
    ref.model(batch["input_ids"], attention_mask=batch["attention_mask"])
    valid = batch["attention_mask"].reshape(-1) != 0
    assert len(inputs) == 2
    for name, x in inputs.items():
        layer = int(name.split(".")[2])
        gate = ref.model.get_submodule(name).gate
        probs = F.linear(x.reshape(-1, x.shape[-1]), gate.weight).float().softmax(-1)[valid]
        chosen = probs.topk(2, dim=-1).indices
        fractions = torch.tensor([(chosen == e).sum().item() for e in range(4)], dtype=torch.float64)
        fractions /= chosen.numel()
        cv = fractions.std(correction=0) / fractions.mean()
        balance = 4 * (fractions * probs.double().mean(0)).sum()
        for e in range(4):
            assert logged[f"train/router/layer{layer}/expert{e}"].item() == pytest.approx(fractions[e].item(), abs=1e-6)
        assert logged[f"train/router/layer{layer}/cv"].item() == pytest.approx(cv.item(), rel=1e-5)
        assert logged[f"train/router/layer{layer}/balance"].item() == pytest.approx(balance.item(), rel=1e-5)
        # the balance term is the layer's own auxiliary loss (before moe_aux_loss_coef)
        assert ref.model.get_submodule(name).aux_loss.item() == pytest.approx(balance.item(), rel=1e-5)

    # validation forwards leave the numbers alone
    before = {k: v.clone() for k, v in module._router_load.metrics().items()}
    module.eval()
    with torch.no_grad():
        module(torch.randint(10, 300, (2, 16)))
    assert all(torch.equal(before[k], v) for k, v in module._router_load.metrics().items())


def test_router_load_needs_an_moe_model(model_config_json):
    with pytest.raises(AstraiError, match="model.log_router_load is set but the model has no MoE layers"):
        PretrainModule(model=model_config_json, log_router_load=True)
