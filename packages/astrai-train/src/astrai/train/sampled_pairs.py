"""Preference pairs from a model's own mistakes: the data the quickstart's DPO stage learns from.

For every question with one right reply, the model samples a few replies; each distinct reply
that is not the reference becomes a rejected reply against the reference as the chosen one.
The pairs are on-policy: they hold the errors this model makes (a wrong operand copied from
the question, a wrong sum), so DPO works on what the model gets wrong. Hand-made near misses
("3 + 4 = 8.") are errors the model may never make; tuning on those moved its answers without
making them better. Pairing with sampled replies is the usual way to build DPO data from a
policy (as in online and iterative DPO); a question whose replies were all right gives no pair.

    python -m astrai.train.sampled_pairs --model runs/quickstart/sft/export \\
        --questions runs/quickstart/data/dpo/questions.jsonl --out runs/quickstart/data/dpo/train.jsonl

Rows in: ``{"prompt", "reference"}``; rows out: ``{"prompt", "chosen", "rejected"}`` (DPODataModule's).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


def read_questions(path: str | Path) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        for key in ("prompt", "reference"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}, row {n}: field {key!r} must be a non-empty string")
        rows.append(row)
    return rows


def load_engine(model_dir: str | Path, max_batch_size: int = 64):
    """(InferenceEngine, tokenizer) over a model directory, in float32 on the CPU."""
    import torch

    from astrai.core.auto import AutoModel
    from astrai.core.engine import InferenceEngine
    from astrai.core.tokenizer import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    return InferenceEngine(model, tok, max_batch_size=max_batch_size), tok


def chat_prompts(tok, questions: Sequence[str]) -> list[list[int]]:
    """Each question as a one-turn chat, ready for the assistant's reply."""
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]


def sample_pairs(
    model_dir: str | Path,
    questions: Sequence[dict],
    samples: int = 8,
    per_question: int = 2,
    temperature: float = 1.0,
    max_tokens: int = 32,
    seed: int = 0,
) -> list[dict]:
    """Up to ``per_question`` pairs (reference, a distinct wrong reply) for every question, from
    ``samples`` replies sampled at ``temperature``; reply i of question q is seeded from
    (``seed``, q), so the same model and seed give the same pairs."""
    from astrai.core.engine import SamplingParams

    engine, tok = load_engine(model_dir, max_batch_size=max(64, samples))
    prompts = chat_prompts(tok, [q["prompt"] for q in questions])
    params = [
        SamplingParams(n=samples, temperature=temperature, max_tokens=max_tokens, seed=seed * 1_000_003 + i)
        for i in range(len(questions))
    ]
    pairs = []
    for question, output in zip(questions, engine.generate(prompts, params)):
        reference, wrong = question["reference"].strip(), []
        for sample in output.samples:
            reply = sample.text.strip()
            if reply and reply != reference and reply not in wrong:
                wrong.append(reply)
        pairs += [{"prompt": question["prompt"], "chosen": reference, "rejected": w} for w in wrong[:per_question]]
    return pairs


def write_pairs(path: str | Path, pairs: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m astrai.train.sampled_pairs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory whose replies are sampled")
    parser.add_argument("--questions", required=True, help='JSONL of {"prompt", "reference"} rows')
    parser.add_argument("--out", required=True, help="JSONL to write the pairs to")
    parser.add_argument("--samples", type=int, default=8, help="replies sampled per question (default: %(default)s)")
    parser.add_argument("--per-question", type=int, default=2, help="most pairs per question (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pairs = sample_pairs(
        args.model, read_questions(args.questions), args.samples, args.per_question, args.temperature, seed=args.seed
    )
    print(f"{len(pairs)} pairs -> {write_pairs(args.out, pairs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
