"""Rollout workflows on a CPU: the calculator tool's episodes (the real engine, a tiny model
made to write the call by structured output) carry loss masks that cover only the tokens the
model wrote; the calculator refuses anything but arithmetic; a user's workflow class is loaded
from YAML and its episodes are what GRPO trains on."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import yaml
from data_helpers import write_jsonl
from test_grpo_module import module
from train_helpers import TINY_MODEL, make_trainer

from astrai.core.engine import SamplingParams
from astrai.core.errors import AstraiError
from astrai.train.calculator import CalculatorError, calculate, format_result
from astrai.train.cli import cli_main
from astrai.train.data.grpo import GRPODataModule
from astrai.train.losses import IGNORE_INDEX
from astrai.train.rollout import RolloutEngine
from astrai.train.workflow import (
    CalculatorToolWorkflow,
    RolloutWorkflow,
    SingleTurnWorkflow,
    apply_loss_masks,
    load_workflow,
)

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "3*4"}}</tool_call>'
RESULT = "<tool_result>12</tool_result>"


class ForcedCall(CalculatorToolWorkflow):
    """The calculator workflow whose first turn must be CALL (a random model would never write it)."""

    def turn_params(self, params, turn, max_tokens):
        params = super().turn_params(params, turn, max_tokens)
        return dataclasses.replace(params, structured_output={"regex": re.escape(CALL)}) if turn == 0 else params


def policy(tokenizer_dir, **options):
    return module(tokenizer_dir, model={**TINY_MODEL, "vocab_size": 320, "max_len": 512}, **options)


def test_calculator_episodes_mask_the_tool_result_and_train_on_the_model_tokens(tokenizer_dir):
    m = policy(tokenizer_dir)
    tok = m.tokenizer
    engine = RolloutEngine(m.model, tok)
    prompts = [tok.encode("what is 3*4?"), tok.encode("3 times 4")]
    params = SamplingParams(n=2, max_tokens=140, temperature=1.0, logprobs=0)
    out = ForcedCall(max_turns=1).run(engine, prompts, params, [1, 2], tok, [{}, {}])
    call, result = tok.encode(CALL), tok.encode(RESULT)
    assert out.group_ids == [0, 0, 1, 1] and len(out.loss_masks) == 4
    for completion, mask, logps in zip(out.completion_ids, out.loss_masks, out.logps):
        assert len(completion) == len(mask) == len(logps) <= 140
        assert tok.decode(completion[: len(call)]) == CALL  # the model's call ...
        assert completion[len(call) : len(call) + len(result)] == result  # ... the inserted result
        assert mask[: len(call)] == [1] * len(call)
        assert mask[len(call) : len(call) + len(result)] == [0] * len(result)
        assert set(mask[len(call) + len(result) :]) <= {1} and len(mask) > len(call) + len(result)  # it went on
        assert all(lp == 0 for lp in logps[len(call) : len(call) + len(result)])
        # Forced tokens have log-prob 0 under the grammar's mask; those after the result were sampled freely.
        assert all(lp < 0 for lp in logps[len(call) + len(result) :])
    data = apply_loss_masks(out.tensors(0), out)
    for i, (prompt, completion, mask) in enumerate(zip(out.prompt_ids, out.completion_ids, out.loss_masks)):
        labels = data["labels"][i, len(prompt) - 1 : len(prompt) - 1 + len(completion)].tolist()
        assert labels == [t if keep else IGNORE_INDEX for t, keep in zip(completion, mask)]
        assert (data["labels"][i] != IGNORE_INDEX).sum() == sum(mask)
    assert (data["engine_logps"][data["labels"] == IGNORE_INDEX] == 0).all()


def test_episodes_stop_calling_the_tool_after_max_turns(tokenizer_dir):
    """With the call forced on every turn and max_turns 1, the second call gets no result: the episode ends."""

    class AlwaysCall(ForcedCall):
        def turn_params(self, params, turn, max_tokens):
            return super().turn_params(params, 0, max_tokens)

    m = policy(tokenizer_dir)
    tok = m.tokenizer
    out = AlwaysCall(max_turns=1).run(
        RolloutEngine(m.model, tok), [tok.encode("go")], SamplingParams(n=1, max_tokens=400), [0], tok, [{}]
    )
    text = tok.decode(out.completion_ids[0])
    assert text == CALL + RESULT + CALL and out.finish_reasons[0] == "stop"
    assert sum(out.loss_masks[0]) == 2 * len(tok.encode(CALL))


def reply_chars(prompt, completion: str, row: dict) -> float:
    """A reward that differs between random replies: the length of the final turn's text."""
    return float(len(completion))


