"""TRL's side of the GRPO throughput bench: one GRPOTrainer run, timed, written as one JSON object.

bench/grpo_throughput.py runs this script in its own subprocess (so TRL, accelerate and
transformers' generate never share a process with our trainer) on the same model directory, the
same prompts (bench/grpo_task.py) and the same settings as our GRPO, then reads RESULT.json.
TRL generates with transformers' `generate` (use_vllm=False), which is the point of the
comparison. The timing only observes (a callback and a timer around `generate`); what TRL
computes is left to TRL's defaults, recorded under "settings".

    python bench/grpo_trl.py --model DIR --data PROMPTS.jsonl --out RESULT.json \\
        [--device cuda|cpu] [--steps 4] [--warmup 1] [--prompts-per-step 64] [--group-size 8] \\
        [--max-new-tokens 256] [--micro-batch-size 16] [--lr 1e-6] [--seed 0] [--temperature 1.0]

TRL, accelerate and psutil are not in our uv environment: pip install trl==1.16.0 accelerate psutil
(pip install --no-deps --target DIR ..., then PYTHONPATH=DIR).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from grpo_task import sum_reward

try:
    import psutil  # noqa: F401  (accelerate's get_max_memory, for TRL's device_map="auto" on a GPU)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
except (ImportError, RuntimeError) as error:  # TRL raises RuntimeError when accelerate is missing
    raise SystemExit(
        f"bench/grpo_trl.py needs TRL, accelerate and psutil ({error}): pip install trl==1.16.0 accelerate psutil "
        "(or pip install --target DIR ... and PYTHONPATH=DIR:bench)"
    ) from error

SETTINGS = (
    "loss_type scale_rewards mask_truncated_completions epsilon epsilon_high delta importance_sampling_level "
    "beta num_iterations num_generations generation_batch_size steps_per_generation per_device_train_batch_size "
    "gradient_accumulation_steps max_completion_length temperature top_p top_k min_p repetition_penalty "
    "learning_rate lr_scheduler_type warmup_steps optim weight_decay adam_beta1 adam_beta2 adam_epsilon "
    "max_grad_norm bf16 gradient_checkpointing use_vllm use_transformers_continuous_batching cache_implementation "
    "shuffle_dataset disable_dropout top_entropy_quantile entropy_coef cast_lm_head_to_fp32 max_steps seed"
).split()


def reward(prompts, completions, answer, **kwargs) -> list[float]:
    """sum_reward on the completion text: TRL hands conversational completions over as
    [{"role": "assistant", "content": ...}]; answer_match wants the string."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return sum_reward(prompts, texts, answer, **kwargs)


