"""multi's `calculate_output`: arithmetic over the sub-graders' scores, with simpleeval (no Python is run). OpenAI's
operators and functions: + - * / ^ (a power, as is **), min, max, abs, floor, ceil, exp, sqrt, log."""

from __future__ import annotations

import ast
import math
import operator

import simpleeval

from bentoservice.training.graders.errors import GraderError, GradingFailed

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: simpleeval.safe_power,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
# The nodes a formula may hold (simpleeval alone also takes strings, comparisons, conditionals, subscripts).
_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Load, ast.Constant, *_OPERATORS)
_FUNCTIONS = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
}


class Formula:
    def __init__(self, text: str, names: set[str], param: str) -> None:
        """Checks the formula: its syntax and nodes, then its names and functions by evaluating it with every
        score 1.0."""
        # OpenAI's ^ is a power; Python's binds looser than + and *, so it is rewritten to ** (which binds tighter).
        self.text, self.param = text.replace("^", "**"), param
        try:
            tree = ast.parse(self.text, mode="eval")
        except SyntaxError as exc:
            raise GraderError(f"calculate_output {text!r} is not a formula: {exc.msg}", param) from None
        for node in ast.walk(tree):
            if not isinstance(node, _NODES) or (
                isinstance(node, ast.Constant)
                and (isinstance(node.value, bool) or not isinstance(node.value, int | float))
            ):
                raise GraderError(
                    f"calculate_output {text!r}: only numbers, sub-grader names, + - * / ^ and "
                    f"{', '.join(_FUNCTIONS)} are allowed",
                    param,
                )
        clash = names & set(_FUNCTIONS)
        if clash:
            raise GraderError(f"a sub-grader may not be named like a function: {sorted(clash)}", param)
        try:
            self.evaluate(dict.fromkeys(names, 1.0))
        except GradingFailed as exc:
            if exc.error == "formula_parse_error":
                raise GraderError(exc.message, param) from None

    def evaluate(self, scores: dict[str, float]) -> float:
        evaluator = simpleeval.SimpleEval(operators=_OPERATORS, functions=_FUNCTIONS, names=scores)
        try:
            result = evaluator.eval(self.text)
        except (simpleeval.InvalidExpression, TypeError) as exc:
            known = ", ".join(sorted(scores)) or "none"
            raise GradingFailed(
                f"calculate_output {self.text!r}: {exc} (sub-graders: {known})", "formula_parse_error", self.param
            ) from None
        except (ArithmeticError, ValueError) as exc:  # 1/0, log(0), sqrt(-1), a huge power
            raise GradingFailed(f"calculate_output {self.text!r}: {exc}", "other_error", self.param) from None
        if isinstance(result, bool) or not isinstance(result, int | float):
            raise GradingFailed(
                f"calculate_output {self.text!r} gives {result!r}, not a number", "formula_parse_error", self.param
            )
        return float(result)
