"""`astrai-train` (LightningCLI): real fits through the real data modules, config printing,
short names, strategies, and user errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from train_helpers import CORPUS, TINY_MODEL

from astrai.core.auto import AutoModel
from astrai.train.checkpoint_io import write_sidecar
from astrai.train.checkpointing import Checkpoint
from astrai.train.cli import cli_main, expand_aliases, main
from astrai.train.sft_module import SFTModule


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Pre-training, chat and preference JSONL files, and a ModelConfig JSON."""
    root = tmp_path_factory.mktemp("cli_data")
    rows = {
        "text.jsonl": [{"text": CORPUS[i % len(CORPUS)]} for i in range(48)],
        "chat.jsonl": [
            {
                "messages": [
                    {"role": "user", "content": f"count {i}"},
                    {"role": "assistant", "content": CORPUS[i % len(CORPUS)]},
                ]
            }
            for i in range(24)
        ],
        "pairs.jsonl": [
            {"prompt": f"say {i}", "chosen": CORPUS[i % 4], "rejected": CORPUS[4 + i % 4]} for i in range(16)
        ],
    }
    for name, records in rows.items():
        (root / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    (root / "model.json").write_text(json.dumps(TINY_MODEL))
    return root


def _common(files, tokenizer_dir, tmp_path, steps=4):
    return [
        f"--model.model={files / 'model.json'}",
        f"--data.tokenizer={tokenizer_dir}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--trainer.max_steps={steps}",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        "--trainer.log_every_n_steps=1",
    ]


def _metrics(run: Path) -> list[dict[str, str]]:
    (path,) = run.glob("logs/version_*/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def test_aliases_become_class_paths():
    assert expand_aliases(["fit", "--model=sft", "--data", "dpo", "--model.optimizer.lr=1", "--data.train=sft"]) == [
        "fit",
        "--model=astrai.train.sft_module.SFTModule",
        "--data",
        "astrai.train.data.dpo.DPODataModule",
        "--model.optimizer.lr=1",
        "--data.train=sft",
    ]
    assert expand_aliases(["--model.class_path=seq"]) == [
        "--model.class_path=astrai.train.pretrain_module.PretrainModule"
    ]


def test_print_config_is_complete_and_reproducible(files, tokenizer_dir, tmp_path, capsys):
    args = [
        "fit",
        "--model=sft",
        "--data=sft",
        f"--data.train={files / 'chat.jsonl'}",
        "--model.optimizer.lr=1e-4",
        "--model.lora.rank=4",
        *_common(files, tokenizer_dir, tmp_path),
    ]
    with pytest.raises(SystemExit):
        cli_main([*args, "--print_config"])
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    model = config["model"]
    assert model["class_path"] == "astrai.train.sft_module.SFTModule"
    assert model["init_args"]["optimizer"]["lr"] == 1e-4 and model["init_args"]["lora"]["rank"] == 4
    for key in ("optimizer", "schedule", "export", "gradient_checkpointing", "compile"):
        assert key in model["init_args"], key
    assert model["init_args"]["schedule"]["warmup_steps"] == 0 and model["init_args"]["export"]["dir"] is None
    assert config["data"]["class_path"] == "astrai.train.data.sft.SFTDataModule"
    assert config["trainer"]["max_steps"] == 4 and config["checkpoint"]["save_last"] is True
    (tmp_path / "run.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        cli_main(["fit", f"--config={tmp_path / 'run.yaml'}", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == config


def test_pretrain_fit_validate_test_and_export(files, tokenizer_dir, tmp_path):
    args = [
        "--model=seq",
        "--data=pretrain",
        f"--data.train={files / 'text.jsonl'}",
        "--data.val_fraction=0.2",
        "--data.seq_len=24",
        "--data.batch_size=4",
        "--model.optimizer.lr=3e-3",
        "--trainer.val_check_interval=4",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.precision=bf16-mixed",
        "--trainer.accumulate_grad_batches=2",
        "--trainer.gradient_clip_val=1.0",
        *_common(files, tokenizer_dir, tmp_path, steps=8),
    ]
    cli = cli_main(["fit", *args])
    assert cli.trainer.global_step == 8
    assert cli.model.hparams.tokenizer == tokenizer_dir  # given once, for the data, used by both
    rows = _metrics(tmp_path / "run")
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 8 and losses[-1] < losses[0]
    assert any(r.get("val/loss") for r in rows)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    exported = AutoModel.from_pretrained(run / "export")
    torch.testing.assert_close(exported.state_dict()["lm_head.weight"], cli.model.model.lm_head.weight.detach())

    for subcommand in ("validate", "test"):
        cli = cli_main([subcommand, *args, "--ckpt_path=last"])
        assert f"{'val' if subcommand == 'validate' else 'test'}/loss" in cli.trainer.callback_metrics


def test_sft_and_dpo_fit_through_the_data_modules(files, tokenizer_dir, tmp_path):
    sft = cli_main(
        [
            "fit",
            "--model=sft",
            "--data=sft",
            f"--data.train={files / 'chat.jsonl'}",
            "--data.packing=true",
            "--data.max_len=64",
            "--data.batch_size=2",
            "--model.optimizer.lr=3e-3",
            *_common(files, tokenizer_dir, tmp_path / "sft"),
        ]
    )
    assert isinstance(sft.model, SFTModule) and sft.trainer.global_step == 4
    assert "train/acc" in sft.trainer.callback_metrics
    sft_dir = tmp_path / "sft" / "run" / "export"
    dpo = cli_main(
        [
            "fit",
            "--model=dpo",
            "--data=dpo",
            f"--data.train={files / 'pairs.jsonl'}",
            "--data.max_len=64",
            "--data.batch_size=2",
            "--model.optimizer.lr=1e-3",
            "--model.beta=0.2",
            "--model.lora.rank=4",
            "--model.lora.targets=[all-linear]",
            *_common(files, tokenizer_dir, tmp_path / "dpo"),
            f"--model.model={sft_dir}",
        ]
    )
    assert dpo.model.ref_model is None  # LoRA: the policy without adapters is the reference
    assert "train/reward_acc" in dpo.trainer.callback_metrics
    assert AutoModel.from_pretrained(tmp_path / "dpo" / "run" / "export").config.vocab_size == 320


def _strategy_cli(files, tokenizer_dir, tmp_path, *extra):
    # run=False: no subcommand, the classes are only built
    return cli_main(
        [
            "--model=seq",
            "--data=pretrain",
            f"--data.train={files / 'text.jsonl'}",
            *_common(files, tokenizer_dir, tmp_path),
            *extra,
        ],
        run=False,
    )


def test_strategy_by_short_name_or_class_path(files, tokenizer_dir, tmp_path):
    cli = _strategy_cli(files, tokenizer_dir, tmp_path, "--trainer.strategy=ddp")
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    (tmp_path / "ddp.yaml").write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "strategy": {
                        "class_path": "lightning.pytorch.strategies.DDPStrategy",
                        "init_args": {"find_unused_parameters": True},
                    }
                }
            }
        )
    )
    cli = _strategy_cli(files, tokenizer_dir, tmp_path, f"--config={tmp_path / 'ddp.yaml'}")
    assert cli.trainer.strategy._ddp_kwargs["find_unused_parameters"] is True


