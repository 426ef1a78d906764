"""Rollout workflows: an episode of GRPO is code, chosen in YAML by ``model.workflow``.

A workflow turns a batch of prompts into a Rollout with any object that has
``generate(prompt_ids, params, seeds) -> Rollout`` (the in-process RolloutEngine, or a client
of inference servers). The trainer scores ``Rollout.texts`` with ``model.rewards`` afterwards
and trains only on the tokens the model wrote: tokens a workflow inserts itself (a tool's
answer) carry 0 in ``Rollout.loss_masks`` and get no label, no log-prob and no gradient.

- ``SingleTurnWorkflow`` (default): one completion per sample, scored as it is;
- ``CalculatorToolWorkflow``: the model may call a calculator between turns by writing
  ``<tool_call>{"name": "calculator", "arguments": {"expression": "3*4"}}</tool_call>``; the
  workflow evaluates it (calculator.py: arithmetic only, no eval), appends
  ``<tool_result>12</tool_result>`` and lets the model go on, up to ``max_turns`` calls and
  ``max_new_tokens`` tokens in all (its own and the inserted ones);
- your own: subclass ``RolloutWorkflow`` and name it,
  ``workflow: {class_path: my_pkg.MyWorkflow, init_args: {...}}``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import torch

from astrai.core.engine import SamplingParams
from astrai.core.errors import AstraiError, require

from .calculator import CalculatorError, calculate, format_result
from .losses import IGNORE_INDEX
from .rewards import import_object
from .rollout import Rollout

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
TOOL_CALL_END = "</tool_call>"


class RolloutWorkflow:
    """How one batch of episodes runs. Subclasses implement ``run``."""

    def run(
        self, rollout, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int] | None, tokenizer, rows
    ) -> Rollout:
        """``params.n`` episodes per prompt (group g = prompt g); ``seeds[g]`` seeds prompt g's
        group; ``rows[g]`` is its dataset row. Returns one Rollout entry per episode, with
        ``loss_masks`` 0 on any token the model did not write."""
        raise NotImplementedError


class SingleTurnWorkflow(RolloutWorkflow):
    """One completion per sample: what GRPO does without a workflow."""

    def run(self, rollout, prompt_ids, params, seeds, tokenizer, rows) -> Rollout:
        return rollout.generate(prompt_ids, params, seeds)


class CalculatorToolWorkflow(RolloutWorkflow):
    """Multi-turn episodes in which the model may call a calculator (see module docstring).

    Args:
        max_turns: most calculator calls per episode; after the last the model answers.
        result_template: the text inserted after a call, ``{result}`` being the value or an
            ``error: ...`` message.
    """

    def __init__(self, max_turns: int = 2, result_template: str = "<tool_result>{result}</tool_result>"):
        require(
            isinstance(max_turns, int) and max_turns >= 1,
            "model.workflow.init_args.max_turns",
            f"must be a positive integer, got {max_turns!r}",
        )
        require(
            "{result}" in result_template,
            "model.workflow.init_args.result_template",
            f"must contain '{{result}}', got {result_template!r}",
        )
        self.max_turns, self.result_template = max_turns, result_template

    def turn_params(self, params: SamplingParams, turn: int, max_tokens: int) -> SamplingParams:
        """The sampling of one turn: a turn ends at a complete tool call. A subclass may change it
        per turn (e.g. constrain the call's JSON)."""
        stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
        return dataclasses.replace(params, stop=[*stops, TOOL_CALL_END], max_tokens=max_tokens)

    def tool_result(self, call_text: str) -> str:
        """The text inserted for one tool call (the part between the tags)."""
        try:
            call = json.loads(call_text)
            if not isinstance(call, dict) or call.get("name") != "calculator":
                raise CalculatorError("unknown tool; the only tool is 'calculator'")
            arguments = call.get("arguments")
            expression = arguments.get("expression") if isinstance(arguments, dict) else None
            result = format_result(calculate(expression))
        except (json.JSONDecodeError, CalculatorError) as e:
            result = f"error: {e.msg if isinstance(e, json.JSONDecodeError) else e}"
        return self.result_template.format(result=result)

    def run(self, rollout, prompt_ids, params, seeds, tokenizer, rows) -> Rollout:
        limit = getattr(rollout, "max_model_len", None)
        budget = params.max_tokens or limit or 1 << 20  # tokens per episode, the inserted ones included
        first = rollout.generate(prompt_ids, self.turn_params(params, 0, budget), seeds)
        out = dataclasses.replace(first, loss_masks=[[1] * len(c) for c in first.completion_ids])
        last_turn = list(first.completion_ids)  # what the model wrote in its latest turn
        for turn in range(1, self.max_turns + 1):
            calls = {}
            for i, tokens in enumerate(last_turn):
                match = TOOL_CALL.search(tokenizer.decode(tokens, skip_special_tokens=True))
                if match and out.finish_reasons[i] == "stop":
                    calls[i] = self.tool_result(match.group(1))
            for i, text in calls.items():
                inserted = tokenizer.encode(text)
                _extend(out, i, inserted, [0.0] * len(inserted), 0)
            going = [
                i
                for i in calls
                if len(out.completion_ids[i]) < budget
                and (limit is None or len(out.prompt_ids[i]) + len(out.completion_ids[i]) < limit)
            ]
            for i in set(calls) - set(going):
                _truncate(out, i, budget)
            if not going:
                break
            room = max(budget - len(out.completion_ids[i]) for i in going)
            contexts = [out.prompt_ids[i] + out.completion_ids[i] for i in going]
            turn_seeds = (
                None if seeds is None else [hash((seeds[out.group_ids[i]], i, turn)) & 0x7FFF_FFFF for i in going]
            )
            more = rollout.generate(
                contexts, dataclasses.replace(self.turn_params(params, turn, room), n=1), turn_seeds
            )
            last_turn = [[] for _ in last_turn]
            for j, i in enumerate(going):
                last_turn[i] = more.completion_ids[j]
                _extend(out, i, more.completion_ids[j], more.logps[j], 1)
                out.texts[i], out.finish_reasons[i] = more.texts[j], more.finish_reasons[j]
                out.versions[i] = min(out.versions[i], more.versions[j])
                _truncate(out, i, budget)
            out.seconds += more.seconds
        return out


def _extend(out: Rollout, i: int, tokens: list[int], logps: list[float], model_written: int) -> None:
    out.completion_ids[i] = out.completion_ids[i] + list(tokens)
    out.logps[i] = out.logps[i] + list(logps)
    out.loss_masks[i] = out.loss_masks[i] + [model_written] * len(tokens)


def _truncate(out: Rollout, i: int, budget: int) -> None:
    if len(out.completion_ids[i]) > budget:
        out.completion_ids[i] = out.completion_ids[i][:budget]
        out.logps[i], out.loss_masks[i] = out.logps[i][:budget], out.loss_masks[i][:budget]
        out.finish_reasons[i] = "length"


def apply_loss_masks(data: dict[str, torch.Tensor], rollout: Rollout) -> dict[str, torch.Tensor]:
    """Take the labels (and engine log-probs) off every completion token whose loss mask is 0,
    in the batch ``rollout.tensors()`` made; a rollout without masks is returned as it is."""
    if not rollout.loss_masks:
        return data
    labels, logps = data["labels"], data["engine_logps"]
    for i, (prompt, mask) in enumerate(zip(rollout.prompt_ids, rollout.loss_masks)):
        inserted = [len(prompt) - 1 + t for t, keep in enumerate(mask) if not keep]
        if inserted:
            where = torch.tensor(inserted, device=labels.device)
            labels[i, where] = IGNORE_INDEX
            logps[i, where] = 0.0
    return data


def load_workflow(spec: Any) -> RolloutWorkflow:
    """``model.workflow`` as a workflow: None (single turn), an instance, or
    ``{class_path: ..., init_args: {...}}``."""
    if spec is None:
        return SingleTurnWorkflow()
    if isinstance(spec, RolloutWorkflow):
        return spec
    require(
        isinstance(spec, dict) and isinstance(spec.get("class_path"), str) and set(spec) <= {"class_path", "init_args"},
        "model.workflow",
        f"must be {{class_path: <import path of a RolloutWorkflow>, init_args: {{...}}}}, got {spec!r}",
    )
    try:
        cls = import_object(spec["class_path"], "model.workflow.class_path")
    except AstraiError as e:
        raise AstraiError(str(e)) from None
    require(
        isinstance(cls, type) and issubclass(cls, RolloutWorkflow),
        "model.workflow.class_path",
        f"must name a subclass of astrai.train.workflow.RolloutWorkflow, got {spec['class_path']!r}",
    )
    init_args = spec.get("init_args") or {}
    try:
        return cls(**init_args)
    except TypeError as e:
        raise AstraiError(f"model.workflow.init_args do not fit {cls.__name__}: {e}") from None
