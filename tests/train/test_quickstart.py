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
def test_smoke_run_trains_every_stage_and_exports_loadable_models(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # as `uv run astrai-quickstart` from the repository root
    out = tmp_path / "qs"
    assert main(["--smoke", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())

    # Each stage ran and moved its own measure (the smoke run is far too short to be good).
    assert results["pretrain"]["val_loss_after"] < results["pretrain"]["val_loss_before"] - 1.0
    assert results["dpo"]["reward_acc_before"] == 0.0  # policy == reference: every margin is 0
    assert results["dpo"]["reward_acc_after"] > 0.0
    assert 0.0 <= results["sft"]["accuracy_after"] <= 1.0 and results["sft"]["n_questions"] == 40

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