def test_checkpoints_default_on_and_can_be_switched_off(files, tokenizer_dir, tmp_path):
    cli = _strategy_cli(files, tokenizer_dir, tmp_path)
    (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, Checkpoint)]
    assert checkpoint.save_last and Path(checkpoint.dirpath) == tmp_path / "run" / "checkpoints"
    cli = _strategy_cli(files, tokenizer_dir, tmp_path, "--trainer.enable_checkpointing=false")
    assert not any(isinstance(c, ModelCheckpoint) for c in cli.trainer.callbacks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDP needs CUDA")
def test_fsdp_by_short_name(files, tokenizer_dir, tmp_path):
    cli = _strategy_cli(files, tokenizer_dir, tmp_path, "--trainer.strategy=fsdp", "--trainer.accelerator=gpu")
    assert isinstance(cli.trainer.strategy, FSDPStrategy)


def test_bad_input_gives_one_clear_line(files, tokenizer_dir, tmp_path, capsys):
    base = [
        "fit",
        "--model=seq",
        "--data=pretrain",
        f"--data.train={files / 'text.jsonl'}",
        *_common(files, tokenizer_dir, tmp_path),
    ]
    assert main([*base, "--model.model=/nowhere/model"]) == 2
    err = capsys.readouterr().err
    assert "model: '/nowhere/model' is neither a model directory nor a ModelConfig JSON" in err
    assert "Traceback" not in err
    assert main([*base, "--data.train=/nowhere/rows.jsonl"]) == 2
    assert "/nowhere/rows.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--model.optimizer.name=sgd"])
    err = capsys.readouterr().err
    assert "optimizer" in err and "adamw" in err and "muon" in err