def test_grpo_trains_on_calculator_episodes(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "calc.jsonl", [{"prompt": f"what is 3*4 {i}"} for i in range(2)])
    data = GRPODataModule(tokenizer_dir, path, batch_size=2, cache_dir=str(tmp_path / "cache"), max_prompt_len=64)
    m = policy(
        tokenizer_dir, group_size=2, rewards=[{"fn": f"{__name__}.reply_chars"}], workflow=ForcedCall(max_turns=1)
    )
    inserted = len(m.tokenizer.encode(CALL + RESULT))
    m.sampling = dataclasses.replace(m.sampling, max_tokens=inserted + 6)
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(m, data)
    assert trainer.global_step == 1
    assert float(trainer.callback_metrics["train/completion_len"]) == inserted + 6
    assert any(not torch.equal(before[k], v) for k, v in m.model.state_dict().items())


@pytest.mark.parametrize(
    "expression,value",
    [
        ("3*4", "12"),
        ("(1 + 2) * -3", "-9"),
        ("7 / 2", "3.5"),
        ("2 ** 10", "1024"),
        ("7 // 2 + 7 % 2", "4"),
        ("1e3", "1000"),
    ],
)
def test_calculator_evaluates_arithmetic(expression, value):
    assert format_result(calculate(expression)) == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('echo pwned')",
        "().__class__.__bases__[0].__subclasses__()",
        "open('/etc/passwd').read()",
        "x",
        "lambda: 1",
        "[1, 2]",
        "'a' * 10",
        "True + 1",
        "9 ** 9 ** 9",
        "10 ** 200",
        "1 / 0",
        "0 ** -1",
        "-" * 60 + "1",
        "1 + " * 60 + "1",
        "3*4; import os",
        "",
    ],
)
def test_calculator_refuses_anything_but_bounded_arithmetic(expression):
    with pytest.raises(CalculatorError):
        calculate(expression)


def test_a_bad_tool_call_gets_an_error_result_instead_of_stopping_the_run():
    tool = CalculatorToolWorkflow()
    assert (
        tool.tool_result('{"name": "calculator", "arguments": {"expression": "2+2"}}') == "<tool_result>4</tool_result>"
    )
    assert tool.tool_result('{"name": "shell", "arguments": {}}').startswith("<tool_result>error: unknown tool")
    assert tool.tool_result("not json").startswith("<tool_result>error:")
    assert "error: only numbers" in tool.tool_result('{"name": "calculator", "arguments": {"expression": "os"}}')


class EveryOtherToken(RolloutWorkflow):
    """A user's workflow: single-turn completions whose every other token is masked out."""

    episodes_run = 0

    def __init__(self, keep_first: bool = True):
        self.keep_first = keep_first

    def run(self, rollout, prompt_ids, params, seeds, tokenizer, rows):
        type(self).episodes_run += 1
        out = rollout.generate(prompt_ids, params, seeds)
        out.loss_masks = [[int((t % 2 == 0) == self.keep_first) for t in range(len(c))] for c in out.completion_ids]
        return out


def test_a_user_workflow_class_loads_from_yaml_and_runs(tmp_path, tokenizer_dir):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"say {i}", "answer": "one"} for i in range(4)])
    (tmp_path / "model.json").write_text(json.dumps({**TINY_MODEL, "vocab_size": 320}))
    config = {
        "trainer": {"max_steps": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False},
        "model": {
            "class_path": "astrai.train.grpo_module.GRPOModule",
            "init_args": {
                "model": str(tmp_path / "model.json"),
                "rewards": [{"fn": "astrai.train.rewards.answer_match"}],
                "group_size": 2,
                "max_new_tokens": 4,
                "workflow": {"class_path": f"{__name__}.EveryOtherToken", "init_args": {"keep_first": False}},
            },
        },
        "data": {
            "class_path": "astrai.train.data.grpo.GRPODataModule",
            "init_args": {"tokenizer": tokenizer_dir, "train": rows, "batch_size": 2, "cache_dir": str(tmp_path / "c")},
        },
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    EveryOtherToken.episodes_run = 0
    cli = cli_main(["fit", f"--config={path}", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    workflow = cli.model.workflow
    assert isinstance(workflow, EveryOtherToken) and workflow.keep_first is False
    assert EveryOtherToken.episodes_run == 1 and cli.trainer.global_step == 1


def test_workflow_settings_fail_naming_the_field():
    assert isinstance(load_workflow(None), SingleTurnWorkflow)
    with pytest.raises(AstraiError, match=r"model.workflow.class_path .*RolloutWorkflow"):
        load_workflow({"class_path": "astrai.train.rewards.answer_match"})
    with pytest.raises(AstraiError, match=r"model.workflow.class_path: cannot import"):
        load_workflow({"class_path": "no_such_package.Workflow"})
    with pytest.raises(AstraiError, match=r"model.workflow.init_args do not fit"):
        load_workflow({"class_path": "astrai.train.workflow.CalculatorToolWorkflow", "init_args": {"turns": 2}})
    with pytest.raises(AstraiError, match=r"model.workflow.init_args.max_turns"):
        CalculatorToolWorkflow(max_turns=0)
