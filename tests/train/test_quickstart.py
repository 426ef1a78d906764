"""`astrai-quickstart`: the whole chain in a shortened run; every stage runs and exports a model
directory that our loader, the inference engine and transformers all load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from astrai.core.auto import AutoModel
from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.tokenizer import AutoTokenizer
from astrai.train.quickstart import main

REPO = Path(__file__).resolve().parents[2]


def test_help_explains_the_chain(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("tokenizer", "pre-trains", "SFT", "DPO", "--out", "--steps-scale", "--smoke", "astrai-serve"):
        assert words in text


def test_missing_configs_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["--configs", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"--configs: {tmp_path} has no tokenizer.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_run_trains_every_stage_repeats_itself_and_exports_loadable_models(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # as `uv run astrai-quickstart` from the repository root
    out = tmp_path / "qs"
    assert main(["--smoke", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())

    # The same seed gives the same numbers again.
    assert main(["--smoke", "--out", str(tmp_path / "again"), "--quiet"]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    for stage in ("pretrain", "sft", "dpo", "grpo"):
        assert {k: v for k, v in again[stage].items() if k != "export"} == {
            k: v for k, v in results[stage].items() if k != "export"
        }, stage

    # Each stage ran and reported its measure (the smoke run is far too short to be good).
    assert results["pretrain"]["val_loss_after"] < results["pretrain"]["val_loss_before"] - 1.0
    assert results["sft"]["n_questions"] == 20  # --smoke measures on the first 20 held-out questions
    assert results["grpo"]["samples"] == 4
    for stage, measure in (
        ("sft", "accuracy"),
        ("dpo", "chosen_likelier"),
        ("dpo", "accuracy"),
        ("grpo", "reward"),
        ("grpo", "accuracy"),
    ):
        values = results[stage][measure]
        assert 0.0 <= values["before"] <= 2.0 and 0.0 <= values["after"] <= 2.0, (stage, measure)
    assert results["dpo"]["accuracy"]["before"] == results["sft"]["accuracy"]["after"]
    assert results["grpo"]["accuracy"]["before"] == results["dpo"]["accuracy"]["after"]
    assert set(results["verdicts"]) == {"pre-training", "SFT", "DPO", "after DPO", "GRPO", "after GRPO"}
    assert [(row["stage"], row["verdict"]) for row in results["table"]] == list(results["verdicts"].items())
    assert results["table"][1]["before"] == results["sft"]["accuracy"]["before"]
    pairs = [json.loads(line) for line in (out / "data" / "dpo" / "train.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)  # the SFT model's own wrong replies

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    for stage in ("pretrain", "sft", "dpo"):
        export = Path(results[stage]["export"])
        assert export == out / stage / "export"
        model = AutoModel.from_pretrained(export)
        assert model.config.vocab_size == tok.vocab_size
        assert AutoTokenizer.from_pretrained(export).get_vocab() == tok.get_vocab()

    # The final model answers through the engine, and transformers computes the same logits.
    final = out / "dpo" / "export"
    model = AutoModel.from_pretrained(final, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True)
    completion = InferenceEngine(model, tok).generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert len(completion.samples[0].token_ids) >= 1

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_full_run_improves_every_stage(tmp_path, monkeypatch):
    """The README's promise on the default settings (seed 0, two threads): every stage's measure
    moves the right way by more than its noise, and greedy accuracy never drops beyond it
    (bench/quickstart_seeds.py checks seeds 0-2 with one and two threads)."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "qs"
    assert main(["--out", str(out), "--quiet", "--threads", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["verdicts"] == {
        "pre-training": "better",
        "SFT": "better",
        "DPO": "better",
        "after DPO": "ok",
        "GRPO": "better",
        "after GRPO": "ok",
    }