@pytest.mark.parametrize("config", sorted(Path(__file__).parents[2].glob("configs/train/*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={config}", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("astrai.train.")
    assert printed["data"]["class_path"].startswith("astrai.train.data.")


def test_grpos_engine_settings_are_typed_so_a_misspelt_one_fails_at_start(tmp_path, capsys):
    grpo = Path(__file__).parents[2] / "configs/train/grpo.yaml"
    with pytest.raises(SystemExit):
        cli_main(["fit", f"--config={grpo}", "--print_config"])
    engine = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["engine"]
    assert engine["max_batch_size"] == 128 and engine["kv_cache_dtype"] == "auto"  # every EngineConfig field shown
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    engine:\n      max_batch_sizes: 4\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={grpo}", f"--config={typo}", "--print_config"])
    assert exit_info.value.code not in (0, None)
    assert "max_batch_sizes" in capsys.readouterr().err


def test_the_old_pretraining_class_path_still_loads_with_a_deprecation_warning(tmp_path, capsys):
    config = Path(__file__).parents[2] / "configs/quickstart/pretrain.yaml"
    old = tmp_path / "old.yaml"
    old.write_text(
        config.read_text().replace("astrai.train.pretrain_module.PretrainModule", "astrai.train.seq_module.SeqModule")
    )
    import sys

    sys.modules.pop("astrai.train.seq_module", None)
    with pytest.warns(DeprecationWarning, match="now astrai.train.pretrain_module.PretrainModule"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", f"--config={old}", "--print_config"])
    assert exit_info.value.code in (0, None)
    from astrai.train.pretrain_module import PretrainModule
    from astrai.train.seq_module import SeqModule

    assert SeqModule is PretrainModule


def test_a_checkpoint_saved_before_the_option_groups_resumes_with_its_options_regrouped(files, tokenizer_dir, tmp_path):
    """Checkpoints written before optimizer/schedule/export were grouped keep flat hyperparameters
    (lr, scheduler, warmup_steps, export_dir...). LightningCLI reads a --ckpt_path file's
    hyperparameters back into the configuration; they are moved into their groups, so such a run
    resumes (with the checkpoint's values) instead of failing in the parser."""
    args = ["--model=seq", "--data=pretrain", f"--data.train={files / 'text.jsonl'}", "--data.seq_len=16"]
    cli_main(["fit", *args, "--model.optimizer.lr=3e-3", *_common(files, tokenizer_dir, tmp_path, steps=2)])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    hparams = checkpoint["hyper_parameters"]
    for group in ("optimizer", "schedule", "export"):
        hparams.pop(group, None)
    hparams.update({"lr": 2e-3, "weight_decay": 0.05, "scheduler": "constant", "warmup_steps": 1, "export_dir": None})
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    write_sidecar(old)
    cli = cli_main(["fit", *args, f"--ckpt_path={old}", *_common(files, tokenizer_dir, tmp_path, steps=3)])
    assert cli.trainer.global_step == 3
    assert cli.model.optimizer_args.lr == 2e-3 and cli.model.optimizer_args.weight_decay == 0.05
    assert cli.model.schedule_args.name == "constant" and cli.model.schedule_args.warmup_steps == 1
