"""A calculator the policy may call during a GRPO episode (workflow.CalculatorToolWorkflow).

The expression comes from sampled text, so it is never given to ``eval``: it is parsed with
``ast`` and only numbers, + - * / // % ** and parentheses are evaluated, with limits on the
expression's length, its nesting, the size of powers and of every intermediate result, so
that neither ``__import__('os')`` nor ``9**9**9`` can run or stall the trainer.
"""

from __future__ import annotations

import ast
import math
import operator

from astrai.core.errors import AstraiError

MAX_EXPRESSION_CHARS = 200
MAX_DEPTH = 32
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e100

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(AstraiError):
    """The expression is not plain arithmetic, or its value cannot be computed; the message says why."""


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression such as ``(3 + 4) * 2 / 7``; CalculatorError otherwise."""
    if not isinstance(expression, str):
        raise CalculatorError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression has {len(expression)} characters, more than {MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as e:
        raise CalculatorError(f"expression is not arithmetic: {e.msg if isinstance(e, SyntaxError) else e}") from None
    return _evaluate(tree.body, 0)


def _evaluate(node: ast.AST, depth: int) -> int | float:
    if depth > MAX_DEPTH:
        raise CalculatorError(f"expression nests deeper than {MAX_DEPTH} levels")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, depth + 1))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, depth + 1), _evaluate(node.right, depth + 1)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or (left == 0 and right < 0)):
            raise CalculatorError(f"power {left}**{right} is out of range (exponent at most {MAX_EXPONENT})")
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result is too large") from None
    raise CalculatorError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


def _checked(value) -> int | float:
    if isinstance(value, complex) or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("result is not a finite real number within range")
    return value


def format_result(value: int | float) -> str:
    """A short text for a result: integers as integers (12, 12.0 -> '12'), others to 10 significant digits."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.10g}"
