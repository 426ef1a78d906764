"""`astrai-quickstart`: the whole life of a tiny bilingual model in one command, on a CPU.

    data -> tokenizer -> pre-training -> SFT -> DPO -> GRPO -> a model directory astrai-serve serves

Every training stage runs through `astrai-train` (LightningCLI) with the YAML files in
configs/quickstart/, exactly as a user would run them by hand; this script only fills in the
paths under --out, scales the step counts, makes DPO's pairs from the SFT model's own wrong
replies (sampled_pairs.py), and measures each stage before and after:

- pre-training: validation loss (nats per token) on unseen text;
- SFT: exact-match accuracy of greedy answers to held-out questions (sums never asked
  about in SFT, DPO or GRPO; the facts were only read during pre-training);
- DPO: the share of held-out pairs (the reference reply against one of the SFT model's own
  wrong replies to a held-out question) whose reference the policy finds likelier;
- GRPO: mean reward (grpo.yaml's rewards) of replies sampled for the held-out questions;
- after DPO and after GRPO: the held-out greedy accuracy again, which neither may lower.

Each change is reported with its standard error (measures.py), and a stage is
called better only when its change is at least twice that.
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

from ..rewards import load_rewards
from ..sampled_pairs import read_questions, sample_pairs, write_pairs
from .corpus import Question, is_correct, load_questions, write_corpus
from .measures import Change, greedy_answers, paired_change, sampled_rewards

STAGES = 6
# --smoke: every stage's steps x scale on `docs` documents, and less measuring: the first
# `heldout_questions` held-out questions (greedy accuracy, DPO's validation pairs, GRPO's rewards),
# the first `dpo_questions` of DPO's training questions, `pair_samples` replies sampled per
# question for DPO's pairs and `reward_samples` per held-out question for GRPO's reward.
SMOKE = {
    "scale": 0.04,
    "docs": 400,
    "heldout_questions": 20,
    "dpo_questions": 40,
    "pair_samples": 4,
    "reward_samples": 4,
}


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
        "what each stage improved, with the noise of each change. About 2-3 minutes on a 2-core CPU.",
        epilog="Each stage is an ordinary `astrai-train fit --config configs/quickstart/<stage>.yaml` run; "
        "the exported model directory can be served with `astrai-serve --model <out>/grpo/export`.",
    )
    parser.add_argument("--out", default="runs/quickstart", help="output directory (default: %(default)s)")
    parser.add_argument(
        "--configs",
        default=None,
        help="directory with tokenizer/pretrain/sft/dpo/grpo.yaml and model.json (default: configs/quickstart)",
    )
    parser.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="multiply every stage's training steps (e.g. 0.5 for a faster, weaker run)",
    )
    parser.add_argument(
        "--docs", type=int, default=4000, help="pre-training documents to generate (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data and of training")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a seconds-long check of the chain (steps x{SMOKE['scale']}, {SMOKE['docs']} documents, "
        f"{SMOKE['heldout_questions']} held-out questions, fewer sampled replies); its numbers mean nothing",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice, one per core); results differ slightly "
        "with the thread count, as float sums are taken in another order",
    )
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
        # What --smoke measures on; None (all questions) and {} (sample_pairs' defaults) are the full run's.
        self.heldout_questions = SMOKE["heldout_questions"] if args.smoke else None
        self.dpo_questions = SMOKE["dpo_questions"] if args.smoke else None
        self.pair_sampling = {"samples": SMOKE["pair_samples"]} if args.smoke else {}
        self.reward_samples = SMOKE["reward_samples"] if args.smoke else None  # None: grpo.yaml's val_samples
        self.seed, self.quiet = args.seed, args.quiet
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
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
        from ..cli import cli_main

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
        trainer, schedule = config.get("trainer", {}), config["model"].get("init_args", {}).get("schedule", {})
        steps = max(2, round(trainer.get("max_steps", 100) * self.scale))
        interval = min(steps, trainer.get("val_check_interval", steps))  # a short run validates once, at its end
        overrides: dict[str, Any] = {
            "trainer.max_steps": steps,
            "trainer.val_check_interval": interval,
            "trainer.default_root_dir": self.out / stage,
            "model.schedule.warmup_steps": min(steps // 2, round(schedule.get("warmup_steps", 0) * self.scale)),
            "model.export.dir": self.export(stage),
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
        tok = train_tokenizer(
            [self.files["tokenizer_text"]],
            vocab_size=config["vocab_size"],
            min_frequency=config.get("min_frequency", 2),
            out_dir=self.tokenizer,
            text_field=config.get("text_field", "text"),
            show_progress=not self.quiet,
        )
        print(f"  {tok.vocab_size} tokens -> {self.tokenizer}")

    def pretrain(self) -> None:
        overrides = self.stage_overrides(
            "pretrain", {"train": self.files["pretrain_train"], "val": self.files["pretrain_val"]}
        )
        self.banner(3, f"pre-training ({overrides['trainer.max_steps']} steps)")
        evaluate = {**overrides, "trainer.logger": False, "model.model": self.configs / "model.json"}
        before = self.cli("validate", "pretrain", evaluate)["val/loss"]
        self.cli("fit", "pretrain", {**overrides, "model.model": self.configs / "model.json"})
        after = self.cli("validate", "pretrain", {**evaluate, "model.model": self.export("pretrain")})["val/loss"]
        self.results["pretrain"] = {
            "val_loss_before": before,
            "val_loss_after": after,
            "export": str(self.export("pretrain")),
        }
        print(f"  validation loss {before:.3f} -> {after:.3f}")

    def sft(self) -> None:
        overrides = self.stage_overrides("sft", {"train": self.files["sft_train"], "val": self.files["sft_val"]})
        self.banner(4, f"supervised fine-tuning ({overrides['trainer.max_steps']} steps)")
        self.questions = load_questions(self.files["sft_heldout"])[: self.heldout_questions]
        before, _ = greedy_answers(self.export("pretrain"), self.questions)
        self.cli("fit", "sft", {**overrides, "model.model": self.export("pretrain")})
        after, replies = greedy_answers(self.export("sft"), self.questions)
        self.accuracy = {"sft": after}
        change = paired_change(before, after)
        self.results["sft"] = {
            "accuracy": _change(change),
            "n_questions": len(self.questions),
            "export": str(self.export("sft")),
        }
        print(f"  held-out accuracy {change.before:.3f} -> {change.after:.3f}; for example:")
        for q, reply in _examples(self.questions, replies):
            print(f"    {q.prompt!r} -> {reply!r}" + ("" if is_correct(reply, q) else f"   (expected {q.reference!r})"))

    def accuracy_change(self, previous: str, stage: str) -> Change:
        """Held-out greedy accuracy of ``stage``'s export against ``previous``'s, per question."""
        after, _ = greedy_answers(self.export(stage), self.questions)
        self.accuracy[stage] = after
        return paired_change(self.accuracy[previous], after)

    def dpo_pairs(self) -> dict[str, Path]:
        """DPO's training and validation pairs: the reference against the SFT model's own wrong replies."""
        paths = {}
        for split, name, seed, limit in (
            ("train", "dpo_questions", self.seed, self.dpo_questions),
            ("val", "dpo_heldout_questions", self.seed + 1, self.heldout_questions),
        ):
            questions = read_questions(self.files[name])[:limit]
            pairs = sample_pairs(self.export("sft"), questions, seed=seed, **self.pair_sampling)
            paths[split] = write_pairs(self.data / "dpo" / f"{split}.jsonl", pairs)
            print(f"  {len(pairs)} {split} pairs -> {paths[split]}")
        return paths

    def dpo(self) -> None:
        self.banner(5, "DPO on pairs of the SFT model's own wrong replies")
        overrides = self.stage_overrides("dpo", self.dpo_pairs())
        print(f"  {overrides['trainer.max_steps']} steps")
        evaluate = {**overrides, "trainer.logger": False, "model.model": self.export("sft")}
        before = self.cli("validate", "dpo", evaluate)["val/chosen_likelier"]
        self.cli("fit", "dpo", {**overrides, "model.model": self.export("sft")})
        after = self.cli(
            "validate",
            "dpo",
            {**evaluate, "model.model": self.export("dpo"), "model.reference_model": self.export("sft")},
        )["val/chosen_likelier"]
        accuracy = self.accuracy_change("sft", "dpo")
        self.results["dpo"] = {
            "chosen_likelier": {"before": before, "after": after},
            "accuracy": _change(accuracy),
            "export": str(self.export("dpo")),
        }
        print(f"  held-out pairs whose reference the policy finds likelier {before:.3f} -> {after:.3f}")
        print(f"  held-out accuracy {accuracy.before:.3f} -> {accuracy.after:.3f}")

    def grpo(self) -> None:
        overrides = self.stage_overrides("grpo", {"train": self.files["grpo_train"], "val": self.files["grpo_val"]})
        self.banner(6, f"GRPO ({overrides['trainer.max_steps']} steps of replies sampled by the inference engine)")
        config = yaml.safe_load((self.configs / "grpo.yaml").read_text(encoding="utf-8"))["model"]["init_args"]
        sampling = {
            "rewards": load_rewards(config["rewards"], "grpo.yaml: model.rewards"),
            "samples": self.reward_samples or config.get("val_samples", 16),
            "temperature": config.get("val_temperature", 1.0),
            "max_tokens": config.get("max_new_tokens", 24),
            "seed": self.seed,
        }
        before = sampled_rewards(self.export("dpo"), self.questions, **sampling)
        self.cli("fit", "grpo", {**overrides, "model.model": self.export("dpo"), "trainer.limit_val_batches": 0})
        reward = paired_change(before, sampled_rewards(self.export("grpo"), self.questions, **sampling))
        accuracy = self.accuracy_change("dpo", "grpo")
        self.results["grpo"] = {
            "reward": _change(reward),
            "samples": sampling["samples"],
            "accuracy": _change(accuracy),
            "export": str(self.export("grpo")),
        }
        print(f"  held-out mean reward {reward.before:.3f} -> {reward.after:.3f} (+-{reward.stderr:.3f})")
        print(f"  held-out accuracy {accuracy.before:.3f} -> {accuracy.after:.3f}")

    def rows(self) -> list[tuple[str, str, dict, str]]:
        """(stage, measure, {before, after[, delta, stderr]}, rule) for the table; rule is how
        "better" is judged (see verdict)."""
        r, n = self.results, self.results["sft"]["n_questions"]
        return [
            (
                "pre-training",
                "validation loss (nats/token, lower is better)",
                {"before": r["pretrain"]["val_loss_before"], "after": r["pretrain"]["val_loss_after"]},
                "lower",
            ),
            ("SFT", f"held-out task accuracy ({n} questions)", r["sft"]["accuracy"], "higher"),
            ("DPO", "held-out pairs: reference likelier than own error", r["dpo"]["chosen_likelier"], "higher"),
            ("after DPO", "held-out task accuracy", r["dpo"]["accuracy"], "not lower"),
            ("GRPO", f"held-out mean reward ({r['grpo']['samples']} samples/question)", r["grpo"]["reward"], "higher"),
            ("after GRPO", "held-out task accuracy", r["grpo"]["accuracy"], "not lower"),
        ]

    def report(self) -> None:
        self.results["seconds"] = round(time.time() - self.t0, 1)
        print(f"\nquickstart finished in {self.results['seconds']:.0f} s\n")
        print(f"{'stage':12s} {'measure':51s} {'before':>7s} {'after':>7s} {'change':>15s}  verdict")
        table = []
        for stage, measure, values, rule in self.rows():
            table.append({"stage": stage, "measure": measure, **values, "rule": rule, "verdict": verdict(values, rule)})
            change = values["after"] - values["before"]
            noise = f" +-{values['stderr']:.3f}" if "stderr" in values else ""
            print(
                f"{stage:12s} {measure:51s} {values['before']:7.3f} {values['after']:7.3f} "
                f"{f'{change:+.3f}{noise}':>15s}  {table[-1]['verdict']}"
            )
        self.results["table"] = table  # the rows as printed (bench/quickstart_seeds.py reads them)
        self.results["verdicts"] = {row["stage"]: row["verdict"] for row in table}
        print(
            "\nchange +- its standard error, paired per held-out question; 'better' needs a change of at least "
            "twice that, 'not lower' a drop of less than twice that"
        )
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


def _change(change: Change) -> dict[str, float]:
    return {"before": change.before, "after": change.after, "delta": change.delta, "stderr": change.stderr}


def verdict(values: dict, rule: str) -> str:
    """ "better", "same" or "WORSE" by ``rule``: "lower" / "higher" (better when the change goes
    that way, by at least 2 standard errors where the change has one) or "not lower" (a held
    measure: "ok" unless it dropped by 2 standard errors or more)."""
    delta = values["after"] - values["before"]
    noise = 2 * values.get("stderr", 0.0)
    if rule == "lower":
        delta = -delta
    if rule == "not lower":
        return "WORSE" if delta < 0 and -delta >= max(noise, 1e-12) else "ok"
    if delta > noise:
        return "better"
    return "WORSE" if delta < -noise else "same"


def _examples(questions: list[Question], replies: list[str]) -> list[tuple[Question, str]]:
    """One English and one Chinese question with its reply."""
    picked: dict[str, tuple[Question, str]] = {}
    for q, reply in zip(questions, replies):
        picked.setdefault(q.lang, (q, reply))
    return list(picked.values())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ..cli import USER_ERRORS

    try:
        Quickstart(args).run()
    except USER_ERRORS as e:  # bad paths or configs: say what, skip the traceback
        print(f"astrai-quickstart: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
