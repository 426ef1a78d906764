"""`astrai-train`: LightningCLI over the training modules and the data modules.

    astrai-train fit --config configs/train/sft-lora.yaml --model.optimizer.lr=1e-4 --trainer.max_steps=100
    astrai-train fit --model=sft --model.model=runs/pretrain/export --data=sft --data.train=chat.jsonl ...
    astrai-train fit --config run.yaml --ckpt_path=last          # resume exactly where it stopped
    astrai-train validate --config run.yaml --ckpt_path=last

Every field of the model, data and trainer is a command-line flag; `--print_config` prints
the complete configuration. Classes are picked by `class_path` or by class name
(`--model=SFTModule`), and on the command line also by a short name: seq/pretrain, sft, dpo, grpo, online-dpo.
The model's optimizer, schedule and export options are groups (module_args.py): an option of
the old flat layout (`--model.lr`, `model.scheduler: cosine` in a config file) stops the run
with a message naming its new place (`model.optimizer.lr`, `model.schedule.name`).
Defaults added here: a CSV logger; checkpoints in `<default_root_dir>/checkpoints` with
`last.ckpt` kept and written after the final step (so `--ckpt_path=last` continues the
previous run exactly, even with a larger max_steps), each with a `.sha256` sidecar that is
checked before a run resumes from it (checkpoint_io.py); the model exported to
`<default_root_dir>/export` on fit end and, with `--export.every_n_train_steps`, at intervals;
and the tokenizer given once, for model and data. Under torchrun or SLURM, a trainer whose
num_nodes x devices differs from the processes launched stops at start-up (check_launch).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from astrai.core.errors import AstraiError

from .base_module import CausalLMModule
from .checkpoint_io import ChecksummedCheckpointIO
from .checkpointing import Checkpoint
from .dpo_module import DPOModule
from .export import ModelExport
from .grpo_module import GRPOModule
from .module_args import GROUP_NAMES, MOVED_OPTIONS, moved_option_error, regroup_options
from .online_dpo_module import OnlineDPOModule
from .pretrain_module import PretrainModule
from .sft_module import SFTModule

MODEL_ALIASES = {
    "seq": PretrainModule,
    "pretrain": PretrainModule,
    "sft": SFTModule,
    "dpo": DPOModule,
    "grpo": GRPOModule,
    "online-dpo": OnlineDPOModule,
}
# The data modules, imported on demand so a missing one only matters when asked for.
DATA_ALIASES = {
    "seq": "astrai.train.data.pretrain.PretrainDataModule",
    "pretrain": "astrai.train.data.pretrain.PretrainDataModule",
    "sft": "astrai.train.data.sft.SFTDataModule",
    "dpo": "astrai.train.data.dpo.DPODataModule",
    "grpo": "astrai.train.data.grpo.GRPODataModule",
    "online-dpo": "astrai.train.data.grpo.GRPODataModule",  # prompts, as for GRPO
}
# Errors reported as one line instead of a traceback: every AstraiError (UsageError below,
# ConfigError, CheckpointError, IntegrityError, BatchError, DataError, RewardError, ...), and two
# that are not ours but name the problem as well: a path that does not exist (FileNotFoundError,
# from open() and friends) and a Trainer setting Lightning refuses (MisconfigurationException).
USER_ERRORS: tuple[type[Exception], ...] = (AstraiError, FileNotFoundError, MisconfigurationException)


class UsageError(AstraiError):
    """Bad configuration found while building the model, data or trainer."""


def _class_path(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def expand_aliases(args: list[str]) -> list[str]:
    """Rewrite `--model=sft` / `--data dpo` style short names into class paths."""
    tables = {"--model": {k: _class_path(v) for k, v in MODEL_ALIASES.items()}, "--data": DATA_ALIASES}
    tables.update({f"{flag}.class_path": table for flag, table in list(tables.items())})
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in tables and eq and value in tables[flag]:
            arg = f"{flag}={tables[flag][value]}"
        elif arg in tables and i + 1 < len(args) and args[i + 1] in tables[arg]:
            out.append(arg)
            arg = tables[arg][args[i + 1]]
            i += 1
        out.append(arg)
        i += 1
    return out


def check_moved_options(args: list[str]) -> None:
    """Refuse a model option of the old flat layout (--model.lr=..., or model.lr in a --config
    file or a --model YAML) with a message naming its new place, before jsonargparse would refuse
    it with a generic one."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        if flag == "--config" and Path(value).is_file():
            check_moved_in_config(_load_yaml(value), value)
        elif flag == "--model" and value.endswith((".yaml", ".yml")) and Path(value).is_file():
            check_moved_in_config({"model": _load_yaml(value)}, value)
        elif flag.startswith("--model."):
            option = flag.removeprefix("--model.").removeprefix("init_args.")
            _check_option(option, value if eq or not value.startswith("--") else None, "")


