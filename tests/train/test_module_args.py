"""The training modules' grouped options (model.optimizer, model.schedule, model.export): they
reach the optimizer and the schedule, check themselves naming the full field, show their docs in
--help, stay plain values in checkpoints, and an option of the old flat layout fails with a
message naming its new place, in a YAML file, on the command line and in Python."""

from __future__ import annotations

import pytest
import torch
import yaml
from lightning.fabric.utilities.cloud_io import _load as lightning_load

from astrai.core.errors import AstraiError
from astrai.train.cli import cli_main, main
from astrai.train.module_args import ExportArgs, OptimizerArgs, ScheduleArgs, regroup_options
from astrai.train.pretrain_module import PretrainModule
from astrai.train.sft_module import SFTModule


def _cli_base(model_config_json: str) -> list[str]:
    return ["fit", "--model=seq", f"--model.model={model_config_json}", "--data=pretrain", "--data.train=rows.jsonl"]


@pytest.mark.parametrize(
    "old, value, new",
    [
        ("lr", 1.0e-3, "model.optimizer.lr"),
        ("scheduler", "cosine", "model.schedule.name"),
        ("export_dir", "runs/x", "model.export.dir"),
        ("optimizer", "muon", "model.optimizer.name"),
    ],
)
def test_a_flat_option_in_a_yaml_config_fails_naming_its_new_place(
    tmp_path, model_config_json, capsys, old, value, new
):
    config = tmp_path / "old.yaml"
    init_args = {"model": model_config_json, old: value}
    config.write_text(
        yaml.safe_dump({"model": {"class_path": "astrai.train.pretrain_module.PretrainModule", "init_args": init_args}})
    )
    assert main(["fit", f"--config={config}"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: model.{old} " in err and f"moved to {new}" in err and f"--{new}=" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flags, new",
    [
        (["--model.lr=1e-3"], "model.optimizer.lr"),
        (["--model.scheduler", "wsd"], "model.schedule.name"),
        (["--model.init_args.export_on_fit_end=false"], "model.export.on_fit_end"),
        (["--model.optimizer=muon"], "model.optimizer.name"),
    ],
    ids=["lr", "scheduler", "init_args.export_on_fit_end", "optimizer"],
)
def test_a_flat_flag_on_the_command_line_fails_naming_its_new_place(model_config_json, capsys, flags, new):
    assert main([*_cli_base(model_config_json), *flags]) == 2
    err = capsys.readouterr().err
    assert f"moved to {new}" in err and "Traceback" not in err


def test_python_constructors_refuse_a_flat_option_naming_its_new_place(model_config_json):
    with pytest.raises(AstraiError, match=r"model.lr moved to model.optimizer.lr .* optimizer=OptimizerArgs\(lr=...\)"):
        PretrainModule(model=model_config_json, lr=1e-3)
    with pytest.raises(AstraiError, match="model.export_on_fit_end moved to model.export.on_fit_end"):
        SFTModule(model=model_config_json, export_on_fit_end=False)
    with pytest.raises(
        AstraiError, match="model.optimizer is a group of options now: its name moved to model.optimizer.name"
    ):
        PretrainModule(model=model_config_json, optimizer="muon")
    with pytest.raises(AstraiError, match=r"model.optimizer has no option \['lrr'\]"):
        PretrainModule(model=model_config_json, optimizer={"lrr": 1e-3})
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_option'"):
        PretrainModule(model=model_config_json, no_such_option=1)


def test_grouped_options_reach_the_optimizer_and_the_schedule(model_config_json):
    module = PretrainModule(
        model=model_config_json,
        optimizer={"lr": 0.02, "weight_decay": 0.05, "betas": [0.8, 0.9], "eps": 1e-6},
        schedule=ScheduleArgs(name="constant", warmup_steps=4),
    )
    setup = module.configure_optimizers()
    decay, no_decay = setup["optimizer"].param_groups
    assert decay["initial_lr"] == 0.02 and decay["lr"] == pytest.approx(0.02 / 4)  # first of 4 warmup steps
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-6
    for _ in range(5):
        setup["optimizer"].step()  # no gradients: the weights stay, the schedule advances
        setup["lr_scheduler"]["scheduler"].step()
    assert decay["lr"] == pytest.approx(0.02)  # constant after the warmup


@pytest.mark.parametrize(
    "group, fields, named",
    [
        (OptimizerArgs, {"lr": -1.0}, "model.optimizer.lr must be"),
        (OptimizerArgs, {"betas": (0.9, 1.5)}, "model.optimizer.betas must be"),
        (OptimizerArgs, {"name": "sgd"}, "model.optimizer.name must be one of"),
        (ScheduleArgs, {"name": "sgdr"}, "model.schedule.cycle_steps is needed by the sgdr schedule"),
        (ScheduleArgs, {"decay_shape": "sqrt"}, "model.schedule.decay_shape must be one of"),
        (ScheduleArgs, {"warmup_steps": -1}, "model.schedule.warmup_steps must be"),
        (ExportArgs, {"dtype": "int8"}, "model.export.dtype must be one of"),
    ],
)
def test_each_group_names_a_bad_value_by_its_full_path(group, fields, named):
    with pytest.raises(AstraiError, match=named):
        group(**fields)


def test_help_shows_every_grouped_option_with_its_description(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.help=PretrainModule"])
    shown = " ".join(capsys.readouterr().out.split())
    for flag, words in [
        ("--model.optimizer.lr", "peak learning rate"),
        ("--model.optimizer.ns_steps", "Newton-Schulz"),
        ("--model.schedule.warmup_steps", "linear warmup length"),
        ("--model.export.dir", "where the model directory"),
        ("--model.export.adapter_dir", "where the adapter goes"),
    ]:
        assert flag in shown and words in shown, flag


def test_checkpoint_hyperparameters_are_plain_values_lightning_loads(tmp_path, model_config_json):
    """Lightning loads a checkpoint with torch's weights_only default (True): the groups and the
    LoRA config must be stored as mappings, not as our classes."""
    module = SFTModule(
        model=model_config_json,
        optimizer=OptimizerArgs(lr=1e-3),
        export={"on_fit_end": False},
        lora={"rank": 4, "alpha": 8.0, "targets": ["q_proj"]},
    )
    torch.save({"hyper_parameters": dict(module.hparams)}, tmp_path / "hp.ckpt")
    hparams = lightning_load(tmp_path / "hp.ckpt")["hyper_parameters"]
    assert hparams["optimizer"]["lr"] == 1e-3 and hparams["optimizer"]["name"] == "adamw"
    assert hparams["schedule"]["name"] == "cosine" and hparams["export"]["on_fit_end"] is False
    assert hparams["lora"]["rank"] == 4
    rebuilt = SFTModule(**hparams)  # what load_from_checkpoint does
    assert rebuilt.optimizer_args == module.optimizer_args and rebuilt.lora_config == module.lora_config


def test_saved_flat_options_are_moved_into_their_groups():
    """What a checkpoint of before the groups saved becomes when it is read back (regroup_options)."""
    old = {"model": "m", "optimizer": "muon", "lr": 0.02, "scheduler": "wsd", "decay_fraction": 0.2, "export_dir": "x"}
    assert regroup_options(old) == {
        "model": "m",
        "optimizer": {"name": "muon", "lr": 0.02},
        "schedule": {"name": "wsd", "decay_fraction": 0.2},
        "export": {"dir": "x"},
    }
    new = {"optimizer": {"lr": 1e-3}, "schedule": {"name": "cosine"}}
    assert regroup_options(new) == new  # a checkpoint of today is read as it was saved
