"""`astrai-eval` runs lm-evaluation-harness in process on a tiny model directory, over the task
YAMLs shipped in configs/eval (their sample data, or the test's own through a YAML that
`include`s the shipped one), and every score equals what the test computes itself: multiple
choice accuracy and each choice's log-likelihood from a float64 forward, perplexity from
float64 windows, exact match from the engine's greedy output, pass@k from running the
candidate programs here. Nothing is downloaded."""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
import torch
from train_helpers import save_random_model

from astrai.core.auto import AutoModel
from astrai.core.config import ModelConfig
from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.tokenizer import AutoTokenizer
from astrai.train.evaluation.code_exec import estimate_pass_at_k, pass_at_k

pytest.importorskip("lm_eval")
from astrai.train.evaluation.cli import main  # noqa: E402  (needs lm_eval)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "eval"
MAX_LEN = 512
LONG_TEXT = " ".join(f"the cat number {i} sat on the mat and watched the river." for i in range(40))
PARAGRAPHS = ["The quick brown fox jumps over the lazy dog.", LONG_TEXT, "你好，世界！ Hello world."]
QUESTIONS = ["What is 3 + 4?", "Name a colour.", "hello", "the cat sat on the", "Spell cat.", "One, two,"]


@pytest.fixture(scope="session")
def eval_model_dir(tmp_path_factory, tokenizer_dir):
    """A random tiny model (logits O(1), max_len 512) with the test tokenizer."""
    path = tmp_path_factory.mktemp("eval_model") / "model"
    fields = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_len=MAX_LEN, init_std=0.2)
    return save_random_model(path, tokenizer_dir, seed=11, **fields)


def _write_tasks(folder: Path, tasks: dict[str, str], rows: dict[str, str]) -> str:
    folder.mkdir(exist_ok=True)
    for name, text in rows.items():
        (folder / name).write_text(text, encoding="utf-8")
    for name, text in tasks.items():
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return str(folder)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _samples(output: Path, task: str) -> list[dict]:
    return sorted(json.loads(output.read_text())["samples"][task], key=lambda s: s["doc_id"])