def check_moved_in_config(config: object, where: str = "") -> None:
    """check_moved_options for a parsed configuration (a --config file, or cli_main's dict)."""
    if not isinstance(config, dict):
        return
    for section in (config, *(config.get(s) for s in ("fit", "validate", "test", "predict"))):
        model = section.get("model") if isinstance(section, dict) else None
        if not isinstance(model, dict):
            continue
        init_args = model.get("init_args")
        options = {**(init_args if isinstance(init_args, dict) else {}), **model}
        for option, value in options.items():
            _check_option(option, value, where)


def _check_option(option: str, value: object, where: str) -> None:
    if option in MOVED_OPTIONS:
        raise UsageError(str(moved_option_error(option, where)))
    # `optimizer: muon`: the group's old single value, a bare name (not a mapping or a file).
    if option in GROUP_NAMES and isinstance(value, str) and re.fullmatch(r"[\w-]+", value.strip()):
        raise UsageError(str(moved_option_error(option, where)))


def _load_yaml(path: str) -> object:
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None  # jsonargparse reports an unreadable file in its own words


def _import_data_modules() -> None:
    """Import the data modules so `--data=SFTDataModule` resolves by class name."""
    import importlib

    for path in set(DATA_ALIASES.values()):
        try:
            importlib.import_module(path.rsplit(".", 1)[0])
        except ImportError:
            pass


class AstraiCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_lightning_class_args(ModelExport, "export")

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, dict):
            check_moved_in_config(args)
        else:
            check_moved_options(sys.argv[1:] if args is None else list(args))
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(config.trainer.get("default_root_dir") or ".")
        # A logger whose files land under default_root_dir (Lightning's default would print a notice).
        if config.trainer.get("logger") in (None, True):
            config.trainer.logger = {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(root), "name": "logs"},
            }
        # A fixed checkpoint folder: a run's versioned log folder would hide last.ckpt from the next run.
        if config.get("checkpoint") is not None and not config.checkpoint.get("dirpath"):
            config.checkpoint.dirpath = str(root / "checkpoints")
        self._share_tokenizer(config)

    @staticmethod
    def _share_tokenizer(config) -> None:
        model_args = config.model.get("init_args") if config.get("model") else None
        data_args = config.data.get("init_args") if config.get("data") else None
        if model_args is None or data_args is None or "tokenizer" not in data_args:
            return
        if not model_args.get("tokenizer") and data_args.get("tokenizer"):
            model_args.tokenizer = data_args.tokenizer
        elif model_args.get("tokenizer") and not data_args.get("tokenizer"):
            data_args.tokenizer = model_args.tokenizer

    def _instantiate_trainer(self, config, callbacks):
        # `--trainer.enable_checkpointing=false` means no checkpoints, ours included.
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
        config["plugins"] = _with_checksums(config.get("plugins"), config.get("strategy"))
        trainer = super()._instantiate_trainer(config, callbacks)
        check_launch(trainer.num_nodes, trainer.num_devices)
        return trainer

    def _parse_ckpt_path(self) -> None:
        """As Lightning's: a --ckpt_path file's saved hyperparameters go back into the model's
        configuration. Ours first moves the flat options of a checkpoint saved before the
        option groups (lr, scheduler, export_dir, ...) into their groups, so it still resumes."""
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        class_path = hparams.pop("_class_path", None)
        hparams = regroup_options(hparams)
        model = {"class_path": class_path, "dict_kwargs": hparams} if class_path else hparams
        try:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": model}}, self.config)
        except SystemExit:
            sys.stderr.write(f"astrai-train: the hyperparameters saved in {ckpt_path} do not parse (see above)\n")
            raise

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as e:  # our constructors say which field and why
            raise UsageError(str(e)) from e


