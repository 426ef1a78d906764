"""What every training module shares: building the model (model_source.py), LoRA, gradient
checkpointing, torch.compile, the optimizer and LR schedule, throughput/MFU logging and export
on fit end.

Batch contract (produced by astrai.train.data, consumed by the subclasses):
  labels[b, t] is the token to predict after input_ids[b, :t+1]; -100 = no target.
  seq / sft: input_ids, labels (B, T) [, position_ids (B, T) restarting at 0 per packed sample]
             [, attention_mask (B, T) 1 = token, 0 = padding]
  dpo: {chosen,rejected}_{input_ids,labels,attention_mask} (B, T) [, ref_{chosen,rejected}_logps (B,)]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from astrai.core.config import ModelConfig
from astrai.core.errors import AstraiError, require
from astrai.core.moe import MoE

from .adapter import adapter_lora_config, load_adapter
from .export import export_adapter, export_model
from .grad_accumulation import Float32Grads
from .lora import LoRAConfig, apply_lora
from .losses import IGNORE_INDEX, TokenLoss, compiled_token_loss, token_loss
from .metrics import (
    GradientSNR,
    HostCopy,
    RouterLoad,
    Throughput,
    flops_per_token,
    mfu,
    peak_flops,
    precision_dtype,
)
from .model_source import build_model, load_tokenizer
from .module_args import ExportArgs, OptimizerArgs, ScheduleArgs, as_group, plain_hparams, refuse_moved_options
from .optimizers import build_optimizer
from .schedulers import NEED_LENGTH, build_scheduler

log = logging.getLogger(__name__)

PARAM_DTYPES = ("float32", "bfloat16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class BatchError(AstraiError):
    """A batch does not follow the batch contract; the message names the key and what was expected."""


def check_batch(batch: Any, required: tuple[str, ...], owner: str) -> None:
    if not isinstance(batch, dict):
        raise BatchError(f"{owner} expects a dict batch with keys {list(required)}, got {type(batch).__name__}")
    missing = [k for k in required if k not in batch]
    if missing:
        raise BatchError(
            f"{owner}: batch is missing {missing} (it has {sorted(batch)}); "
            "see the batch contract in astrai.train.base_module"
        )
    # Tensors of one sequence (chosen_*, rejected_*, or the unprefixed ones) share one shape.
    for key in [k for k in required if k.endswith("input_ids")]:
        prefix, shape = key[: -len("input_ids")], batch[key].shape
        for name, value in batch.items():
            if name.startswith(prefix) and torch.is_tensor(value) and value.dim() == 2 and value.shape != shape:
                raise BatchError(
                    f"{owner}: batch[{name!r}] has shape {tuple(value.shape)}, expected "
                    f"{tuple(shape)} like batch[{key!r}]"
                )


def _host(value: float | torch.Tensor) -> torch.Tensor:
    return value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))


class CausalLMModule(L.LightningModule):
    """Base of PretrainModule, SFTModule and DPOModule (not used on its own).

    Args:
        model: a model directory (ours or Hugging Face Llama/Qwen2/Qwen3), a ModelConfig JSON
            file, or a mapping of ModelConfig fields; a config builds a new model whose
            vocab_size and bos/eos/pad ids come from the tokenizer.
        tokenizer: tokenizer directory, saved with the exported model; defaults to the model
            directory when that holds a tokenizer.
        optimizer: the optimizer and its settings (module_args.OptimizerArgs: name, lr,
            weight_decay, betas, eps, momentum, ns_steps); a mapping of them in Python.
        schedule: the learning-rate schedule (module_args.ScheduleArgs: name, warmup_steps,
            min_lr_ratio, decay_steps, cycle_steps, cycle_mult, decay_fraction, decay_shape).
        export: what is written when fit ends (module_args.ExportArgs: dir, on_fit_end, dtype,
            adapter, adapter_dir).
        lora: LoRA adapters (rank, alpha, dropout, targets); only the adapters train; export merges them.
        adapter: an adapter directory saved by export.adapter (or a PEFT LoRA adapter) to put
            on `model` (its base) and train on from there; its config is the LoRA config (a
            `lora` given too may change only the dropout).
        gradient_checkpointing: recompute each block's activations in backward (less memory).
        compile: torch.compile the model, and the token loss and per-token log-probs (so the
            float32 softmax is fused into the cross-entropy kernels instead of materialising
            float32 logits).
        compile_mode: torch.compile's mode for the model: "default", "reduce-overhead" (CUDA
            graphs: less launch overhead for small batches, more memory), "max-autotune"
            (autotuned Triton matmuls and CUDA graphs; long compile) or
            "max-autotune-no-cudagraphs". The token loss stays in "default" mode (its shapes
            change with every batch's number of labelled tokens in the chunked path, and
            CUDA graphs would record each). Needs compile: true.
        param_dtype: dtype of the model's weights. "float32" (default): float32 weights, which
            precision "bf16-mixed" casts to bf16 for every matmul. "bfloat16" (opt-in, for speed
            and memory, use with precision "bf16-mixed"): the weights are bf16, so forward and
            backward run on them directly and gradients are bf16; AdamW then keeps a float32
            master copy and float32 moments of every weight (MasterWeightAdamW, the Megatron-LM
            recipe) so small updates are not rounded away. Differences from "float32": the
            residual stream and the norm gains are bf16 (RMSNorm still normalises in float32),
            gradients are bf16, the export is bf16. With accumulate_grad_batches > 1 the
            micro-batches' gradients are summed in float32 and rounded to bf16 once per step
            (grad_accumulation.py; not under FSDP). Not with optimizer.name "muon" (no master weights).
        peak_flops: the device's peak FLOP/s for MFU; default from Lightning's table of GPUs (none on CPU).
        log_grad_snr: log train/grad_snr/<group> (decay, no_decay, muon) and train/grad_snr: the
            gradients' signal-to-noise ratio across the micro-batches of each optimizer step
            (metrics.GradientSNR). Needs two or more micro-batches a step
            (trainer.accumulate_grad_batches x devices); not with FSDP, fp16 or GRPO.
        log_router_load: log, per MoE layer, each expert's share of the routed tokens
            (train/router/layer<i>/expert<e>), its coefficient of variation (.../cv, 0 = even)
            and the Switch balance term (.../balance, 1 = even) (metrics.RouterLoad). MoE models
            with seq, sft or dpo.
        **moved: the flat options of before the groups (lr, scheduler, export_dir, ...) are
            refused with an error naming their new place (module_args.MOVED_OPTIONS).
    """

    def __init__(
        self,
        model: str | dict[str, Any],
        tokenizer: str | None = None,
        *,
        optimizer: OptimizerArgs = OptimizerArgs(),  # noqa: B008 (frozen: one shared default is safe)
        schedule: ScheduleArgs = ScheduleArgs(),  # noqa: B008
        export: ExportArgs = ExportArgs(),  # noqa: B008
        lora: LoRAConfig | dict | None = None,
        adapter: str | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default",
        param_dtype: Literal["float32", "bfloat16"] = "float32",
        peak_flops: float | None = None,
        log_grad_snr: bool = False,
        log_router_load: bool = False,
        **moved: Any,
    ):
        super().__init__()
        refuse_moved_options(moved)
        if param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype must be one of {PARAM_DTYPES}, got {param_dtype!r}")
        require(
            compile_mode in COMPILE_MODES, "model.compile_mode", f"must be one of {COMPILE_MODES}, got {compile_mode!r}"
        )
        require(
            compile or compile_mode == "default",
            "model.compile_mode",
            f"is {compile_mode!r} but model.compile is false; set model.compile: true to compile the model",
        )
        self.optimizer_args = as_group(OptimizerArgs, optimizer, "optimizer")
        self.schedule_args = as_group(ScheduleArgs, schedule, "schedule")
        self.export_args = as_group(ExportArgs, export, "export")
        self.save_hyperparameters()
        plain_hparams(self.hparams, optimizer=self.optimizer_args, schedule=self.schedule_args, export=self.export_args)
        if tokenizer is None and isinstance(model, str) and (Path(model) / "tokenizer.json").is_file():
            tokenizer = self.hparams.tokenizer = model
        self.tokenizer = load_tokenizer(tokenizer)
        self.model = build_model(model, self.tokenizer)
        if isinstance(lora, dict):  # from Python code; the CLI builds the dataclass itself
            lora = LoRAConfig(**lora)
        if adapter is not None:
            lora = adapter_lora_config(adapter, lora)
        require(
            lora is not None or not self.export_args.adapter,
            "model.export.adapter",
            "needs LoRA adapters to save; set model.lora (or model.adapter), or drop model.export.adapter",
        )
        self.lora_config = lora
        if lora is not None:
            apply_lora(self.model, lora)
        if adapter is not None:
            load_adapter(self.model, adapter, lora)
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        require(
            not log_router_load or any(isinstance(m, MoE) for m in self.model.modules()),
            "model.log_router_load",
            "is set but the model has no MoE layers (ffn_type: moe); drop log_router_load",
        )
        self._grad_snr: GradientSNR | None = None
        self._router_load: RouterLoad | None = None
        # Taken before any strategy wraps the model (FSDP flattens parameters); see build_optimizer.
        self._param_shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        self._throughput = Throughput()
        self._shown: dict[str, HostCopy] = {}  # progress-bar values, see show()
        self._flops_per_token: dict[int, float] = {}
        self._peak_flops: float | None = None
        self._checked: set[str] = set()
        self._float32_grads: Float32Grads | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def forward(self, input_ids, position_ids=None, attention_mask=None) -> torch.Tensor:
        return self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask)

    # -- Lightning hooks ---------------------------------------------------------------
    def configure_model(self) -> None:
        if self.hparams.param_dtype == "bfloat16":
            # Here, before any strategy wraps the model: DDP sizes its gradient buckets by
            # parameter dtype. Buffers (RoPE frequencies) stay float32.
            for p in self.model.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
        # nn.Module.compile compiles in place, so parameter names (and checkpoints) are unchanged.
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.model.compile(mode=self.hparams.compile_mode)
            self._compiled = True

    def configure_optimizers(self):
        opt, sched = self.optimizer_args, self.schedule_args
        self._float32_grads = self.float32_grads_for(self.accumulated_backwards())
        optimizer = build_optimizer(
            self.model,
            opt.name,
            lr=opt.lr,
            weight_decay=opt.weight_decay,
            betas=opt.betas,
            eps=opt.eps,
            momentum=opt.momentum,
            ns_steps=opt.ns_steps,
            shapes=self._param_shapes,
        )
        self._watch(optimizer)
        scheduler = build_scheduler(
            optimizer,
            sched.name,
            warmup_steps=sched.warmup_steps,
            total_steps=self._schedule_length(),
            min_lr_ratio=sched.min_lr_ratio,
            cycle_steps=sched.cycle_steps,
            cycle_mult=sched.cycle_mult,
            decay_fraction=sched.decay_fraction,
            decay_shape=sched.decay_shape,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _watch(self, optimizer) -> None:
        """Hooks of the opt-in gradient-SNR and router-load metrics (see log_grad_snr, log_router_load)."""
        for old in (self._grad_snr, self._router_load):
            if old is not None:
                old.remove()
        self._grad_snr = self._router_load = None
        h = self.hparams
        for field in ("log_grad_snr", "log_router_load"):
            require(
                not h.get(field) or self.automatic_optimization,
                f"model.{field}",
                f"is not supported by {type(self).__name__} (it optimises several times per batch); "
                "use it with seq, sft or dpo",
            )
        if h.get("log_router_load"):
            self._router_load = RouterLoad(self.model)
        if not h.get("log_grad_snr"):
            return
        trainer = self._trainer
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        world = trainer.world_size if trainer is not None else 1
        require(
            accumulate * world >= 2,
            "model.log_grad_snr",
            "compares the micro-batches of an optimizer step, and this run has one; set "
            "trainer.accumulate_grad_batches >= 2 (or train on several devices)",
        )
        if trainer is not None:
            require(
                "FSDP" not in type(trainer.strategy).__name__,
                "model.log_grad_snr",
                "does not support FSDP (each rank holds shards of the gradients); use DDP or one device",
            )
            require(
                not str(trainer.precision).startswith("16"),
                "model.log_grad_snr",
                f"does not support precision {trainer.precision!r} (the loss scaler scales the "
                "micro-batch gradients); use bf16-mixed or 32-true",
            )
        self._grad_snr = GradientSNR(optimizer)

    def accumulated_backwards(self) -> str | None:
        """The setting that makes several backward passes add into one optimizer step, if any
        (GRPO overrides this for its micro-batches)."""
        accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        return f"trainer.accumulate_grad_batches ({accumulate})" if accumulate > 1 else None

    def float32_grads_for(self, accumulating: str | None) -> Float32Grads | None:
        """A float32 gradient sum when bf16 weights accumulate several backward passes."""
        if self.hparams.param_dtype != "bfloat16" or accumulating is None:
            return None
        if self._trainer is not None and "FSDP" in type(self._trainer.strategy).__name__:
            raise ValueError(
                f"param_dtype: bfloat16 with {accumulating} under FSDP: the float32 gradient sum "
                "does not handle sharded gradients; use param_dtype: float32, or no accumulation"
            )
        return Float32Grads([p for p in self.model.parameters() if p.requires_grad])

    def on_after_backward(self) -> None:
        # Manual optimisation (GRPO) collects at its own micro-batch boundaries.
        if self._float32_grads is not None and self.automatic_optimization:
            self._float32_grads.collect()
        if self._grad_snr is not None:
            self._grad_snr.backwards += 1

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._float32_grads is not None:
            self._float32_grads.release(self.average_over_ranks)
        if self._grad_snr is not None:  # before clipping, which Lightning does next
            strategy = self.trainer.strategy
            snr = self._grad_snr.compute(
                strategy.world_size,
                (lambda t: strategy.reduce(t, reduce_op="sum")) if strategy.world_size > 1 else None,
            )
            for name, value in (snr or {}).items():
                self.log("train/grad_snr" if name == "total" else f"train/grad_snr/{name}", value, batch_size=1)

    def average_over_ranks(self, tensor: torch.Tensor) -> None:
        """tensor <- its mean over the data-parallel ranks, in place (no-op on one process)."""
        strategy = self.trainer.strategy
        if strategy.world_size > 1:
            tensor.copy_(strategy.reduce(tensor, reduce_op="mean"))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """The Trainer's gradient_clip_val, also under FSDP (whose precision plugin refuses norm
        clipping: each rank holds a shard of every gradient, so the norm must be reduced across
        ranks, which FullyShardedDataParallel.clip_grad_norm_ on the root module does)."""
        algorithm = str(gradient_clip_algorithm or "norm").lower()
        root = self._fsdp_root()
        if root is None or not gradient_clip_val or algorithm != "norm":  # by value is elementwise: shards are fine
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        root.clip_grad_norm_(gradient_clip_val)

    def clip_grad_norm(self, optimizer, max_norm: float) -> None:
        """Clip the gradients' total norm to max_norm (for manual optimisation, e.g. GRPO), under
        FSDP through the root module as in configure_gradient_clipping."""
        root = self._fsdp_root()
        if root is None:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        else:
            root.clip_grad_norm_(max_norm)

    def _fsdp_root(self):
        """The FullyShardedDataParallel wrapping this module, when the strategy shards it."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = getattr(self._trainer.strategy, "model", None) if self._trainer is not None else None
        return wrapped if isinstance(wrapped, FullyShardedDataParallel) else None

    def _schedule_length(self) -> int | None:
        if self.schedule_args.decay_steps:
            return self.schedule_args.decay_steps
        if self.schedule_args.name not in NEED_LENGTH:
            return None
        if self.trainer.max_steps > 0:
            # Preferred over estimated_stepping_batches, which builds the train dataloader before
            # the checkpoint is restored and so loses a resumable loader's position.
            return self.trainer.max_steps
        return int(self.trainer.estimated_stepping_batches)

    def on_fit_start(self) -> None:
        self._peak_flops = self.hparams.peak_flops or peak_flops(self.device, precision_dtype(self.trainer.precision))

    def on_fit_end(self) -> None:
        if self.export_args.on_fit_end:
            path = export_model(self, self.export_path(), self.trainer)
            if path is not None:
                log.info("exported the model to %s", path)
        if self.export_args.adapter:
            path = export_adapter(self, self.adapter_path(), self.trainer)
            if path is not None:
                log.info("saved the LoRA adapter to %s", path)

    def adapter_path(self) -> Path:
        if self.export_args.adapter_dir:
            return Path(self.export_args.adapter_dir)
        return Path(self.trainer.default_root_dir) / "adapter"

    def export_path(self) -> Path:
        if self.export_args.dir:
            return Path(self.export_args.dir)
        return Path(self.trainer.default_root_dir) / "export"

    # -- helpers for the subclasses ----------------------------------------------------
    def check_once(self, batch: Any, required: tuple[str, ...], stage: str) -> None:
        """Check a batch's keys, shapes and token-id range on the first batch of each stage
        (the range check syncs with the device, too costly for every step)."""
        check_batch(batch, required, type(self).__name__)
        if stage in self._checked:
            return
        self._checked.add(stage)
        vocab = self.config.vocab_size
        for key, value in batch.items():
            if not key.endswith(("input_ids", "labels")):
                continue
            ids = value[value != IGNORE_INDEX] if key.endswith("labels") else value
            bad = ids[(ids < 0) | (ids >= vocab)]
            if bad.numel():
                raise BatchError(
                    f"{type(self).__name__}: batch[{key!r}] holds token id {int(bad[0])}, outside "
                    f"the model's vocabulary 0..{vocab - 1}; was the data tokenised with "
                    "another tokenizer?"
                )

    def token_loss(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> TokenLoss:
        """losses.token_loss, compiled when the model is (see losses.compiled_token_loss)."""
        fn = compiled_token_loss() if self.hparams.compile else token_loss
        return fn(logits, labels, label_smoothing)

    # Host-side numbers are logged as CPU tensors: Lightning turns a Python number into a tensor
    # on the module's device, a blocking copy that waits for every queued kernel, each step.
    def log_throughput(self, tokens: int, seq_len: int) -> None:
        """Log tokens/s (all devices) and MFU for a training batch of ``tokens`` tokens.

        Timed on the host clock without synchronising: the host runs at most a few steps ahead
        of the device, a constant lead that cancels out over the throughput's window.
        """
        per_device = self._throughput.update(tokens)
        if per_device is None:
            return
        if seq_len not in self._flops_per_token:
            self._flops_per_token[seq_len] = flops_per_token(self.model, self.config, seq_len)
        self.log("train/tokens_per_sec", _host(per_device * self.trainer.world_size), batch_size=1)
        util = mfu(per_device, self._flops_per_token[seq_len], self._peak_flops)
        if util is not None:
            self.log("train/mfu", _host(util), batch_size=1)

    def log_train_loss(self, loss: torch.Tensor) -> None:
        """train/loss for the loggers (averaged over ranks under DDP/FSDP, so the curve is the
        global batch's, as on one device), and "loss" for the progress bar: this rank's loss of
        a step or so ago, copied to the host without waiting (see HostCopy)."""
        self.log("train/loss", loss.detach(), batch_size=1, sync_dist=True)
        self.show("loss", loss)

    def show(self, name: str, value: torch.Tensor) -> None:
        """Put a training-step value on the progress bar (only): this rank's value of a step or
        so ago, copied to the host without waiting (HostCopy). A device tensor logged with
        prog_bar=True would make the host wait for the device every step."""
        shown = self._shown.setdefault(name, HostCopy()).push(value)
        if shown is not None:
            self.log(name, shown, prog_bar=True, logger=False, batch_size=1)

    def log_lr(self) -> None:
        self.log("train/lr", _host(self.trainer.optimizers[0].param_groups[0]["lr"]), batch_size=1)

    def add_aux_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Add the MoE load-balancing loss of the last forward (0 for dense models)."""
        aux = self.model.aux_loss()
        if self._router_load is not None:
            for name, value in self._router_load.metrics().items():
                self.log(f"train/router/{name}", value, batch_size=1)
        if torch.is_tensor(aux):
            self.log("train/aux_loss", aux.detach(), batch_size=1)
            return loss + aux
        return loss
