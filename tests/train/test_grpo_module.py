"""GRPOModule end to end on a CPU: online GRPO raises the reward of a toy task, offline GRPO
moves probability towards the better-rewarded responses, optimizer steps and weight syncs are
counted as configured, the reference model exists only when the KL needs it, and settings and
batches are checked with errors that name the field."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from data_helpers import word_tokenizer, write_jsonl
from lightning.pytorch.callbacks import Callback
from train_helpers import TINY_MODEL, make_trainer

from astrai.train.base_module import BatchError
from astrai.train.data.grpo import GRPODataModule
from astrai.train.grpo_module import GRPOModule
from astrai.train.lora import LoRAConfig
from astrai.train.rewards import RewardError

PROMPTS = ["what is one", "what is two", "what is three", "hi", "yo", "what is a", "what is b", "what is c"]
ANSWER = [{"fn": "astrai.train.rewards.answer_match"}]


@pytest.fixture
def word_tok(tmp_path):
    return word_tokenizer(tmp_path / "tok")


def online_data(tmp_path, tok, batch_size=4, **kwargs) -> GRPODataModule:
    """Prompts whose reward is 1 when the reply contains the word 'good' (a word of the vocabulary)."""
    rows = [{"prompt": p, "answer": "good"} for p in PROMPTS]
    path = write_jsonl(tmp_path / "grpo.jsonl", rows)
    return GRPODataModule(
        tok,
        path,
        val=path,
        batch_size=batch_size,
        val_batch_size=len(PROMPTS),
        cache_dir=str(tmp_path / "cache"),
        **kwargs,
    )


def module(tok, **kwargs) -> GRPOModule:
    torch.manual_seed(0)
    options = dict(
        model={**TINY_MODEL, "max_len": 64},
        tokenizer=tok,
        rewards=ANSWER,
        group_size=8,
        max_new_tokens=4,
        val_temperature=1.0,
        val_samples=8,
        optimizer={"lr": 1e-2, "weight_decay": 0.0},
        schedule={"name": "constant"},
        export={"on_fit_end": False},
    )
    options.update(kwargs)
    return GRPOModule(**options)


@pytest.mark.slow
def test_online_grpo_raises_the_reward_of_a_toy_task(tmp_path, word_tok):
    """A random tiny model says 'good' in about 1 of 7 four-token replies; 25 GRPO steps make it
    the rule. Measured by sampling 8 replies to each of the 8 prompts before and after, with the
    same seeds."""
    m = module(word_tok, old_logps="engine")
    dm = online_data(tmp_path, word_tok)
    trainer = make_trainer(tmp_path, max_steps=25, limit_val_batches=1, check_val_every_n_epoch=1000)
    before = trainer.validate(m, dm, verbose=False)[0]["val/reward"]
    trainer.fit(m, dm)
    metrics = trainer.callback_metrics
    after = trainer.validate(m, dm, verbose=False)[0]["val/reward"]
    assert before < 0.4
    assert after > before + 0.4 and after >= 0.8
    assert trainer.global_step == 25
    assert m.rollout_engine().version == 25  # the engine samples with the latest weights
    for key in (
        "train/reward",
        "train/reward_std",
        "train/reward/answer_match",
        "train/clip_frac",
        "train/ratio",
        "train/loss",
        "train/completion_len",
        "train/completion_len_max",
        "train/truncated",
        "train/rollout_tokens_per_sec",
        "train/weights_lag",
        "train/zero_std_groups",
        "train/lr",
    ):
        assert key in metrics, key
    assert float(metrics["train/weights_lag"]) == 0  # synced after every step
    assert float(metrics["train/rollout_tokens_per_sec"]) > 0


@pytest.mark.parametrize(
    "ppo_epochs,mini_batch_size,sync_interval,expect_version", [(1, None, 1, 3), (2, 4, 1, 12), (2, 4, 5, 10)]
)
def test_optimizer_steps_and_weight_syncs_are_counted(
    tmp_path, word_tok, ppo_epochs, mini_batch_size, sync_interval, expect_version
):
    """Each batch of 2 prompts x 4 completions gives ppo_epochs x (8 / mini_batch_size) optimizer
    steps; the engine gets the weights every sync_interval steps, stamped with the step."""
    per_batch = ppo_epochs * (8 // (mini_batch_size or 8))
    m = module(
        word_tok,
        group_size=4,
        ppo_epochs=ppo_epochs,
        mini_batch_size=mini_batch_size,
        micro_batch_size=2,
        sync_interval=sync_interval,
        max_new_tokens=3,
    )
    trainer = make_trainer(tmp_path, max_steps=3 * per_batch, limit_val_batches=0)
    trainer.fit(m, online_data(tmp_path, word_tok, batch_size=2))
    assert trainer.global_step == 3 * per_batch
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 3  # rollout batches
    assert m._rollout.version == expect_version
    lag = float(trainer.callback_metrics["train/weights_lag"])
    assert lag == (per_batch * 2) % sync_interval if sync_interval > 1 else lag == 0


def test_policy_and_engine_old_logps_agree_in_float32(tmp_path, word_tok):
    """Also when the engine was first built and used under validation's inference mode."""
    m = module(word_tok, kl_coef=0.1)
    data = online_data(tmp_path, word_tok)
    make_trainer(tmp_path).validate(m, data, verbose=False)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(m, data)
    metrics = trainer.callback_metrics
    assert float(metrics["train/logp_gap"]) < 1e-4
    assert "train/kl" in metrics and float(metrics["train/kl"]) > 0  # the policy moved after the first step


