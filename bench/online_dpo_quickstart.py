"""Does online DPO help on the quickstart task? Held-out reward before and after, paired per question.

    uv run python bench/online_dpo_quickstart.py                         # builds runs/quickstart up to SFT if missing
    uv run python bench/online_dpo_quickstart.py --out runs/quickstart --steps-scale 0.5 --threads 2

Starts from the quickstart's SFT model (<out>/sft/export; when it is missing, the quickstart's
first four stages build it, as `astrai-quickstart` would), runs `astrai-train fit --config
configs/quickstart/online-dpo.yaml` on the quickstart's GRPO prompts, and measures both models
with the quickstart's own measures (quickstart/measures.py), seeded: the mean reward of sampled
replies to the held-out questions (the rewards, samples and temperature of grpo.yaml, as the
GRPO stage is judged) and the greedy exact-match accuracy. Each change comes with its paired
standard error and the quickstart's verdict. Not part of the quickstart chain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="the quickstart's output directory")
    parser.add_argument("--configs", default=str(REPO / "configs" / "quickstart"))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply online-dpo.yaml's max_steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and of the measures")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides, e.g. model.optimizer.lr=1e-4"
    )
    args = parser.parse_args(argv)

    from astrai.train.quickstart.chain import Quickstart, _change, _parser, verdict
    from astrai.train.quickstart.corpus import load_questions
    from astrai.train.quickstart.measures import greedy_answers, paired_change, sampled_rewards
    from astrai.train.rewards import load_rewards

    qs_args = ["--out", args.out, "--configs", args.configs, "--seed", str(args.seed), "--quiet"]
    qs_args += ["--steps-scale", str(args.steps_scale)] + (["--threads", str(args.threads)] if args.threads else [])
    q = Quickstart(_parser().parse_args(qs_args))
    if not (q.export("sft") / "model.safetensors").is_file():  # the quickstart's stages 1-4
        q.make_data()
        q.train_tokenizer()
        q.pretrain()
        q.sft()
    t0 = time.time()
    questions = load_questions(q.data / "sft" / "heldout.jsonl")
    grpo = yaml.safe_load((q.configs / "grpo.yaml").read_text(encoding="utf-8"))["model"]["init_args"]
    sampling = {
        "rewards": load_rewards(grpo["rewards"], "grpo.yaml: model.rewards"),
        "samples": grpo.get("val_samples", 16),
        "temperature": grpo.get("val_temperature", 1.0),
        "max_tokens": grpo.get("max_new_tokens", 24),
        "seed": args.seed,
    }
    sft = q.export("sft")
    reward_before = sampled_rewards(sft, questions, **sampling)
    greedy_before, _ = greedy_answers(sft, questions)

    overrides = q.stage_overrides(
        "online-dpo", {"train": q.data / "grpo" / "train.jsonl", "val": q.data / "grpo" / "val.jsonl"}
    )
    overrides.update({"model.model": sft, "trainer.limit_val_batches": 0})
    overrides.update(dict(item.split("=", 1) for item in args.set))
    print(f"online DPO from {sft}: {overrides['trainer.max_steps']} steps", flush=True)
    t_fit = time.time()
    q.cli("fit", "online-dpo", overrides)
    fit_seconds = time.time() - t_fit
    tuned = q.export("online-dpo")
    reward = paired_change(reward_before, sampled_rewards(tuned, questions, **sampling))
    accuracy = paired_change(greedy_before, greedy_answers(tuned, questions)[0])

    rows = [
        (f"held-out mean reward ({sampling['samples']} samples/question)", _change(reward), "higher"),
        (f"held-out greedy accuracy ({len(questions)} questions)", _change(accuracy), "not lower"),
    ]
    print(f"\n{'measure':48s} {'SFT':>7s} {'+ODPO':>7s} {'change':>15s}  verdict")
    for measure, values, rule in rows:
        values["verdict"] = verdict(values, rule)
        change = f"{values['delta']:+.3f} +-{values['stderr']:.3f}"
        print(f"{measure:48s} {values['before']:7.3f} {values['after']:7.3f} {change:>15s}  {values['verdict']}")
    results = {
        "reward": rows[0][1],
        "accuracy": rows[1][1],
        "steps": overrides["trainer.max_steps"],
        "overrides": {k: str(v) for k, v in overrides.items()},
        "fit_seconds": round(fit_seconds, 1),
        "seconds": round(time.time() - t0, 1),
    }
    path = q.out / "online-dpo" / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nfit {fit_seconds:.0f} s, all {results['seconds']:.0f} s; results: {path}")
    return 0 if rows[0][1]["verdict"] == "better" and rows[1][1]["verdict"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
