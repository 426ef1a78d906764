"""OnlineDPOModule on a CPU: real Lightning fits of a tiny model whose replies the engine samples,
the pairs ranked by the reward (checked against the reward recomputed here), the DPO loss equal
to a float64 computation written here, a batch of ties skipped, settings and YAML typos named
by their field, and `--ckpt_path=last` resuming through the shipped config exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from data_helpers import word_tokenizer, write_jsonl
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from train_helpers import TINY_MODEL, make_trainer

from astrai.train.data.grpo import GRPODataModule
from astrai.train.online_dpo_module import OnlineDPOModule, rank_pairs
from astrai.train.rewards import answer_match

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["what is one", "what is two", "what is three", "hi", "yo", "what is a", "what is b", "what is c"]
ANSWER = [{"fn": "astrai.train.rewards.answer_match"}]


@pytest.fixture
def word_tok(tmp_path):
    return word_tokenizer(tmp_path / "tok")


def prompt_data(tmp_path, tok, batch_size=4) -> GRPODataModule:
    """Prompts whose reward is 1 when the reply contains the word 'good' (a word of the vocabulary)."""
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "answer": "good"} for p in PROMPTS])
    return GRPODataModule(
        tok, path, val=path, batch_size=batch_size, val_batch_size=len(PROMPTS), cache_dir=str(tmp_path / "cache")
    )


def module(tok, **kwargs) -> OnlineDPOModule:
    torch.manual_seed(0)
    options = dict(
        model={**TINY_MODEL, "max_len": 64},
        tokenizer=tok,
        rewards=ANSWER,
        num_generations=6,
        max_new_tokens=4,
        beta=0.5,
        optimizer={"lr": 1e-2, "weight_decay": 0.0},
        schedule={"name": "constant"},
        export={"on_fit_end": False},
        val_temperature=1.0,
        val_samples=8,
    )
    options.update(kwargs)
    return OnlineDPOModule(**options)


class RecordPairs(Callback):
    """Keeps every step's pairs, the policy as it was before the step (float64), and the step's loss."""

    def __init__(self):
        self.steps: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.policy = copy.deepcopy(pl_module.model).double().eval()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = None if outputs is None else outputs["loss"].detach()
        self.steps.append((pl_module.last_pairs, self.policy, loss))


def float64_logps(model, ids, labels, mask) -> torch.Tensor:
    logp = F.log_softmax(model(ids, attention_mask=mask).double(), dim=-1)
    keep = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1)


def float64_dpo_loss(policy, reference, batch, beta) -> torch.Tensor:
    """-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))), averaged over the pairs."""
    with torch.no_grad():
        sides = {
            s: [batch[f"{s}_{k}"] for k in ("input_ids", "labels", "attention_mask")] for s in ("chosen", "rejected")
        }
        h = (float64_logps(policy, *sides["chosen"]) - float64_logps(reference, *sides["chosen"])) - (
            float64_logps(policy, *sides["rejected"]) - float64_logps(reference, *sides["rejected"])
        )
    return -F.logsigmoid(beta * h).mean()


def test_rank_pairs_takes_best_against_worst_and_skips_ties():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.3, 0.0, 0.9])
    groups = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert rank_pairs(rewards, groups) == ([1, 8], [0, 7])  # first of equals; group 1 tied
    assert rank_pairs(rewards, groups, min_gap=0.95) == ([1], [0])


def test_pairs_are_ranked_by_the_reward_and_the_loss_is_dpo_in_float64(tmp_path, word_tok):
    m = module(word_tok)
    reference = copy.deepcopy(m.model).double().eval()
    record = RecordPairs()
    trainer = make_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[record])
    trainer.fit(m, prompt_data(tmp_path, word_tok))
    assert trainer.global_step == 4 and len(record.steps) == 4
    trained_pairs = 0
    for pairs, policy, loss in record.steps:
        rows = [{"answer": "good"}] * len(pairs.rollout.texts)
        recomputed = torch.tensor([answer_match(None, t, r) for t, r in zip(pairs.rollout.texts, rows)])
        torch.testing.assert_close(pairs.rewards.float(), recomputed)
        groups = torch.tensor(pairs.rollout.group_ids)
        for c, r in zip(pairs.chosen, pairs.rejected):
            assert groups[c] == groups[r]
            assert recomputed[c] > recomputed[r]
            assert recomputed[c] == recomputed[groups == groups[c]].max()
            assert recomputed[r] == recomputed[groups == groups[r]].min()
        paired = {pairs.rollout.group_ids[c] for c in pairs.chosen}
        for g in set(pairs.rollout.group_ids) - paired:  # a prompt without a pair had only ties
            assert recomputed[groups == g].unique().numel() == 1
        if pairs.batch is None:
            assert loss is None
            continue
        trained_pairs += len(pairs.chosen)
        # The DPO batch holds exactly the ranked replies, as labels after their prompts.
        for side in ("chosen", "rejected"):
            labels = pairs.batch[f"{side}_labels"]
            for row, reply in enumerate(getattr(pairs, side)):
                assert labels[row][labels[row] != -100].tolist() == pairs.rollout.completion_ids[reply]
        expected = float64_dpo_loss(policy, reference, pairs.batch, beta=0.5)
        torch.testing.assert_close(loss.double(), expected, rtol=0, atol=1e-5)
    assert trained_pairs >= 4
    assert record.steps[0][2] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)  # policy = reference
    assert abs(record.steps[-1][2].item() - 0.6931) > 1e-3  # the policy moved away from the reference


@pytest.mark.slow
def test_online_dpo_raises_the_reward_of_a_toy_task(tmp_path, word_tok):
    """Sampled replies to the same prompts with the same seeds, before and after 20 steps."""
    m = module(word_tok)
    data = prompt_data(tmp_path, word_tok)
    trainer = make_trainer(tmp_path, max_steps=20, limit_val_batches=1, check_val_every_n_epoch=1000)
    before = trainer.validate(m, data, verbose=False)[0]["val/reward"]
    trainer.fit(m, data)
    metrics = dict(trainer.callback_metrics)
    after = trainer.validate(m, data, verbose=False)[0]["val/reward"]
    for key in ("train/reward", "train/reward_gap", "train/tied_prompts", "train/reward_acc", "train/margin"):
        assert key in metrics, key
    assert before < 0.4 and after > before + 0.3


def test_a_batch_of_ties_skips_its_optimizer_step(tmp_path, word_tok):
    never = [{"fn": "astrai.train.rewards.format_match", "kwargs": {"pattern": "no reply matches this"}}]
    m = module(word_tok, rewards=never)
    start = copy.deepcopy(m.model.state_dict())
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(m, prompt_data(tmp_path, word_tok))
    assert m.last_pairs.batch is None and m.last_pairs.tied_share == 1.0
    assert float(trainer.callback_metrics["train/tied_prompts"]) == 1.0
    for name, value in m.model.state_dict().items():
        assert torch.equal(value, start[name]), name


@pytest.mark.parametrize(
    "options,match",
    [
        ({"num_generations": 1}, r"model.num_generations must be an integer >= 2"),
        ({"max_new_tokens": 0}, r"model.max_new_tokens"),
        ({"min_reward_gap": -1.0}, r"model.min_reward_gap"),
        ({"rollout_dtype": "fp8"}, r"model.rollout_dtype"),
        ({"engine": {"max_batch_sizes": 4}}, r"model.engine has no setting \['max_batch_sizes'\]"),
        ({"rewards": [{"fn": "astrai.train.rewards.nope"}]}, r"model.rewards\[0\].fn: .*no 'nope'"),
    ],
)
def test_settings_are_checked_naming_the_field(word_tok, options, match):
    with pytest.raises(ValueError, match=match):  # AstraiError, or ValueError (what the CLI reports in one line)
        module(word_tok, **options)


def _cli_args(tmp_path: Path, tok: str, root: Path, steps: int) -> list[str]:
    model_json = tmp_path / "tiny.json"
    model_json.write_text(json.dumps({"vocab_size": 32, **TINY_MODEL, "max_len": 64}))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "answer": "good"} for p in PROMPTS])
    return [
        "fit",
        f"--config={REPO / 'configs/train/online-dpo.yaml'}",
        f"--model.model={model_json}",
        f"--data.tokenizer={tok}",
        f"--data.train={prompts}",
        f"--data.val={prompts}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.batch_size=2",
        "--model.num_generations=4",
        "--model.max_new_tokens=3",
        "--model.optimizer.lr=1e-2",
        "--model.schedule.warmup_steps=0",
        "--model.schedule.name=constant",  # a cosine would take its length from each run's max_steps
        "--model.rewards=[{fn: astrai.train.rewards.answer_match}]",
        "--trainer.precision=32-true",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        f"--trainer.default_root_dir={root}",
    ]


def test_shipped_config_resumes_from_last_checkpoint_exactly(tmp_path, word_tok):
    """`astrai-train fit --config configs/train/online-dpo.yaml`: a run stopped after 3 of 6 steps
    and resumed with --ckpt_path=last ends with the uninterrupted run's weights."""
    from astrai.train.cli import main

    def run(root: Path, steps: int, *extra: str) -> dict[str, torch.Tensor]:
        assert main([*_cli_args(tmp_path, word_tok, root, steps), *extra]) == 0
        return load_file(root / "export" / "model.safetensors")

    full = run(tmp_path / "full", 6)
    split = run(tmp_path / "split", 3)
    resumed = run(tmp_path / "split", 6, "--ckpt_path=last")
    assert any(not torch.equal(split[k], full[k]) for k in full)  # the second half did train
    for name, value in full.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    metrics = (tmp_path / "full" / "logs" / "version_0" / "metrics.csv").read_text()
    for key in ("train/reward", "train/tied_prompts", "train/loss", "val/reward"):
        assert key in metrics, key


