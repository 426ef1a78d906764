"""`astrai-quickstart`: the whole life of a tiny bilingual model in one command, on a CPU.

    data -> tokenizer -> pre-training -> SFT -> DPO -> GRPO -> a model directory astrai-serve serves

Every training stage runs through `astrai-train` (LightningCLI) with the YAML files in
configs/quickstart/, exactly as a user would run them by hand; this script only fills in the
paths under --out, scales the step counts, and measures each stage before and after:

- pre-training: validation loss (nats per token) on unseen text;
- SFT: exact-match accuracy of greedy answers to held-out questions (sums never asked
  about in SFT; the facts were only read during pre-training);
- DPO: reward accuracy on held-out preference pairs (chosen reward > rejected reward);
- GRPO: mean reward of replies sampled for the held-out questions (right answer + closeness
  to the reference reply).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .corpus import Question, is_correct, load_questions, write_corpus

STAGES = 6
SMOKE = {"scale": 0.04, "docs": 400}


def default_configs() -> Path:
    """configs/quickstart of the working directory, else of the repository holding this file."""
    for root in (Path.cwd(), *Path(__file__).resolve().parents):
        candidate = root / "configs" / "quickstart"
        if (candidate / "pretrain.yaml").is_file():
            return candidate
    return Path("configs/quickstart")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="astrai-quickstart",
        description=__doc__.split("\n\n")[0] + " Generates a bilingual corpus and task data (no download), "
        "trains a tokenizer, pre-trains a ~1M-parameter model, fine-tunes it with SFT, DPO and GRPO, and prints "
        "what each stage improved. About 5 minutes on a 2-core CPU.",
        epilog="Each stage is an ordinary `astrai-train fit --config configs/quickstart/<stage>.yaml` run; "
        "the exported model directory can be served with `astrai-serve --model <out>/grpo/export`.",
    )
    parser.add_argument("--out", default="runs/quickstart", help="output directory (default: %(default)s)")
    parser.add_argument("--configs", default=None,
                        help="directory with tokenizer/pretrain/sft/dpo/grpo.yaml and model.json (default: configs/quickstart)")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every stage's training steps (e.g. 0.5 for a faster, weaker run)")
    parser.add_argument("--docs", type=int, default=4000, help="pre-training documents to generate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data and of training")
    parser.add_argument("--smoke", action="store_true",
                        help=f"a seconds-long check of the chain (steps x{SMOKE['scale']}, {SMOKE['docs']} documents); "
                        "its numbers mean nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


class Quickstart:
    def __init__(self, args: argparse.Namespace) -> None:
        self.out = Path(args.out).resolve()
        self.configs = Path(args.configs).resolve() if args.configs else default_configs().resolve()
        for name in ("tokenizer.yaml", "pretrain.yaml", "sft.yaml", "dpo.yaml", "grpo.yaml", "model.json"):
            if not (self.configs / name).is_file():
                raise FileNotFoundError(f"--configs: {self.configs} has no {name}")
        self.scale = SMOKE["scale"] if args.smoke else args.steps_scale
        if self.scale <= 0:
            raise ValueError(f"--steps-scale must be > 0, got {self.scale}")
        self.docs = SMOKE["docs"] if args.smoke else args.docs
        self.seed, self.quiet = args.seed, args.quiet
        self.data = self.out / "data"
        self.tokenizer = self.out / "tokenizer"
        self.cache = self.out / "cache"
        self.results: dict[str, Any] = {"out": str(self.out)}
        self.t0 = time.time()

    # ---- helpers ------------------------------------------------------------------------

    def banner(self, n: int, text: str) -> None:
        print(f"\n[{n}/{STAGES}] {text}   (t = {time.time() - self.t0:.0f} s)", flush=True)

    def export(self, stage: str) -> Path:
        return self.out / stage / "export"

    def cli(self, command: str, stage: str, overrides: dict[str, Any]) -> dict[str, float]:
        """Run `astrai-train <command> --config <stage>.yaml --key=value ...` in this process;
        returns the metrics the trainer ended with."""
        from .cli import cli_main

        args = [command, f"--config={self.configs / f'{stage}.yaml'}", f"--seed_everything={self.seed}"]
        args += [f"--{key}={value}" for key, value in overrides.items()]
        if self.quiet or command != "fit":
            args.append("--trainer.enable_progress_bar=false")
        if command != "fit":
            args.append("--verbose=false")  # we print the one number that matters
        argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees our own flags
        try:
            cli = cli_main(args)
        finally:
            sys.argv = argv
        return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}

    def stage_overrides(self, stage: str, data: dict[str, Path]) -> dict[str, Any]:
        """Paths under --out and step counts scaled by --steps-scale."""
        config = yaml.safe_load((self.configs / f"{stage}.yaml").read_text(encoding="utf-8"))
        trainer, model = config.get("trainer", {}), config["model"].get("init_args", {})
        steps = max(2, round(trainer.get("max_steps", 100) * self.scale))
        interval = min(steps, trainer.get("val_check_interval", steps))  # a short run validates once, at its end
        overrides: dict[str, Any] = {
            "trainer.max_steps": steps,
            "trainer.val_check_interval": interval,
            "trainer.default_root_dir": self.out / stage,
            "model.warmup_steps": min(steps // 2, round(model.get("warmup_steps", 0) * self.scale)),
            "model.export_dir": self.export(stage),
            "data.tokenizer": self.tokenizer,
            "data.cache_dir": self.cache,
        }
        overrides.update({f"data.{k}": v for k, v in data.items()})
        return overrides

    # ---- stages -------------------------------------------------------------------------

    def make_data(self) -> None:
        self.banner(1, f"generating the bilingual corpus and task data ({self.docs} documents)")
        for stage in ("pretrain", "sft", "dpo", "grpo"):  # a rerun starts these from scratch
            shutil.rmtree(self.out / stage, ignore_errors=True)
        self.files = write_corpus(self.data, seed=self.seed, n_docs=self.docs)
        for name, path in self.files.items():
            print(f"  {name:15s} {path}")

    def train_tokenizer(self) -> None:
        from astrai.core.tokenizer_trainer import train_tokenizer

        config = yaml.safe_load((self.configs / "tokenizer.yaml").read_text(encoding="utf-8"))
        self.banner(2, f"training a byte-level BPE tokenizer (vocab {config['vocab_size']})")
        tok = train_tokenizer([self.files["tokenizer_text"]], vocab_size=config["vocab_size"],
                              min_frequency=config.get("min_frequency", 2), out_dir=self.tokenizer,
                              text_field=config.get("text_field", "text"), show_progress=not self.quiet)
        print(f"  {tok.vocab_size} tokens -> {self.tokenizer}")

    def pretrain(self) -> None:
        overrides = self.stage_overrides("pretrain", {"train": self.files["pretrain_train"],
                                                      "val": self.files["pretrain_val"]})
        self.banner(3, f"pre-training ({overrides['trainer.max_steps']} steps)")
        evaluate = {**overrides, "trainer.logger": False, "model.model": self.configs / "model.json"}
        before = self.cli("validate", "pretrain", evaluate)["val/loss"]
        self.cli("fit", "pretrain", {**overrides, "model.model": self.configs / "model.json"})
        after = self.cli("validate", "pretrain", {**evaluate, "model.model": self.export("pretrain")})["val/loss"]
        self.results["pretrain"] = {"val_loss_before": before, "val_loss_after": after,
                                    "export": str(self.export("pretrain"))}
        print(f"  validation loss {before:.3f} -> {after:.3f}")

    def sft(self) -> None:
        overrides = self.stage_overrides("sft", {"train": self.files["sft_train"], "val": self.files["sft_val"]})
        self.banner(4, f"supervised fine-tuning ({overrides['trainer.max_steps']} steps)")
        questions = load_questions(self.files["sft_heldout"])
        before, _ = task_accuracy(self.export("pretrain"), questions)
        self.cli("fit", "sft", {**overrides, "model.model": self.export("pretrain")})
        after, replies = task_accuracy(self.export("sft"), questions)
        self.results["sft"] = {"accuracy_before": before, "accuracy_after": after, "n_questions": len(questions),
                               "export": str(self.export("sft"))}
        print(f"  held-out accuracy {before:.2f} -> {after:.2f}; for example:")
        for q, reply in _examples(questions, replies):
            print(f"    {q.prompt!r} -> {reply!r}" + ("" if is_correct(reply, q) else f"   (expected {q.reference!r})"))

    def dpo(self) -> None:
        overrides = self.stage_overrides("dpo", {"train": self.files["dpo_train"], "val": self.files["dpo_val"]})
        self.banner(5, f"DPO ({overrides['trainer.max_steps']} steps)")
        evaluate = {**overrides, "trainer.logger": False, "model.model": self.export("sft")}
        before = self.cli("validate", "dpo", evaluate)["val/reward_acc"]
        self.cli("fit", "dpo", {**overrides, "model.model": self.export("sft")})
        after = self.cli("validate", "dpo", {**evaluate, "model.model": self.export("dpo"),
                                             "model.reference_model": self.export("sft")})["val/reward_acc"]
        questions = load_questions(self.files["sft_heldout"])
        accuracy, _ = task_accuracy(self.export("dpo"), questions)
        self.results["dpo"] = {"reward_acc_before": before, "reward_acc_after": after,
                               "accuracy_after": accuracy, "export": str(self.export("dpo"))}
        print(f"  held-out reward accuracy {before:.2f} -> {after:.2f}")

    def grpo(self) -> None:
        overrides = self.stage_overrides("grpo", {"train": self.files["grpo_train"], "val": self.files["grpo_val"]})
        self.banner(6, f"GRPO ({overrides['trainer.max_steps']} steps of replies sampled by the inference engine)")
        evaluate = {**overrides, "trainer.logger": False, "model.model": self.export("dpo")}
        before = self.cli("validate", "grpo", evaluate)["val/reward"]
        self.cli("fit", "grpo", {**overrides, "model.model": self.export("dpo"), "trainer.limit_val_batches": 0})
        after = self.cli("validate", "grpo", {**evaluate, "model.model": self.export("grpo")})["val/reward"]
        accuracy, _ = task_accuracy(self.export("grpo"), load_questions(self.files["sft_heldout"]))
        self.results["grpo"] = {"reward_before": before, "reward_after": after, "accuracy_after": accuracy,
                                "export": str(self.export("grpo"))}
        print(f"  held-out mean reward {before:.3f} -> {after:.3f}")

    def report(self) -> None:
        r = self.results
        self.results["seconds"] = round(time.time() - self.t0, 1)
        rows = [
            ("pre-training", "validation loss (nats/token, lower is better)",
             r["pretrain"]["val_loss_before"], r["pretrain"]["val_loss_after"]),
            ("SFT", f"held-out task accuracy ({r['sft']['n_questions']} questions)",
             r["sft"]["accuracy_before"], r["sft"]["accuracy_after"]),
            ("DPO", "held-out reward accuracy (chosen > rejected)",
             r["dpo"]["reward_acc_before"], r["dpo"]["reward_acc_after"]),
            ("after DPO", "held-out task accuracy", r["sft"]["accuracy_after"], r["dpo"]["accuracy_after"]),
            ("GRPO", "held-out mean reward of sampled replies",
             r["grpo"]["reward_before"], r["grpo"]["reward_after"]),
            ("after GRPO", "held-out task accuracy", r["dpo"]["accuracy_after"], r["grpo"]["accuracy_after"]),
        ]
        print(f"\nquickstart finished in {self.results['seconds']:.0f} s\n")
        print(f"{'stage':13s} {'measure':48s} {'before':>8s} {'after':>8s}")
        for stage, measure, before, after in rows:
            print(f"{stage:13s} {measure:48s} {before:8.3f} {after:8.3f}")
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2) + "\n", encoding="utf-8")
        print(f"\nmodel: {self.export('grpo')}\nserve it:  uv run astrai-serve --model {self.export('grpo')}")
        print(f"results:   {self.out / 'results.json'}")

    def run(self) -> dict[str, Any]:
        self.make_data()
        self.train_tokenizer()
        self.pretrain()
        self.sft()
        self.dpo()
        self.grpo()
        self.report()
        return self.results


def task_accuracy(model_dir: Path, questions: list[Question]) -> tuple[float, list[str]]:
    """Share of questions whose greedy reply equals the reference, and the replies."""
    import torch

    from astrai.core.auto import AutoModel
    from astrai.core.engine import InferenceEngine, SamplingParams
    from astrai.core.tokenizer import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    engine = InferenceEngine(model, tok, max_batch_size=64)
    prompts = [tok.apply_chat_template(q.messages(), add_generation_prompt=True) for q in questions]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))
    replies = [o.samples[0].text for o in outputs]
    return sum(is_correct(r, q) for r, q in zip(replies, questions)) / len(questions), replies


def _examples(questions: list[Question], replies: list[str]) -> list[tuple[Question, str]]:
    """One English and one Chinese question with its reply."""
    picked: dict[str, tuple[Question, str]] = {}
    for q, reply in zip(questions, replies):
        picked.setdefault(q.lang, (q, reply))
    return list(picked.values())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .cli import USER_ERRORS, UsageError

    try:
        Quickstart(args).run()
    except (UsageError, *USER_ERRORS) as e:  # bad paths or configs: say what, skip the traceback
        print(f"astrai-quickstart: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
