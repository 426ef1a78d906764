"""The Lightning modules: real fits on CPU, loss definitions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from train_helpers import TINY_MODEL, CycleBatches, make_trainer

from astrai.core.auto import AutoModel
from astrai.core.tokenizer import AutoTokenizer
from astrai.train.base_module import BatchError
from astrai.train.dpo_module import DPOModule
from astrai.train.losses import IGNORE_INDEX
from astrai.train.metrics import Throughput, flops_per_token
from astrai.train.pretrain_module import PretrainModule
from astrai.train.sft_module import SFTModule


def _val_metrics(trainer, module, loader) -> dict[str, float]:
    (metrics,) = trainer.validate(module, loader, verbose=False)
    return metrics


def _log64(logits_row: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits_row.double(), -1)


# -- pre-training ---------------------------------------------------------------------------
def test_pretrain_module_learns_and_logs(tmp_path, tokenizer_dir, model_config_json):
    module = PretrainModule(
        model=model_config_json,
        tokenizer=tokenizer_dir,
        peak_flops=1e12,
        optimizer={"lr": 1e-2},
        schedule={"warmup_steps": 2},
        export={"on_fit_end": False},
    )
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert module.config.vocab_size == tok.vocab_size  # taken from the tokenizer, not the JSON
    assert module.config.eos_token_id == tok.eos_token_id
    train = DataLoader(CycleBatches(16, 16), batch_size=4, shuffle=True)
    val = DataLoader(CycleBatches(8, 16, seed=0), batch_size=4)
    trainer = make_trainer(tmp_path, max_steps=20)
    before = _val_metrics(trainer, module, val)
    trainer.fit(module, train)
    logged = dict(trainer.callback_metrics)
    after = _val_metrics(trainer, module, val)
    assert after["val/loss"] < 0.3 * before["val/loss"]
    assert after["val/ppl"] == pytest.approx(math.exp(after["val/loss"]), rel=1e-4)
    for key in ("train/loss", "train/ppl", "train/lr", "train/tokens_per_sec", "train/mfu"):
        assert key in logged, key
    assert logged["train/tokens_per_sec"] > 0 and 0 < logged["train/mfu"] < 1


def test_flops_per_token_counts_matmuls_and_attention(tokenizer_dir, model_config_json):
    module = PretrainModule(model=model_config_json, tokenizer=tokenizer_dir)
    c = module.config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_layer = c.dim * q + 2 * c.dim * kv + q * c.dim + 3 * c.dim * c.ffn_dim
    matmul = c.n_layers * per_layer + c.dim * c.vocab_size  # lm_head; the embedding lookup is free
    attention = 12 * c.n_layers * c.n_heads * c.head_dim * 64
    assert flops_per_token(module.model, c, 64) == 6 * matmul + attention


def test_moe_flops_count_only_the_activated_experts(tokenizer_dir):
    dense = PretrainModule(
        model={**TINY_MODEL, "ffn_type": "moe", "n_routed_experts": 4, "n_activated_experts": 1, "n_shared_experts": 0},
        tokenizer=tokenizer_dir,
    )
    wide = PretrainModule(
        model={**TINY_MODEL, "ffn_type": "moe", "n_routed_experts": 8, "n_activated_experts": 1, "n_shared_experts": 0},
        tokenizer=tokenizer_dir,
    )
    assert wide.model.num_parameters() > dense.model.num_parameters()
    # twice the experts, same number activated: only the router grows
    router_growth = 6 * TINY_MODEL["n_layers"] * TINY_MODEL["dim"] * 4
    assert flops_per_token(wide.model, wide.config, 8) - flops_per_token(dense.model, dense.config, 8) == router_growth


def test_throughput_ignores_the_first_step():
    meter = Throughput(window=3)
    assert meter.update(100, now=0.0) is None  # startup: nothing to measure yet
    assert meter.update(100, now=10.0) == pytest.approx(10.0)
    assert meter.update(100, now=11.0) == pytest.approx(200 / 11)
    meter.update(100, now=12.0)
    assert meter.update(100, now=13.0) == pytest.approx(300 / 3)  # window slides


def test_moe_model_trains_with_the_balance_loss(tmp_path, tokenizer_dir):
    cfg = {**TINY_MODEL, "ffn_type": "moe", "n_routed_experts": 4, "n_activated_experts": 2, "moe_ffn_dim": 32}
    module = PretrainModule(model=cfg, tokenizer=tokenizer_dir, optimizer={"lr": 1e-2}, export={"on_fit_end": False})
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.fit(module, DataLoader(CycleBatches(8, 16), batch_size=4))
    assert trainer.callback_metrics["train/aux_loss"] > 0


def test_muon_and_sgdr_train_the_model(tmp_path, tokenizer_dir, model_config_json):
    module = PretrainModule(
        model=model_config_json,
        tokenizer=tokenizer_dir,
        optimizer={"name": "muon", "lr": 2e-2},
        schedule={"name": "sgdr", "cycle_steps": 5, "min_lr_ratio": 0.0},
        export={"on_fit_end": False},
    )
    val = DataLoader(CycleBatches(8, 16), batch_size=4)
    trainer = make_trainer(tmp_path, max_steps=20)
    before = _val_metrics(trainer, module, val)["val/loss"]
    trainer.fit(module, DataLoader(CycleBatches(16, 16), batch_size=4, shuffle=True))
    assert _val_metrics(trainer, module, val)["val/loss"] < 0.5 * before
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(2e-2)  # step 20: a restart


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer_dir, model_config_json):
    batch = next(iter(DataLoader(CycleBatches(4, 12), batch_size=4)))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = PretrainModule(model=model_config_json, tokenizer=tokenizer_dir, gradient_checkpointing=checkpointing)
        module.train()
        module.compute_loss(batch, "train")[1].loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


# -- SFT ----------------------------------------------------------------------------------------
def _sft_module(tokenizer_dir, **kw):
    torch.manual_seed(0)
    return SFTModule(model={**TINY_MODEL, "init_std": 0.2}, tokenizer=tokenizer_dir, **kw)


def test_sft_loss_covers_labelled_tokens_and_packing_keeps_samples_apart(tokenizer_dir):
    """Two conversations packed in one row, and the same two padded into two rows, give the
    loss computed by hand from running each conversation on its own."""
    module = _sft_module(tokenizer_dir).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(10, 300, (5,), generator=g), torch.randint(10, 300, (7,), generator=g)
    # labels: -100 on the "prompt" part of each sample
    la = torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 11, 12, 13])
    lb = torch.tensor([IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 21, 22, 23, 24])

    # by hand: each sample alone, float64 log-softmax at its labelled positions
    nll = []
    for ids, labels in ((a, la), (b, lb)):
        logits = module.model(ids[None])[0]
        nll += [-_log64(logits[t])[int(y)] for t, y in enumerate(labels) if y != IGNORE_INDEX]
    expected = torch.stack(nll).mean()

    packed = {
        "input_ids": torch.cat([a, b])[None],
        "labels": torch.cat([la, lb])[None],
        "position_ids": torch.cat([torch.arange(5), torch.arange(7)])[None],
    }
    pad = 2
    padded = {
        "input_ids": torch.stack([torch.cat([a, torch.full((2,), pad)]), b]),
        "labels": torch.stack([torch.cat([la, torch.full((2,), IGNORE_INDEX)]), lb]),
        "attention_mask": torch.tensor([[1] * 5 + [0] * 2, [1] * 7]),
    }
    with torch.no_grad():
        for batch in (packed, padded):
            _, out = module.compute_loss(batch, "val")
            assert int(out.n_tokens) == 7
            assert out.loss.double().item() == pytest.approx(expected.item(), rel=1e-5)
        # the second packed sample sees nothing of the first
        logits = module(packed["input_ids"], packed["position_ids"])
        torch.testing.assert_close(logits[0, 5:], module.model(b[None])[0], rtol=1e-5, atol=1e-5)


class MaskedCycle(Dataset):
    """Cycle rows whose first half is "prompt" (label -100) and second half "reply"."""

    def __init__(self, n_rows=16, seq_len=16):
        self.rows = CycleBatches(n_rows, seq_len).rows
        for row in self.rows:
            row["labels"] = row["labels"].clone()
            row["labels"][: seq_len // 2] = IGNORE_INDEX

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_sft_fit_raises_reply_accuracy(tmp_path, tokenizer_dir):
    module = _sft_module(tokenizer_dir, optimizer={"lr": 1e-2}, export={"on_fit_end": False})
    val = DataLoader(MaskedCycle(8), batch_size=4)
    trainer = make_trainer(tmp_path, max_steps=30)
    before = _val_metrics(trainer, module, val)
    trainer.fit(module, DataLoader(MaskedCycle(16), batch_size=4, shuffle=True))
    assert "train/acc" in trainer.callback_metrics
    after = _val_metrics(trainer, module, val)
    assert before["val/acc"] < 0.5 and after["val/acc"] > 0.95
    assert after["val/loss"] < before["val/loss"]


def test_sft_stops_on_a_batch_without_assistant_tokens(tmp_path, tokenizer_dir):
    ds = MaskedCycle(4)
    for row in ds.rows:
        row["labels"][:] = IGNORE_INDEX
    with pytest.raises(BatchError, match="no assistant tokens"):
        make_trainer(tmp_path, max_steps=1).fit(_sft_module(tokenizer_dir), DataLoader(ds, batch_size=2))


def test_batch_contract_violations_are_named(tokenizer_dir):
    module = _sft_module(tokenizer_dir)
    ids = torch.randint(10, 50, (2, 6))
    with pytest.raises(BatchError, match=r"missing \['labels'\]"):
        module.compute_loss({"input_ids": ids}, "train")
    with pytest.raises(BatchError, match=r"batch\['labels'\] has shape \(2, 5\)"):
        module.compute_loss({"input_ids": ids, "labels": ids[:, :5]}, "train")
    bad = ids.clone()
    bad[1, 3] = 5000
    with pytest.raises(BatchError, match="token id 5000, outside the model's vocabulary"):
        module.compute_loss({"input_ids": bad, "labels": ids}, "val")


def test_model_source_errors_name_the_field(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="model: '/nowhere' is neither a model directory"):
        PretrainModule(model="/nowhere", tokenizer=tokenizer_dir)
    with pytest.raises(ValueError, match="model.tokenizer"):
        PretrainModule(model=TINY_MODEL, tokenizer=str(tmp_path))
    small = AutoModel.from_config({**TINY_MODEL, "vocab_size": 100})
    AutoModel.save_pretrained(small, tmp_path / "small")
    with pytest.raises(ValueError, match="tokenizer has 320 tokens but the model .* embeds only 100"):
        PretrainModule(model=str(tmp_path / "small"), tokenizer=tokenizer_dir)


def test_start_from_a_model_directory(tmp_path, tokenizer_dir):
    source = AutoModel.from_config({**TINY_MODEL, "vocab_size": 320})
    AutoModel.save_pretrained(source, tmp_path / "m", tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir))
    module = SFTModule(model=str(tmp_path / "m"))
    assert module.hparams.tokenizer == str(tmp_path / "m")  # the directory's own tokenizer
    assert module.model.training
    ids = torch.randint(0, 320, (1, 8))
    torch.testing.assert_close(module(ids), source(ids))


def test_start_from_a_hugging_face_directory(tmp_path, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "llama")
    module = SFTModule(model=str(tmp_path / "llama"), tokenizer=tokenizer_dir).eval()
    ids = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(module(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


# -- DPO ------------------------------------------------------------------------------------------
class Preferences(Dataset):
    """A prompt (labels -100), then a chosen reply that continues the prompt's cycle and a
    rejected reply of other tokens; rejected rows are shorter to exercise the padding."""

    def __init__(self, n_rows=16, prompt_len=6, reply_len=6):
        g = torch.Generator().manual_seed(0)
        cycle = torch.arange(20, 27)
        self.rows = []
        for i in range(n_rows):
            seq = cycle[(torch.arange(prompt_len + reply_len + 1) + i) % 7]
            bad = torch.randint(100, 300, (reply_len - 2,), generator=g)
            row = {}
            for side, full in (("chosen", seq), ("rejected", torch.cat([seq[: prompt_len + 1], bad]))):
                ids, labels = full[:-1].clone(), full[1:].clone()
                labels[:prompt_len] = IGNORE_INDEX
                row[f"{side}_input_ids"], row[f"{side}_labels"] = ids, labels
            self.rows.append(row)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate_pairs(rows):
    out = {}
    for side in ("chosen", "rejected"):
        length = max(len(r[f"{side}_input_ids"]) for r in rows)
        for key, fill in (("input_ids", 2), ("labels", IGNORE_INDEX)):
            out[f"{side}_{key}"] = torch.stack(
                [torch.cat([r[f"{side}_{key}"], torch.full((length - len(r[f"{side}_{key}"]),), fill)]) for r in rows]
            )
        out[f"{side}_attention_mask"] = torch.stack(
            [
                torch.cat(
                    [torch.ones(len(r[f"{side}_input_ids"])), torch.zeros(length - len(r[f"{side}_input_ids"]))]
                ).long()
                for r in rows
            ]
        )
    return out


def _pairs(n=16, batch_size=4, shuffle=False):
    return DataLoader(Preferences(n), batch_size=batch_size, collate_fn=collate_pairs, shuffle=shuffle)


def _dpo(tokenizer_dir, **kw):
    torch.manual_seed(0)
    return DPOModule(model={**TINY_MODEL, "init_std": 0.2}, tokenizer=tokenizer_dir, export={"on_fit_end": False}, **kw)


def _logps64(model, ids, labels) -> float:
    logits = model(ids[None])[0]
    return sum(_log64(logits[t])[int(y)].item() for t, y in enumerate(labels) if y != IGNORE_INDEX)


@pytest.mark.filterwarnings("ignore:.*reference is not registered")
@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_module_loss_matches_float64_formula(tokenizer_dir, loss_type, smoothing):
    module = _dpo(tokenizer_dir, beta=0.5, loss_type=loss_type, label_smoothing=smoothing).eval()
    with torch.no_grad():  # move the policy away from its reference
        for p in module.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = next(iter(_pairs(4)))
    with torch.no_grad():
        got = module._step(batch, "val").item()
    expected = []
    for i in range(4):
        side = {}
        for s in ("chosen", "rejected"):
            n = int(batch[f"{s}_attention_mask"][i].sum())
            ids, labels = batch[f"{s}_input_ids"][i, :n], batch[f"{s}_labels"][i, :n]
            side[s] = (_logps64(module.model, ids, labels), _logps64(module.ref_model, ids, labels))
        h = (side["chosen"][0] - side["chosen"][1]) - (side["rejected"][0] - side["rejected"][1])
        if loss_type == "ipo":
            expected.append((h - 1 / (2 * 0.5)) ** 2)
        else:
            ls = lambda x: -math.log1p(math.exp(-x))  # noqa: E731  log sigmoid
            expected.append(-(1 - smoothing) * ls(0.5 * h) - smoothing * ls(-0.5 * h))
    assert got == pytest.approx(sum(expected) / 4, rel=1e-4)


@pytest.mark.filterwarnings("ignore:.*reference is not registered")
def test_dpo_rpo_alpha_adds_the_chosen_replies_mean_token_nll_and_logs_which_reply_the_policy_prefers(
    tmp_path, tokenizer_dir
):
    plain = _dpo(tokenizer_dir, beta=0.5).eval()
    rpo = _dpo(tokenizer_dir, beta=0.5, rpo_alpha=0.7).eval()
    with torch.no_grad():
        for p, q in zip(plain.model.parameters(), rpo.model.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
            q.copy_(p)
    batch = next(iter(_pairs(4)))
    with torch.no_grad():
        dpo_only = plain._step(batch, "val").item()
        got = rpo._step(batch, "val").item()
    chosen_logps, rejected_logps, tokens = [], [], 0
    for i in range(4):
        for s, out in (("chosen", chosen_logps), ("rejected", rejected_logps)):
            n = int(batch[f"{s}_attention_mask"][i].sum())
            ids, labels = batch[f"{s}_input_ids"][i, :n], batch[f"{s}_labels"][i, :n]
            out.append(_logps64(rpo.model, ids, labels))
            tokens += int((labels != IGNORE_INDEX).sum()) if s == "chosen" else 0
    assert got == pytest.approx(dpo_only + 0.7 * -sum(chosen_logps) / tokens, rel=1e-4)
    likelier = sum(c > r for c, r in zip(chosen_logps, rejected_logps)) / 4
    trainer = make_trainer(tmp_path)
    logged = _val_metrics(trainer, rpo, _pairs(4))
    assert logged["val/chosen_likelier"] == pytest.approx(likelier)
    assert logged["val/nll"] == pytest.approx(-sum(chosen_logps) / tokens, rel=1e-4)
    with pytest.raises(ValueError, match="rpo_alpha must be >= 0"):
        _dpo(tokenizer_dir, rpo_alpha=-1.0)


def test_dpo_fit_learns_the_preference(tmp_path, tokenizer_dir):
    module = _dpo(tokenizer_dir, beta=0.1, optimizer={"lr": 5e-3})
    trainer = make_trainer(tmp_path, max_steps=20)
    before = _val_metrics(trainer, module, _pairs(8))
    assert before["val/loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference
    trainer.fit(module, _pairs(16, shuffle=True))
    after = _val_metrics(trainer, module, _pairs(8))
    assert after["val/reward_acc"] == 1.0 and after["val/margin"] > 0.5
    assert after["val/loss"] < 0.5 * math.log(2)
    # the reference stayed frozen at the initial policy
    fresh = _dpo(tokenizer_dir)
    for (name, p), q in zip(module.ref_model.named_parameters(), fresh.model.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_dpo_with_lora_uses_the_policy_without_adapters(tmp_path, tokenizer_dir):
    module = _dpo(tokenizer_dir, lora={"rank": 4, "alpha": 8, "targets": ["all-linear"]}, optimizer={"lr": 1e-2})
    assert module.ref_model is None
    base = _dpo(tokenizer_dir).model.eval()
    trainer = make_trainer(tmp_path, max_steps=10)
    trainer.fit(module, _pairs(16, shuffle=True))
    assert trainer.callback_metrics["train/reward_acc"] > 0.5
    batch = next(iter(_pairs(4)))
    module.eval()
    ref_chosen, _ = module.reference_logps(batch)
    for i in range(4):
        n = int(batch["chosen_attention_mask"][i].sum())
        expected = _logps64(base, batch["chosen_input_ids"][i, :n], batch["chosen_labels"][i, :n])
        assert ref_chosen[i].item() == pytest.approx(expected, rel=1e-4)


def test_dpo_uses_precomputed_reference_logps(tokenizer_dir):
    batch = next(iter(_pairs(4)))
    batch["ref_chosen_logps"] = torch.full((4,), -3.0, dtype=torch.float64)
    batch["ref_rejected_logps"] = torch.full((4,), -1.0, dtype=torch.float64)
    module = _dpo(tokenizer_dir, precomputed_reference=True).eval()
    assert module.ref_model is None
    chosen, rejected = module.reference_logps(batch)
    assert chosen.tolist() == [-3.0] * 4 and rejected.tolist() == [-1.0] * 4
    del batch["ref_chosen_logps"]
    with pytest.raises(BatchError, match="ref_chosen_logps"):
        module.reference_logps(batch)


def test_dpo_checkpoints_leave_out_a_reference_read_from_disk(tmp_path, tokenizer_dir):
    sft = _dpo(tokenizer_dir).model
    AutoModel.save_pretrained(sft, tmp_path / "sft", tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir))
    from_disk = DPOModule(model=str(tmp_path / "sft"), optimizer={"lr": 1e-2}, export={"on_fit_end": False})
    from_config = _dpo(tokenizer_dir, optimizer={"lr": 1e-2})
    for name, module in (("disk", from_disk), ("config", from_config)):
        trainer = make_trainer(tmp_path / name, max_steps=3)
        trainer.fit(module, _pairs(8))
        trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
        state = torch.load(tmp_path / f"{name}.ckpt", weights_only=False)["state_dict"]
        # a reference on disk is read again on load; a copy of a random init must be saved
        assert any(k.startswith("ref_model.") for k in state) == (name == "config")
        restored = DPOModule.load_from_checkpoint(tmp_path / f"{name}.ckpt")
        for (key, p), q in zip(restored.model.named_parameters(), module.model.parameters()):
            torch.testing.assert_close(p, q, msg=key)
        for (key, p), q in zip(restored.ref_model.named_parameters(), sft.parameters()):
            torch.testing.assert_close(p, q, msg=key)


def test_dpo_settings_are_checked(tokenizer_dir):
    with pytest.raises(ValueError, match="loss_type"):
        _dpo(tokenizer_dir, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        _dpo(tokenizer_dir, beta=-1.0)


# Inductor compiles C++ on a CPU, over a minute on two cores: run it where compiling is fast.
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch.compile is exercised on CUDA only (CPU build too slow)"
)
def test_compiled_module_trains_and_keeps_parameter_names(tmp_path, tokenizer_dir, model_config_json):
    module = PretrainModule(
        model=model_config_json,
        tokenizer=tokenizer_dir,
        compile=True,
        optimizer={"lr": 1e-2},
        export={"on_fit_end": False},
    )
    names = set(module.state_dict())
    trainer = make_trainer(tmp_path, max_steps=3, accelerator="gpu")
    trainer.fit(module, DataLoader(CycleBatches(8, 16), batch_size=4))
    assert module.model._compiled_call_impl is not None
    assert set(module.state_dict()) == names