def launched_processes() -> tuple[str, int, int] | None:
    """(launcher, nodes, processes per node) when torchrun or SLURM started this process, in
    Lightning's order of detection (torchrun first: it can run inside a SLURM job); else None."""
    env = os.environ
    if TorchElasticEnvironment.detect() and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        nodes = int(env.get("GROUP_WORLD_SIZE", 0)) or world // int(env.get("LOCAL_WORLD_SIZE", world))
        return "torchrun --nnodes / --nproc-per-node", nodes, world // max(nodes, 1)
    if SLURMEnvironment.detect():
        tasks, nodes = int(env["SLURM_NTASKS"]), int(env.get("SLURM_NNODES", 1))
        return "SLURM --nodes / --ntasks-per-node", nodes, int(env.get("SLURM_NTASKS_PER_NODE", tasks // nodes))
    return None


def check_launch(num_nodes: int, devices: int) -> None:
    """Stop when the launcher started another number of processes than the trainer's flags make.

    Lightning checks this only under a DDP/FSDP strategy, and only once `fit` starts (with a
    traceback); with one device per process and no strategy given, every process of a multi-node
    launch trains alone, and all of them write the same checkpoints and export."""
    launch = launched_processes()
    if launch is None:
        return
    launcher, nodes, per_node = launch
    if (nodes, per_node) != (num_nodes, devices):
        raise UsageError(
            f"trainer.num_nodes / trainer.devices: {launcher} started {nodes} x {per_node} processes, but the "
            f"trainer has num_nodes={num_nodes}, devices={devices}; set --trainer.num_nodes={nodes} "
            f"--trainer.devices={per_node} (with --trainer.strategy=ddp or fsdp), or launch "
            f"{num_nodes} x {devices} processes"
        )


def _with_checksums(plugins, strategy) -> list:
    """The trainer's plugins plus ChecksummedCheckpointIO, unless a CheckpointIO is chosen already."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    chosen = any(isinstance(p, CheckpointIO) for p in plugins) or getattr(strategy, "_checkpoint_io", None)
    return plugins if chosen else [*plugins, ChecksummedCheckpointIO()]


def _quiet_logs() -> None:
    # Lightning's promotional tips are noise in a training log.
    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "litlogger" not in record.getMessage() and "Lightning AI" not in record.getMessage()

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def cli_main(args: list[str] | None = None, run: bool = True) -> AstraiCLI:
    """Build (and by default run) the CLI; tests call this with an argument list."""
    _quiet_logs()
    _import_data_modules()
    if args is None:
        sys.argv[1:] = expand_aliases(sys.argv[1:])
    elif isinstance(args, list):
        args = expand_aliases(args)
    return AstraiCLI(
        CausalLMModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        seed_everything_default=42,
        auto_configure_optimizers=False,  # optimizer and schedule are model options (--model.optimizer.lr, ...)
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"log_every_n_steps": 5},
        parser_kwargs={
            "description": "Train AstrAI models: pre-training (seq), SFT (sft), DPO (dpo), "
            "GRPO (grpo) and online DPO (online-dpo) with Lightning. Every option is a flag; see --print_config."
        },
    )


def main(args: list[str] | None = None) -> int:
    try:
        cli_main(args)
    except USER_ERRORS as e:
        if os.environ.get("ASTRAI_DEBUG"):
            raise
        print(f"astrai-train: error: {e}\n(set ASTRAI_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