def test_yaml_typos_fail_naming_the_field(tmp_path, word_tok, capsys):
    from astrai.train.cli import main

    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    num_generation: 4\n")
    with pytest.raises(SystemExit) as exit_info:
        main([*_cli_args(tmp_path, word_tok, tmp_path / "run", 1), f"--config={typo}"])
    assert exit_info.value.code not in (0, None)
    assert "num_generation" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    num_generations: 1\n")
    assert main([*_cli_args(tmp_path, word_tok, tmp_path / "run", 1), f"--config={bad}"]) == 2
    err = capsys.readouterr().err
    assert "model.num_generations must be an integer >= 2" in err and "Traceback" not in err


def test_with_lora_the_reference_is_the_policy_without_its_adapters(tmp_path, word_tok):
    from astrai.train.lora import LoRAConfig
    from astrai.train.rollout import policy_state

    m = module(word_tok, lora=LoRAConfig(rank=2, alpha=4))
    assert m.ref_model is None
    record = RecordPairs()
    trainer = make_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[record])
    trainer.fit(m, prompt_data(tmp_path, word_tok))
    losses = [loss for _, _, loss in record.steps if loss is not None]
    assert losses[0].item() == pytest.approx(0.6931472, abs=1e-6)  # adapters start at zero: policy = reference
    assert abs(losses[-1].item() - 0.6931472) > 1e-4
    merged = policy_state(m.model, m.lora_config)
    engine = m.rollout_engine().engine.model.state_dict()
    for name, value in merged.items():  # the engine samples with the merged adapters of the last step
        torch.testing.assert_close(engine[name], value, msg=name)


@pytest.mark.slow
def test_two_processes_train_when_one_rank_has_no_pair(tmp_path, word_tok):
    """DDP over gloo, one prompt per rank and step: a rank whose replies tie trains on a stand-in
    pair with the loss times 0 instead of returning None (Lightning refuses a skipped step under DDP:
    every rank must run the backward pass that all-reduces the gradients)."""
    import os
    import subprocess
    import sys

    root = tmp_path / "ddp"
    args = _cli_args(tmp_path, word_tok, root, 6) + [
        "--data.batch_size=1",
        "--model.num_generations=2",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "astrai.train.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = root.glob("logs/version_*/metrics.csv")
    tied = [float(row["train/tied_prompts"]) for row in _csv(path) if row.get("train/tied_prompts")]
    assert len(tied) == 6 and 1.0 in tied and 0.0 in tied  # rank 0 had steps with and without a pair
    assert (root / "export" / "model.safetensors").is_file()


def _csv(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))