class GenerateTimer:
    """Wraps the model's `generate` (TRL calls it once a step on the unwrapped model): seconds
    inside it, and the tokens it made, counted as TRL keeps them (up to and including the first
    EOS; the padding after it is not counted)."""

    def __init__(self, model, eos_ids: list[int], cuda: bool):
        self.generate, self.cuda = model.generate, cuda
        self.eos = torch.tensor(eos_ids)
        self.seconds = self.completion_tokens = self.prompt_tokens = self.padded_tokens = 0
        model.generate = self

    def __call__(self, *args, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.generate(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        prompt = kwargs["input_ids"]
        completion = out[:, prompt.size(1) :]
        is_eos = torch.isin(completion, self.eos.to(out.device))
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completion.size(1))
        self.completion_tokens += int(lengths.sum())
        self.prompt_tokens += int(kwargs["attention_mask"].sum())
        self.padded_tokens += out.numel()
        return out

    def totals(self) -> tuple:
        return self.seconds, self.completion_tokens, self.prompt_tokens, self.padded_tokens


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, boundary to boundary at TRL's per-step log (logging_steps=1),
    so a step holds everything the loop does for it: the batch fetch, generate, rewards,
    advantages, forward/backward, the optimizer and the logging."""

    def __init__(self, timer: GenerateTimer, cuda: bool):
        self.timer, self.cuda, self.steps = timer, cuda, []

    def _mark(self, state):
        if self.cuda:
            torch.cuda.synchronize()
        self.last = (time.perf_counter(), self.timer.totals(), state.num_input_tokens_seen)

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs:
            return
        start, before, tokens_before = self.last
        self._mark(state)
        now, after, tokens = self.last
        gen, completion, prompt, padded = (a - b for a, b in zip(after, before))
        self.steps.append(
            {
                "seconds": now - start,
                "generate_seconds": gen,
                "completion_tokens": completion,
                "trained_tokens": tokens - tokens_before,  # TRL's own count: prompt + completion, no padding
                "reward": logs["reward"],
                "prompt_tokens": prompt,
                "padded_tokens": padded,  # the [rows, prompt + completion] shape TRL trains on
                "trl_step_time": logs.get("step_time"),
            }
        )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts-per-step", type=int, default=64)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    a = p.parse_args(argv)

    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    completions = a.prompts_per_step * a.group_size
    if completions % a.micro_batch_size:
        raise SystemExit(f"--micro-batch-size {a.micro_batch_size} must divide {completions} completions a step")
    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines() if line.strip()]
    if len(rows) < a.prompts_per_step:
        raise SystemExit(f"{a.data} has {len(rows)} prompts, fewer than --prompts-per-step {a.prompts_per_step}")
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": str(r["answer"])} for r in rows]
    )

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo_trl_"),
        num_generations=a.group_size,
        per_device_train_batch_size=a.micro_batch_size,
        gradient_accumulation_steps=completions // a.micro_batch_size,
        generation_batch_size=completions,  # all prompts x group in one generate, one optimizer step
        max_completion_length=a.max_new_tokens,
        temperature=a.temperature,
        beta=0.0,
        num_iterations=1,
        learning_rate=a.lr,
        use_vllm=False,
        gradient_checkpointing=False,
        bf16=cuda,  # float32 weights (TRL loads a model path in float32) under bf16 autocast
        use_cpu=not cuda,
        max_steps=a.warmup + a.steps,
        seed=a.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # A path, as TRL users pass it: TRL loads it with AutoModelForCausalLM in float32 and the
    # tokenizer (with its chat template) with AutoProcessor, padding on the left.
    trainer = GRPOTrainer(model=a.model, reward_funcs=reward, args=config, train_dataset=dataset)
    timer = GenerateTimer(trainer.model, trainer.eos_token_ids, cuda)
    steps = StepTimer(timer, cuda)
    trainer.add_callback(steps)
    trainer.train()

    if len(steps.steps) != a.warmup + a.steps:
        raise SystemExit(f"expected {a.warmup + a.steps} logged steps, got {len(steps.steps)}")
    measured = steps.steps[a.warmup :]
    mismatch = [s for s in steps.steps if s["trained_tokens"] != s["prompt_tokens"] + s["completion_tokens"]]
    args, model = trainer.args, trainer.model
    settings = {k: getattr(getattr(args, k), "value", getattr(args, k)) for k in SETTINGS}  # enums as strings
    settings |= {
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
        "old_logprob_forward": args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations)
        != 0,
        "eos_token_ids": trainer.eos_token_ids,
        "prompts": len(rows),
    }
    result = {
        "framework": "trl",
        "version": trl.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": measured,
        "warmup_seconds": [s["seconds"] for s in steps.steps[: a.warmup]],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "weight_sync_seconds": 0.0,
        "settings": settings,
        "notes": (
            "TRL GRPOTrainer, transformers generate (no vLLM), the model path loaded by TRL in float32"
            + (" under bf16 autocast (generate too: accelerate wraps forward)" if cuda else " (CPU, no bf16)")
            + "; one generate of all prompts x group a step, then gradient_accumulation_steps micro-batches "
            "and one optimizer step; on-policy, so no separate old-logprob forward (ratio against detached "
            "logprobs), no reference model (beta 0). Step seconds run log to log: they include the batch "
            "fetch, chat templating, decoding, the reward, TRL's fused LM-head logprob+entropy forward, "
            "backward, AdamW and TRL's logging. trained_tokens is TRL's num_input_tokens_seen (prompt + "
            "completion, no padding); padded_tokens is the padded batch it trains on."
            + (f" WARNING: trained_tokens != prompt + completion tokens on {len(mismatch)} steps." if mismatch else "")
        ),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
