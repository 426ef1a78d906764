"""The training modules' grouped options: optimizer, LR schedule and export, each a small
dataclass documented field by field (as litgpt groups its arguments).

A training YAML nests them under the model (`model.init_args.optimizer.lr`), the command line
names them `--model.optimizer.lr`, and `--help` / `--print_config` show each field's text from
the docstrings below. Each group checks its own fields when built and names a bad one by its
full path (model.optimizer.lr). The options used to be flat (`model.lr`, `model.scheduler`,
`model.export_dir`); MOVED_OPTIONS maps each old name to its new place, so an old config fails
with a message saying where the option went (`moved_option_error`), in YAML, on the command
line and in Python alike. LoRA's group is astrai.train.lora.LoRAConfig.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from astrai.core.errors import AstraiError, require_for

from .optimizers import OPTIMIZERS
from .schedulers import DECAY_SHAPES, SCHEDULERS

EXPORT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class OptimizerArgs:
    """The optimizer (model.optimizer).

    Args:
        name: "adamw" (fused on CUDA; MasterWeightAdamW with param_dtype "bfloat16") or "muon"
            (Muon for the hidden 2-D weights, AdamW for the embedding, the head, norms and biases).
        lr: peak learning rate (the schedule scales it).
        weight_decay: decoupled weight decay, on weight matrices only (not on norms or biases).
        betas: AdamW's decay rates of the first and second moments.
        eps: AdamW's term added to the denominator.
        momentum: Muon's momentum.
        ns_steps: Muon's Newton-Schulz iterations per update.
    """

    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.95
    ns_steps: int = 5

    def __post_init__(self) -> None:
        check = require_for("model.optimizer")
        check(self.name in OPTIMIZERS, "name", f"must be one of {OPTIMIZERS}, got {self.name!r}")
        check(_number(self.lr) and self.lr >= 0, "lr", f"must be a number >= 0, got {self.lr!r}")
        check(
            _number(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay",
            f"must be a number >= 0, got {self.weight_decay!r}",
        )
        check(
            len(self.betas) == 2 and all(_number(b) and 0 <= b < 1 for b in self.betas),
            "betas",
            f"must be two numbers in [0, 1), e.g. [0.9, 0.95], got {self.betas!r}",
        )
        object.__setattr__(self, "betas", tuple(self.betas))  # a YAML list; AdamW's state_dict holds a tuple
        check(_number(self.eps) and self.eps > 0, "eps", f"must be a number > 0, got {self.eps!r}")
        check(
            _number(self.momentum) and 0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum!r}"
        )
        check(
            isinstance(self.ns_steps, int) and self.ns_steps >= 1,
            "ns_steps",
            f"must be a positive integer, got {self.ns_steps!r}",
        )


@dataclass(frozen=True)
class ScheduleArgs:
    """The learning-rate schedule, stepped once per optimizer step (model.schedule).

    Args:
        name: "cosine" (warmup, then one cosine down to min_lr_ratio * lr at decay_steps),
            "sgdr" (warmup, then cosine cycles of cycle_steps, each cycle_mult times longer,
            restarting at the full lr), "constant" (warmup, then flat) or "wsd" (warmup, flat,
            then over the last decay_fraction of the steps a decay of decay_shape down to
            min_lr_ratio * lr; schedulers.WarmupStableDecay).
        warmup_steps: linear warmup length in optimizer steps.
        min_lr_ratio: where cosine, sgdr and wsd end, as a share of lr.
        decay_steps: length of the cosine or of the whole wsd schedule; default
            trainer.max_steps (or the estimated number of steps of an epoch-based run).
        cycle_steps: sgdr only: the length of the first cycle (required for sgdr).
        cycle_mult: sgdr only: each cycle is this many times longer than the one before.
        decay_fraction: wsd only: the share of the steps that decay (0.2: the last 20%).
        decay_shape: wsd only: the decay's shape, "linear", "cosine" or "1-sqrt".
    """

    name: Literal["cosine", "sgdr", "constant", "wsd"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None
    cycle_steps: int | None = None
    cycle_mult: float = 1.0
    decay_fraction: float = 0.2
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"

    def __post_init__(self) -> None:
        check = require_for("model.schedule")
        check(self.name in SCHEDULERS, "name", f"must be one of {SCHEDULERS}, got {self.name!r}")
        check(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            "warmup_steps",
            f"must be an integer >= 0, got {self.warmup_steps!r}",
        )
        check(
            _number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1,
            "min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio!r}",
        )
        for name in ("decay_steps", "cycle_steps"):
            value = getattr(self, name)
            check(
                value is None or (isinstance(value, int) and value >= 1),
                name,
                f"must be a positive integer or null, got {value!r}",
            )
        check(self.name != "sgdr" or self.cycle_steps, "cycle_steps", "is needed by the sgdr schedule; set it (> 0)")
        check(_number(self.cycle_mult) and self.cycle_mult >= 1, "cycle_mult", f"must be >= 1, got {self.cycle_mult!r}")
        check(
            _number(self.decay_fraction) and 0 < self.decay_fraction <= 1,
            "decay_fraction",
            f"must be in (0, 1] (the share of the steps spent decaying), got {self.decay_fraction!r}",
        )
        check(
            self.decay_shape in DECAY_SHAPES, "decay_shape", f"must be one of {DECAY_SHAPES}, got {self.decay_shape!r}"
        )


@dataclass(frozen=True)
class ExportArgs:
    """What is written when fit ends (model.export). The Trainer-level `export:` section
    (every_n_train_steps, keep_last) adds exports during the run.

    Args:
        dir: where the model directory (config.json, model.safetensors, tokenizer; LoRA merged)
            goes; default <trainer.default_root_dir>/export.
        on_fit_end: export the model when fit ends.
        dtype: dtype of the exported weights ("float32", "bfloat16" or "float16"); default: as trained.
        adapter: also write the LoRA adapter alone (adapter_config.json and
            adapter_model.safetensors, PEFT layout; astrai.train.adapter) to adapter_dir. Needs
            model.lora (or model.adapter).
        adapter_dir: where the adapter goes; default <trainer.default_root_dir>/adapter.
    """

    dir: str | None = None
    on_fit_end: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    adapter: bool = False
    adapter_dir: str | None = None

    def __post_init__(self) -> None:
        check = require_for("model.export")
        check(
            self.dtype is None or self.dtype in EXPORT_DTYPES,
            "dtype",
            f"must be one of {EXPORT_DTYPES} or null, got {self.dtype!r}",
        )


_GROUPS = {"optimizer": OptimizerArgs, "schedule": ScheduleArgs, "export": ExportArgs}
_SCHEDULE_FIELDS = ("warmup_steps", "min_lr_ratio", "decay_steps", "cycle_steps", "cycle_mult", "decay_fraction")
# The flat options of before the groups, and where each one went (under model.).
MOVED_OPTIONS = {
    **{name: f"optimizer.{name}" for name in ("lr", "weight_decay", "betas", "eps", "momentum", "ns_steps")},
    "scheduler": "schedule.name",
    **{name: f"schedule.{name}" for name in (*_SCHEDULE_FIELDS, "decay_shape")},
    "export_dir": "export.dir",
    "export_on_fit_end": "export.on_fit_end",
    "export_dtype": "export.dtype",
    "export_adapter": "export.adapter",
    "adapter_dir": "export.adapter_dir",
}
# Groups whose old flat option of the same name held a single value (optimizer: muon).
GROUP_NAMES = {"optimizer": "optimizer.name"}


def moved_option_error(old: str, where: str = "") -> AstraiError:
    """The error for the flat option `old` (a key of MOVED_OPTIONS, or `optimizer` given a
    name), e.g. "model.lr moved to model.optimizer.lr ..."; `where` prefixes the source."""
    new = MOVED_OPTIONS.get(old) or GROUP_NAMES[old]
    group, _, field = new.partition(".")
    prefix = f"{where}: " if where else ""
    if old in GROUP_NAMES:
        said = f"model.{old} is a group of options now: its name moved to model.{new}"
    else:
        said = f"model.{old} moved to model.{new}"
    return AstraiError(
        f"{prefix}{said} (optimizer, schedule and export options are grouped); in YAML nest it under "
        f"model's init_args as `{group}: {{{field}: ...}}`, on the command line write --model.{new}=..., "
        f"in Python pass {group}={_GROUPS[group].__name__}({field}=...)"
    )


def regroup_options(hparams: dict[str, Any]) -> dict[str, Any]:
    """Saved hyperparameters with the flat options of before the groups (a checkpoint of an older
    version) moved into their groups: {"lr": 1e-3} -> {"optimizer": {"lr": 1e-3}}. Used where
    the values come from a file we wrote, not from a user, who gets moved_option_error instead."""
    out = dict(hparams)
    for old, group in GROUP_NAMES.items():  # `optimizer: muon`: the group's old single value
        if isinstance(out.get(old), str):
            out[old] = {group.partition(".")[2]: out[old]}
    for old, new in MOVED_OPTIONS.items():
        if old in out:
            group, _, field = new.partition(".")
            value = out.pop(old)
            out[group] = {**(out.get(group) or {}), field: value}
    return out


def refuse_moved_options(options: dict[str, Any]) -> None:
    """Keyword arguments a training module did not take: an option that moved raises its
    moved_option_error; anything else the TypeError Python would have raised."""
    for name in options:
        if name in MOVED_OPTIONS:
            raise moved_option_error(name)
    if options:
        raise TypeError(f"got an unexpected keyword argument {next(iter(options))!r}")


Group = TypeVar("Group", OptimizerArgs, ScheduleArgs, ExportArgs)


def as_group(cls: type[Group], value: Group | dict[str, Any] | None, option: str) -> Group:
    """model.<option> as a `cls` (LightningCLI builds one; Python callers may pass a dict or None)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if option in GROUP_NAMES and isinstance(value, str):
        raise moved_option_error(option)
    if not isinstance(value, dict):
        raise AstraiError(f"model.{option} must be a mapping of {cls.__name__} fields, got {value!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise AstraiError(f"model.{option} has no option {unknown}; its options are {fields}")
    return cls(**value)


def plain_hparams(hparams: dict[str, Any], **groups: object) -> None:
    """Put the resolved `groups` (optimizer=OptimizerArgs(...), ...) into a module's hparams and
    turn every dataclass there into a dict, in place: a resumed run loads the checkpoint's hparams
    with weights_only=True, which refuses other classes (and LightningCLI parses them back into
    the config)."""
    hparams.update(groups)
    for name, value in list(hparams.items()):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            hparams[name] = dataclasses.asdict(value)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
