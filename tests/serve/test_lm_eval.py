"""lm-evaluation-harness against astrai-serve: `lm_eval --model local-completions` on local
tasks (a multiple-choice one scored by log-likelihood, a generation one by exact match) over
JSONL the test writes, no download. Its per-item log-likelihoods and its scores equal what the
test computes itself: a float64 forward of the served model, and our engine's greedy output."""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import MODEL_NAME

from astrai.core.auto import AutoModel
from astrai.core.engine import InferenceEngine, SamplingParams

pytest.importorskip("lm_eval")

MC = [
    {"question": "the cat sat on the", "choices": ["mat", "sun", "river"], "answer": 0},
    {"question": "every day we watch the", "choices": ["tree", "light", "dog"], "answer": 1},
    {"question": "hello", "choices": ["world", "stone"], "answer": 0},
    {"question": "the small model reads and", "choices": ["writes", "rain", "open"], "answer": 0},
    {"question": "a dark", "choices": ["river", "cat"], "answer": 1},
    {"question": "new words come", "choices": ["quickly", "slowly", "close"], "answer": 2},
]
GEN_PROMPTS = ["the cat", "hello world", "a small model", "every day", "the river", "light and dark"]

MC_TASK = """task: astrai_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: astrai_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@torch.no_grad()
def _loglikelihood(model64, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as the harness does: the pair's token ids split
    after the context's own ids (no special tokens added)."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    lp = model64(torch.tensor([whole]))[0].log_softmax(-1)
    return sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def _write_tasks(tmp_path, gen_rows) -> str:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen_rows))
    (tasks / "mc.yaml").write_text(MC_TASK.format(path=tmp_path / "mc.jsonl"))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(path=tmp_path / "gen.jsonl"))
    return str(tasks)


def test_lm_eval_local_completions_scores_equal_our_own(server, model_dir, tmp_path):
    from astrai.core.tokenizer import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    # Generation targets: half are what our engine writes greedily (until "."), half are not.
    engine = InferenceEngine(model, tokenizer)
    params = SamplingParams(max_tokens=6, temperature=0, stop=["."])
    ours = [engine.generate([tokenizer.encode(p, add_special_tokens=False)], params)[0].text for p in GEN_PROMPTS]
    gen_rows = [
        {"prompt": p, "target": o if i % 2 == 0 else "not this"} for i, (p, o) in enumerate(zip(GEN_PROMPTS, ours))
    ]
    tasks = _write_tasks(tmp_path, gen_rows)

    out = tmp_path / "results"
    args = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "local-completions",
        "--model_args",
        f"base_url={server.url}/v1/completions,model={MODEL_NAME},tokenizer={model_dir},"
        "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,max_length=512",
        "--tasks",
        "astrai_tiny_mc,astrai_tiny_gen",
        "--include_path",
        tasks,
        "--output_path",
        str(out),
        "--log_samples",
    ]
    env = {**os.environ, "OPENAI_API_KEY": server.api_key, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads(open(glob.glob(f"{out}/**/results_*.json", recursive=True)[0]).read())["results"]
    model64 = copy.deepcopy(model).double().eval()
    scores = [[_loglikelihood(model64, tokenizer, d["question"], " " + c) for c in d["choices"]] for d in MC]
    expected_acc = sum(max(range(len(s)), key=s.__getitem__) == d["answer"] for s, d in zip(scores, MC)) / len(MC)
    assert math.isclose(results["astrai_tiny_mc"]["acc,none"], expected_acc)
    samples = [
        json.loads(line)
        for f in glob.glob(f"{out}/**/samples_astrai_tiny_mc_*.jsonl", recursive=True)
        for line in open(f)
    ]
    assert len(samples) == len(MC)
    for sample in samples:
        got = [resp[0] for resp in sample["filtered_resps"]]
        want = scores[sample["doc_id"]]
        assert all(math.isclose(float(g), w, abs_tol=1e-3) for g, w in zip(got, want)), (got, want)
    assert math.isclose(results["astrai_tiny_gen"]["exact_match,none"], 0.5)