@pytest.mark.parametrize("asynchronous", [False, True])
def test_old_logps_from_the_training_forward_give_the_same_updates(tmp_path, word_tok, asynchronous):
    """With one optimizer step per rollout batch, the behaviour log-probs come from the training
    forward instead of a separate forward over the batch first; the weights after three steps,
    logp_gap and (asynchronous, with rows of older weights) the decoupled-PPO weights are those
    of the separate forward."""
    runs = {}
    for in_step in (True, False):
        m = module(word_tok, group_size=4, max_new_tokens=3, asynchronous=asynchronous, max_staleness=1)
        if not in_step:
            m._old_logps_in_step = lambda completions: False
        else:
            assert m._old_logps_in_step(8)
        trainer = make_trainer(tmp_path / str(in_step), max_steps=3, limit_val_batches=0)
        trainer.fit(m, online_data(tmp_path / str(in_step), word_tok, batch_size=2))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        runs[in_step] = (dict(m.model.state_dict()), metrics)
    (fused, fused_metrics), (separate, separate_metrics) = runs[True], runs[False]
    for name, value in separate.items():
        torch.testing.assert_close(fused[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert fused_metrics["train/logp_gap"] == pytest.approx(separate_metrics["train/logp_gap"], abs=1e-6)
    assert fused_metrics["train/loss"] == pytest.approx(separate_metrics["train/loss"], abs=1e-6)
    if asynchronous:
        assert fused_metrics["train/behaviour_weight"] == pytest.approx(separate_metrics["train/behaviour_weight"])
    start = module(word_tok).model.state_dict()
    assert any(not torch.equal(fused[name], start[name]) for name in start)  # the policy did move


def test_a_compiled_policy_compiles_once_for_every_rollout_length(tmp_path, word_tok):
    """Rollout batches (and their micro-batches) change length every step; the policy is compiled
    for dynamic lengths at once instead of once for the first length and again when it changes."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = module(word_tok, group_size=4, max_new_tokens=6, compile=True, micro_batch_size=2)
    lengths = set()
    token_logps = m._token_logps

    def recorded(model, data, cut):
        lengths.add(cut.length)
        return token_logps(model, data, cut)

    m._token_logps = recorded
    trainer = make_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(m, online_data(tmp_path, word_tok, batch_size=2))
    assert len(lengths) >= 2  # the shapes did change
    # and dynamo compiled the forward once, and the log-softmax after it (losses.label_logps) once
    assert counters["frames"]["total"] == 2
    torch._dynamo.reset()


def test_rollouts_inside_a_mixed_precision_training_step_run_in_the_engines_own_dtype(tmp_path, word_tok):
    """Lightning runs training_step, and so the in-process rollouts, under its autocast; a
    bf16-mixed run on the CPU could not generate (the float32 engine's keys came out bfloat16)."""
    m = module(word_tok, group_size=4, max_new_tokens=4)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0, precision="bf16-mixed")
    trainer.fit(m, online_data(tmp_path, word_tok, batch_size=2))
    assert trainer.global_step == 2
    assert m._rollout.engine.model.lm_head.weight.dtype == torch.float32
    assert float(trainer.callback_metrics["train/completion_len"]) > 0


def test_old_logps_need_their_own_forward_when_a_batch_gives_several_updates(word_tok):
    assert not module(word_tok, ppo_epochs=2)._old_logps_in_step(8)
    assert not module(word_tok, mini_batch_size=4)._old_logps_in_step(8)
    assert module(word_tok, mini_batch_size=8)._old_logps_in_step(8)
    dropout = LoRAConfig(rank=2, alpha=4, dropout=0.1)
    assert not module(word_tok, lora=dropout)._old_logps_in_step(8)


def offline_rows() -> list[dict]:
    return [
        {"prompt": p, "responses": ["good", "bad", "one two", "yo"], "rewards": [1.0, 0.0, 0.0, 0.2]}
        for p in PROMPTS[:4]
    ]


def test_offline_grpo_prefers_the_rewarded_responses(tmp_path, word_tok):
    path = write_jsonl(tmp_path / "offline.jsonl", offline_rows())
    dm = GRPODataModule(word_tok, path, batch_size=2, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert dm.offline
    batch = next(iter(dm.train_dataloader()))
    m = module(word_tok, aggregation="sequence", kl_coef=0.05)

    def logps():
        per_token = m._frozen_logps(m.model, batch)
        return per_token.sum(-1).view(-1, 4)  # (prompts, responses)

    before = logps()
    trainer = make_trainer(tmp_path, max_steps=8, limit_val_batches=0)
    trainer.fit(m, dm)
    after = logps()
    gain = after - before
    assert (gain[:, 0] > 1.0).all()  # the best response gained most, by a wide margin
    assert (gain[:, 0] > gain[:, 1:].max(1).values).all()
    assert (gain[:, 1] < 0).all() and (gain[:, 2] < 0).all()
    assert m._rollout is None  # offline training never builds the engine
    assert float(trainer.callback_metrics["train/reward"]) == pytest.approx(0.3)


def is_wait(message: str) -> bool:
    """A sync-debug-mode warning of a synchronising call; not the mode's own notice, which
    also says "synchronizing" and is given once per process, at the first switch of the mode
    (counted, it made the first counted step of the first run one wait longer)."""
    return "synchronizing" in message and not message.startswith("Synchronization debug mode")


class _CountedWaits(Callback):
    """The host's waits for the device in each training step after the first (CUDA's sync
    debug mode, in "warn", warns once per synchronising call)."""

    def __init__(self):
        self.per_step: list[int] = []
        self.sites: list[dict[str, int]] = []  # per step: file:line of the Python caller -> waits

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._counting = trainer.global_step > 0  # the first step checks the batch once
        if self._counting:  # (by step, not batch_idx: an epoch here is shorter than the run)
            self._caught = warnings.catch_warnings(record=True)
            self._seen = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self._counting:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            waits = [w for w in self._seen if is_wait(str(w.message))]
            self.per_step.append(len(waits))
            self.sites.append(dict(Counter(f"{Path(w.filename).name}:{w.lineno}" for w in waits)))


def test_the_sync_debug_modes_own_notice_is_not_a_wait():
    assert not is_wait(
        "Synchronization debug mode is a prototype feature and does not yet detect all synchronizing operations"
    )
    assert is_wait("called a synchronizing CUDA operation")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists on CUDA only")
def test_a_grpo_step_waits_for_the_device_no_more_often_with_more_micro_batches(tmp_path, word_tok):
    """Micro-batches are cut on the host (grpo_logps.BatchLayout): a step of 8 micro-batches
    waits as often as a step of one (reading each one's length and labelled positions from the
    device waited twice per micro-batch)."""
    path = write_jsonl(tmp_path / "offline.jsonl", offline_rows())
    waits, sites = {}, {}
    for micro in (1, 8):
        dm = GRPODataModule(word_tok, path, batch_size=2, cache_dir=str(tmp_path / "cache"))
        counted = _CountedWaits()
        m = module(word_tok, micro_batch_size=micro)
        trainer = make_trainer(tmp_path, max_steps=3, accelerator="gpu", limit_val_batches=0, callbacks=[counted])
        try:
            trainer.fit(m, dm)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len(counted.per_step) == 2
        waits[micro] = counted.per_step
        sites[micro] = counted.sites
    assert waits[1] == waits[8], sites  # where each step waited, if they differ


def test_reference_only_when_the_kl_needs_it(tmp_path, word_tok):
    assert module(word_tok).ref_model is None
    with_kl = module(word_tok, kl_coef=0.1)
    assert with_kl.ref_model is not None and not any(p.requires_grad for p in with_kl.ref_model.parameters())
    assert module(word_tok, kl_coef=0.1, lora=LoRAConfig(rank=2)).ref_model is None  # adapters off instead
    with pytest.raises(ValueError, match=r"model.reference_model .*kl_coef"):
        module(word_tok, reference_model=str(tmp_path))
    # A reference copied from a fresh initialisation cannot be rebuilt: checkpoints keep it.
    state = {"state_dict": with_kl.state_dict()}
    with_kl.on_save_checkpoint(state)
    assert any(k.startswith("ref_model.") for k in state["state_dict"])


def test_reference_read_from_a_directory_stays_out_of_checkpoints(tmp_path, word_tok):
    from astrai.train.export import export_model

    source = module(word_tok)
    directory = export_model(source, tmp_path / "policy")
    m = GRPOModule(model=str(directory), rewards=ANSWER, kl_coef=0.1, export={"on_fit_end": False})
    state = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(state)
    assert not any(k.startswith("ref_model.") for k in state["state_dict"])
    m.on_load_checkpoint(state)
    assert any(k.startswith("ref_model.") for k in state["state_dict"])
    m.load_state_dict(state["state_dict"])


@pytest.mark.parametrize(
    "options,match",
    [
        ({"group_size": 1}, r"model.group_size must be an integer >= 2"),
        ({"epsilon": 0.0}, r"model.epsilon"),
        ({"kl_coef": -1.0}, r"model.kl_coef"),
        ({"aggregation": "mean"}, r"model.aggregation"),
        ({"old_logps": "ref"}, r"model.old_logps"),
        ({"ppo_epochs": 0}, r"model.ppo_epochs"),
        ({"mini_batch_size": 0}, r"model.mini_batch_size"),
        ({"temperature": -1.0}, r"SamplingParams.temperature"),
    ],
)
def test_settings_are_checked(word_tok, options, match):
    with pytest.raises(ValueError, match=match):
        module(word_tok, **options)


def test_rewards_are_checked_when_the_module_is_built(word_tok):
    with pytest.raises(RewardError, match=r"model.rewards\[0\].fn: .*no 'nope'"):
        module(word_tok, rewards=[{"fn": "astrai.train.rewards.nope"}])


def test_online_batches_need_rewards_and_a_vocabulary_match(tmp_path, word_tok):
    m = module(word_tok, rewards=None)
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    with pytest.raises(BatchError, match=r"model.rewards is empty"):
        trainer.fit(m, online_data(tmp_path, word_tok))
    m = module(word_tok)
    with pytest.raises(BatchError, match=r"needs \['prompt_ids', 'prompts', 'rows'\]"):
        m._eval_step({"prompt_ids": [[1]]}, 0, "val")
    with pytest.raises(BatchError, match=r"token id 999, outside"):
        m._eval_step({"prompt_ids": [[1, 999]], "prompts": ["x"], "rows": [{}]}, 0, "val")
    m = module(word_tok, rewards=[{"fn": "astrai.train.rewards.exact_match"}])
    with pytest.raises(BatchError, match=r"GRPOModule \(val\): exact_match: the dataset row has no 'reference'"):
        m._eval_step({"prompt_ids": [[3, 4]], "prompts": ["x"], "rows": [{"answer": "x"}]}, 0, "val")


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cli_runs_the_shipped_configs(tmp_path, word_tok):
    """`astrai-train fit` with configs/train/grpo.yaml (online) and grpo-offline.yaml."""
    from astrai.train.cli import main

    model_json = tmp_path / "tiny.json"
    model_json.write_text(json.dumps({"vocab_size": 32, **TINY_MODEL, "max_len": 64}))
    prompts = write_jsonl(tmp_path / "online.jsonl", [{"prompt": p, "answer": "good"} for p in PROMPTS[:4]])
    common = [
        f"--model.model={model_json}",
        f"--data.tokenizer={word_tok}",
        "--trainer.max_steps=2",
        "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false",
        "--data.batch_size=2",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--model.micro_batch_size=4",
    ]
    online = tmp_path / "online"
    assert (
        main(
            [
                "fit",
                f"--config={REPO / 'configs/train/grpo.yaml'}",
                *common,
                f"--data.train={prompts}",
                f"--data.val={prompts}",
                "--trainer.val_check_interval=2",
                "--model.group_size=2",
                "--model.max_new_tokens=3",
                f"--trainer.default_root_dir={online}",
            ]
        )
        == 0
    )
    assert (online / "export" / "model.safetensors").is_file()
    metrics = (online / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/reward" in metrics and "val/reward" in metrics
    scored = write_jsonl(tmp_path / "offline.jsonl", offline_rows())
    offline = tmp_path / "offline"
    assert (
        main(
            [
                "fit",
                f"--config={REPO / 'configs/train/grpo-offline.yaml'}",
                *common,
                f"--data.train={scored}",
                f"--trainer.default_root_dir={offline}",
            ]
        )
        == 0
    )
    assert (offline / "export" / "model.safetensors").is_file()
    assert (offline / "checkpoints" / "last.ckpt").is_file()


def test_cli_reports_bad_rewards_without_a_traceback(tmp_path, word_tok, capsys):
    """(through the short names --model=grpo --data=grpo)"""
    from astrai.train.cli import main

    prompts = write_jsonl(tmp_path / "online.jsonl", [{"prompt": "hi"}])
    assert (
        main(
            [
                "fit",
                "--model=grpo",
                "--data=grpo",
                f"--model.model={REPO / 'configs/model/tiny.json'}",
                f"--data.tokenizer={word_tok}",
                f"--data.train={prompts}",
                "--model.rewards=[{fn: astrai.train.rewards.answer_matc}]",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "model.rewards[0].fn: module 'astrai.train.rewards' has no 'answer_matc'" in err
    assert "Traceback" not in err
