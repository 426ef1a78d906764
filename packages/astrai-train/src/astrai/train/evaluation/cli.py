"""`astrai-eval`: run lm-evaluation-harness tasks on a model directory, in this process.

    astrai-eval runs/sft/export --tasks astrai_mmlu_style,astrai_perplexity --output results.json
    astrai-eval runs/sft/export --tasks astrai_code_pass_at_k --confirm-run-unsafe-code
    astrai-eval runs/sft/export --tasks hellaswag,mmlu --num-fewshot 5     # lm-eval's own tasks

The model is lm-eval's ``astrai`` model (lm_model.py); tasks are looked up in --include-path
(default: configs/eval, whose YAMLs are templates for local data) and in lm-eval's own task
list. Prints lm-eval's results table; --output writes the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from astrai.core.errors import AstraiError, require

INSTALL_HINT = "astrai-eval needs lm-evaluation-harness: pip install 'astrai-train[eval]'"


def default_include_paths() -> list[Path]:
    """configs/eval of the working directory, else of the repository holding this file; none
    when neither exists (an installed package run elsewhere: lm-eval's own tasks only)."""
    for root in (Path.cwd(), *Path(__file__).resolve().parents):
        if (root / "configs" / "eval").is_dir():
            return [root / "configs" / "eval"]
    return []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="astrai-eval",
        description="Evaluate a model directory on lm-evaluation-harness tasks (in process: log-likelihoods "
        "from the model's forward, generation through the AstrAI inference engine).",
        epilog="Local tasks: configs/eval/*.yaml (perplexity on a text file, MMLU-format multiple choice, "
        "exact-match generation, code pass@k); copy one, point it at your data, pass its folder as "
        "--include-path. Any lm-eval task name works too (`lm-eval ls tasks`). See docs/evaluation.md.",
    )
    parser.add_argument("model", metavar="MODEL_DIR", nargs="?", help="model directory (with its tokenizer)")
    parser.add_argument("--tasks", help="comma-separated task (or group) names")
    parser.add_argument(
        "--include-path",
        action="append",
        help="folder of extra task YAMLs; repeatable (default: configs/eval)",
    )
    parser.add_argument("--list-tasks", action="store_true", help="print the tasks found in --include-path and exit")
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (default: bfloat16 on GPUs that have it, else float32), float32, bfloat16 or float16",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="sequences per log-likelihood forward (default: %(default)s)"
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=64, help="sequences the engine decodes at once (default: %(default)s)"
    )
    parser.add_argument(
        "--max-length", type=int, help="longest sequence scored or prompted (default: the model's max_len)"
    )
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument(
        "--limit", type=float, help="first N documents of each task (a fraction if < 1); for quick checks"
    )
    parser.add_argument(
        "--apply-chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template"
    )
    parser.add_argument(
        "--confirm-run-unsafe-code",
        action="store_true",
        help="allow tasks marked unsafe_code (code pass@k) to execute model-written programs in subprocesses",
    )
    parser.add_argument("--output", help="write the results (and with --log-samples, every sample) to this JSON file")
    parser.add_argument("--log-samples", action="store_true", help="keep each document's inputs, outputs and scores")
    parser.add_argument(
        "--seed", type=int, default=1234, help="seed of sampling and of few-shot selection (default: %(default)s)"
    )
    return parser


def local_tasks(task_manager, include_paths: list[str]) -> list[str]:
    """Names of the tasks whose YAML lies in one of the include paths."""
    names = []
    for name, entry in task_manager.task_index.items():
        path = Path(entry.yaml_path or "/").resolve()
        if any(path.is_relative_to(p) for p in include_paths):
            names.append(name)
    return sorted(names)


def find_tasks(task_manager, names: list[str], include_paths: list[str]) -> None:
    """Fail naming each task neither lm-eval nor the include paths know (a YAML file path is fine)."""
    known = set(task_manager.all_tasks)
    missing = [n for n in names if n not in known and not Path(n).is_file()]
    require(
        not missing,
        "--tasks",
        f"names unknown task(s) {missing}; tasks in {include_paths}: {local_tasks(task_manager, include_paths)} "
        "(lm-eval's own: `lm-eval ls tasks`)",
    )


def evaluate(args: argparse.Namespace) -> dict:
    """lm-eval's simple_evaluate with the astrai model built from the parsed arguments."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .lm_model import AstraiLM

    include_paths = [str(Path(p).resolve()) for p in (args.include_path or default_include_paths())]
    for path in include_paths:
        require(Path(path).is_dir(), "--include-path", f"{path} is not a folder of task YAMLs")
    # Indexing lm-eval's own few thousand task YAMLs takes seconds: only done when a name is not local.
    task_manager = TaskManager(include_path=include_paths or None, include_defaults=False)
    if args.list_tasks:
        print("\n".join(local_tasks(task_manager, include_paths)))
        return {}
    require(args.model, "MODEL_DIR", "is missing: give the model directory to evaluate")
    require(args.tasks, "--tasks", "is missing: give comma-separated task names (see --list-tasks)")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not set(names) <= set(task_manager.all_tasks):
        task_manager = TaskManager(include_path=include_paths or None)
    find_tasks(task_manager, names, include_paths)
    lm = AstraiLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_num_seqs=args.max_num_seqs,
        seed=args.seed,
    )
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    try:
        results = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=args.num_fewshot,
            limit=limit,
            task_manager=task_manager,
            log_samples=args.log_samples,
            apply_chat_template=args.apply_chat_template,
            confirm_run_unsafe_code=args.confirm_run_unsafe_code,
            random_seed=args.seed,
            numpy_random_seed=args.seed,
            torch_random_seed=args.seed,
            fewshot_random_seed=args.seed,
        )
    except ValueError as e:
        if "marked as unsafe" in str(e):
            raise AstraiError(
                "--confirm-run-unsafe-code is needed to run a task marked unsafe_code (it executes "
                f"model-written programs in subprocesses; use a sandbox for untrusted models): {e}"
            ) from None
        raise
    if results is not None:  # lm-eval records no arguments for a model passed as an object
        results["config"].update(model="astrai", model_args=lm.settings(), batch_size=lm.batch_size)
    return results


class _CustomDatasetNotice(logging.Filter):
    """Drops lm-eval's advice to pass `--metadata` (its own CLI's flag) for every task with a
    custom_dataset loader, which is each local task here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def write_results(results: dict, path: str) -> Path:
    from lm_eval.utils import handle_non_serializable

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    logging.getLogger("lm_eval.api.task").addFilter(_CustomDatasetNotice())
    try:
        results = evaluate(args)
    except AstraiError as e:
        print(f"astrai-eval: {e}", file=sys.stderr)
        return 2
    if not results:
        return 0
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        print(f"results -> {write_results(results, args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