@torch.no_grad()
def _logp(model64, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) with the pair tokenized whole and split after the context's ids."""
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    logps = model64(torch.tensor([whole]))[0].log_softmax(-1)
    return sum(float(logps[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))


@torch.no_grad()
def _rolling_logp(model64, tokens: list[int], prefix: int, window: int) -> float:
    """log p(text): disjoint chunks of `window` tokens, each scored by one forward whose input is the
    `window` tokens (prefix token first) that end just before the chunk's last token."""
    full, total = [prefix, *tokens], 0.0  # tokens[t] is full[t + 1]
    for start in range(0, len(tokens), window):
        end = min(start + window, len(tokens))
        first = max(0, end - window)
        logps = model64(torch.tensor([full[first:end]]))[0].log_softmax(-1)
        total += sum(float(logps[t - first, full[t + 1]]) for t in range(start, end))
    return total


def test_multiple_choice_perplexity_and_exact_match_equal_scores_computed_here(eval_model_dir, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(eval_model_dir)
    model = AutoModel.from_pretrained(eval_model_dir, dtype=torch.float32)
    model64 = copy.deepcopy(model).double().eval()
    # Exact-match references: the engine's greedy replies (as the task decodes them) for even rows, others not.
    prompts = [tokenizer.encode(f"Question: {q}\nAnswer:") for q in QUESTIONS]
    params = SamplingParams(max_tokens=32, temperature=0, stop=["\n", "Question:"])
    replies = [c.text.strip() for c in InferenceEngine(model, tokenizer).generate(prompts, params)]
    answers = [reply.upper() if i % 2 == 0 else "zz not this" for i, reply in enumerate(replies)]
    tasks = _write_tasks(
        tmp_path / "tasks",
        {
            "mc": f"include: {CONFIGS / 'mmlu_style.yaml'}\ntask: t_mc_1shot\nnum_fewshot: 1\n",
            "ppl": f"include: {CONFIGS / 'perplexity.yaml'}\ntask: t_ppl\n"
            f"dataset_kwargs:\n  data_files: {{test: {tmp_path / 'tasks' / 'ppl.txt'}}}\n",
            "em": f"include: {CONFIGS / 'exact_match.yaml'}\ntask: t_em\n"
            f"dataset_kwargs:\n  data_files: {{test: {tmp_path / 'tasks' / 'em.jsonl'}}}\n",
        },
        {
            "ppl.txt": "\n\n".join(PARAGRAPHS) + "\n",
            "em.jsonl": _jsonl([{"question": q, "answer": a} for q, a in zip(QUESTIONS, answers)]),
        },
    )
    output = tmp_path / "results.json"
    code, log = _run(
        capsys,
        eval_model_dir,
        "--tasks",
        "t_mc_1shot,t_ppl,t_em",
        "--include-path",
        CONFIGS,
        "--include-path",
        tasks,
        "--device",
        "cpu",
        "--batch-size",
        3,
        "--output",
        output,
        "--log-samples",
    )
    assert code == 0, log
    assert "t_mc_1shot" in log and "word_perplexity" in log  # the printed table
    results = json.loads(output.read_text())["results"]

    # MMLU format, one shot (the first dev row, answered), over the shipped sample questions.
    rows = [json.loads(line) for line in (CONFIGS / "samples" / "mmlu_style.jsonl").read_text().splitlines()]
    shot = json.loads((CONFIGS / "samples" / "mmlu_style_dev.jsonl").read_text().splitlines()[0])

    def ask(row):
        letters = "".join(f"\n{L}. {c}" for L, c in zip("ABCD", row["choices"]))
        return f"{row['question'].strip()}{letters}\nAnswer:"

    header = (
        "The following are multiple choice questions (with answers).\n\n" + ask(shot) + " " + "ABCD"[shot["answer"]]
    )
    scores = [[_logp(model64, tokenizer, f"{header}\n\n{ask(row)}", " " + L) for L in "ABCD"] for row in rows]
    picks = [max(range(4), key=s.__getitem__) for s in scores]
    expected_acc = sum(p == r["answer"] for p, r in zip(picks, rows)) / len(rows)
    assert math.isclose(results["t_mc_1shot"]["acc,none"], expected_acc)
    for sample, want in zip(_samples(output, "t_mc_1shot"), scores):
        got = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert all(math.isclose(g, w, abs_tol=1e-3) for g, w in zip(got, want)), (got, want)

    # Perplexity: the long paragraph spans two windows of the model's 512 tokens.
    assert len(tokenizer.encode(LONG_TEXT)) > MAX_LEN
    logps = [_rolling_logp(model64, tokenizer.encode(p), tokenizer.bos_token_id, MAX_LEN) for p in PARAGRAPHS]
    words = sum(len(re.split(r"\s+", p)) for p in PARAGRAPHS)
    n_bytes = sum(len(p.encode("utf-8")) for p in PARAGRAPHS)
    ppl = results["t_ppl"]
    assert math.isclose(ppl["word_perplexity,none"], math.exp(-sum(logps) / words), rel_tol=1e-4)
    assert math.isclose(ppl["byte_perplexity,none"], math.exp(-sum(logps) / n_bytes), rel_tol=1e-4)
    assert math.isclose(ppl["bits_per_byte,none"], -sum(logps) / n_bytes / math.log(2), rel_tol=1e-4)

    # Exact match (ignoring case): the even rows' references are the engine's greedy replies.
    assert math.isclose(results["t_em"]["exact_match,strip"], 0.5)


@pytest.fixture(scope="session")
def silent_model_dir(tmp_path_factory, tokenizer_dir):
    """A model whose weights are all zero: every logit is 0, so a greedy reply is token 0 (BOS,
    a special token) again and again, and its text is empty."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.id_to_token(0) == tok.bos_token and 0 in tok.special_token_ids
    config = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_len=64)
    model = AutoModel.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    path = tmp_path_factory.mktemp("silent_model") / "model"
    AutoModel.save_pretrained(model, path, tokenizer=tok)
    return path


CODE_ROWS = [  # the prompt is a whole solution; only the first is right
    {"prompt": "def add(a, b):\n    return a + b\n", "entry_point": "add"},
    {"prompt": "def add(a, b):\n    return a - b\n", "entry_point": "add"},
]
CODE_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n"


def _code_task(tmp_path: Path) -> str:
    rows = [{**row, "test": CODE_TEST} for row in CODE_ROWS]
    task = (
        f"include: {CONFIGS / 'code_pass_at_k.yaml'}\ntask: t_code\n"
        f"dataset_kwargs:\n  data_files: {{test: {tmp_path / 'tasks' / 'code.jsonl'}}}\n"
        "repeats: 2\n"
        'generation_kwargs: {until: ["\\n"], max_gen_toks: 4, do_sample: false}\n'
        "metric_list:\n  - metric: !function astrai.train.evaluation.code_exec.pass_at_k\n"
        "    aggregation: mean\n    higher_is_better: true\n    k: [1, 2]\n    timeout: 20\n"
    )
    return _write_tasks(tmp_path / "tasks", {"code": task}, {"code.jsonl": _jsonl(rows)})


def test_code_pass_at_k_runs_the_programs_only_with_the_opt_in(silent_model_dir, tmp_path, capsys):
    tasks = _code_task(tmp_path)
    argv = [silent_model_dir, "--tasks", "t_code", "--include-path", tasks, "--device", "cpu"]
    code, log = _run(capsys, *argv)
    assert code == 2 and "--confirm-run-unsafe-code" in log

    output = tmp_path / "results.json"
    code, log = _run(capsys, *argv, "--confirm-run-unsafe-code", "--output", output, "--log-samples")
    assert code == 0, log
    results = json.loads(output.read_text())["results"]["t_code"]
    samples = _samples(output, "t_code")
    # Each candidate (prompt + reply) run here with the test: exit status 0 means it passes.
    passed = []
    for sample in samples:
        programs = sample["filtered_resps"][0]
        assert len(programs) == 2 and all(p.startswith(sample["doc"]["prompt"]) for p in programs)
        ran = [subprocess.run([sys.executable, "-c", f"{p}\n{CODE_TEST}\ncheck(add)\n"], timeout=60) for p in programs]
        passed.append(sum(r.returncode == 0 for r in ran))
    assert passed == [2, 0]
    for k in (1, 2):
        assert math.isclose(results[f"pass@{k},programs"], sum(estimate_pass_at_k(2, c, k) for c in passed) / 2)


def test_pass_at_k_counts_a_program_that_never_ends_as_failed():
    tests = ["def check(f):\n    assert f() == 1\ncheck(f)"]
    candidates = [["def f():\n    return 1", "def f():\n    return 2", "def f():\n    while True:\n        pass"]]
    scores = pass_at_k(tests, candidates, k=[1, 2], timeout=2)
    assert math.isclose(scores["pass@1"], 1 / 3) and math.isclose(scores["pass@2"], 2 / 3)
    with pytest.raises(ValueError, match="repeats to at least 4"):
        pass_at_k(tests, candidates, k=4, timeout=2)


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 2), (4, 4, 4), (7, 1, 7)])
def test_pass_at_k_estimate_is_the_share_of_k_subsets_with_a_correct_sample(n, c, k):
    subsets = list(combinations([True] * c + [False] * (n - c), k))
    assert math.isclose(estimate_pass_at_k(n, c, k), sum(any(s) for s in subsets) / len(subsets))


def test_astrai_eval_without_lm_eval_names_the_extra_to_install(tmp_path):
    blocked = "import sys; sys.modules['lm_eval'] = None\nfrom astrai.train.evaluation.cli import main\n"
    done = subprocess.run(
        [sys.executable, "-c", blocked + "raise SystemExit(main(['model', '--tasks', 'x']))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "pip install 'astrai-train[eval]'" in done.stderr


def test_unknown_task_is_refused_naming_the_local_tasks(eval_model_dir, capsys):
    code, log = _run(capsys, eval_model_dir, "--tasks", "astrai_mmlu_style,no_such_task", "--include-path", CONFIGS)
    assert code == 2
    assert "no_such_task" in log and "astrai_code_pass_at_k" in log and "astrai_perplexity" in log


def test_every_shipped_task_reads_its_sample_data_from_beside_its_yaml(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)  # relative data paths must not depend on the working directory
    expected = {
        "astrai_perplexity": (CONFIGS / "samples" / "perplexity.txt").read_text().count("\n\n") + 1,
        "astrai_mmlu_style": len((CONFIGS / "samples" / "mmlu_style.jsonl").read_text().splitlines()),
        "astrai_exact_match": len((CONFIGS / "samples" / "exact_match.jsonl").read_text().splitlines()),
        "astrai_code_pass_at_k": len((CONFIGS / "samples" / "code.jsonl").read_text().splitlines()),
    }
    tasks = TaskManager(include_path=str(CONFIGS), include_defaults=False).load(list(expected))["tasks"]
    assert {name: len(list(task.test_docs())) for name, task in tasks.items()} == expected


def test_shipped_code_problems_pass_with_their_canonical_solutions_and_fail_without():
    rows = [json.loads(line) for line in (CONFIGS / "samples" / "code.jsonl").read_text().splitlines()]
    tests = [f"{row['test']}\ncheck({row['entry_point']})" for row in rows]
    programs = [[row["prompt"] + row["canonical_solution"], row["prompt"] + "    return None\n"] for row in rows]
    assert pass_at_k(tests, programs, k=[1, 2], timeout=20) == {"pass@1": 0.5, "pass@2": 1.0}


def test_an_unknown_dtype_is_refused_naming_the_flag(eval_model_dir, capsys):
    code, log = _run(
        capsys, eval_model_dir, "--tasks", "astrai_mmlu_style", "--include-path", CONFIGS, "--dtype", "fp4"
    )
    assert code == 2
    assert "--dtype" in log and "fp4" in log and "bfloat16" in log and "Traceback" not in log


def test_the_evaluated_model_loads_without_the_training_side():
    """astrai-eval's model (lm_model) shares resolve_dtype with GRPO's rollouts, but not its
    imports: Lightning stays unloaded (seconds of start-up for nothing)."""
    code = "import sys, astrai.train.evaluation.lm_model; print('lightning.pytorch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
