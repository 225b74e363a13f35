"""Deterministic checkers of completions: the R1 format, countdown equations, code (math answers
are `math_grader`'s).

Pure functions of strings, written for text that can be anything: inputs are truncated before
expensive work, nothing calls eval on completion text, and code runs only in `sandbox`. Hangs and
crashes that remain possible are caught from outside by
`verifier_pool.VerifierPool`, which runs these functions in worker processes with a timeout per item.
"""

from __future__ import annotations

import ast
from fractions import Fraction
from typing import Sequence

from grpo_jax.rewards.sandbox import runner

MAX_TEXT = 20_000  # characters of a completion looked at (the end, where answers are)


# --------------------------------------------------------------------------------------------------
# Format (DeepSeek-R1 template)

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completion: str | None, strict: bool = True) -> float:
    """1.0 for `<think>...</think>` then `<answer>...</answer>`.

    strict: the completion is exactly that (each tag once, only whitespace between </think> and
    <answer> and after </answer>). lenient: the four tags appear in that order, anything around them.
    """
    if not completion:
        return 0.0
    text = completion.strip()
    positions = [text.find(t) for t in _TAGS]
    if min(positions) < 0 or positions != sorted(positions):
        return 0.0
    if not strict:
        return 1.0
    if any(text.count(t) != 1 for t in _TAGS) or not text.startswith("<think>") or not text.endswith("</answer>"):
        return 0.0
    between = text[positions[1] + len("</think>"):positions[2]]
    return 1.0 if not between.strip() else 0.0


def tag_count_reward(completion: str | None) -> float:
    """0.25 for each of the four R1 tags that appears exactly once (partial credit while learning the format)."""
    if not completion:
        return 0.0
    return 0.25 * sum(completion.count(t) == 1 for t in _TAGS)


# --------------------------------------------------------------------------------------------------
# Countdown


class _Arith:
    """Evaluates +, -, *, / over integer literals exactly; anything else is rejected."""

    OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}

    def __init__(self):
        self.numbers: list[int] = []

    def eval(self, node) -> Fraction:
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in self.OPS:
            return self.OPS[type(node.op)](self.eval(node.left), self.eval(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self.eval(node.operand)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            self.numbers.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"not allowed in a countdown equation: {type(node).__name__}")


def countdown_reward(completion: str | None, numbers: Sequence[int], target: int) -> float:
    """1.0 when the completion's equation uses each given number exactly once and equals target.

    The equation is the <answer> content (else the last line with digits); a trailing `= target` is
    allowed. Parsed with Python's ast and evaluated by a whitelist of + - * / on integers.
    """
    if not completion or numbers is None or target is None:
        return 0.0
    text = completion[-MAX_TEXT:]
    close = text.rfind("</answer>")
    open_ = text.rfind("<answer>", 0, close) if close != -1 else -1
    if open_ != -1:
        expr = text[open_ + len("<answer>"):close]
    else:
        lines = [ln for ln in text.splitlines() if any(ch.isdigit() for ch in ln)]
        expr = lines[-1] if lines else ""
    expr = expr.strip().replace("×", "*").replace("÷", "/").replace("\\times", "*").replace("\\div", "/")
    if "=" in expr:
        expr = expr.split("=")[0]
    if not expr or len(expr) > 200:
        return 0.0
    calc = _Arith()
    try:
        value = calc.eval(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError, TypeError):
        return 0.0
    if sorted(calc.numbers) != sorted(int(n) for n in numbers):
        return 0.0
    return 1.0 if value == Fraction(int(target)) else 0.0


# --------------------------------------------------------------------------------------------------
# Code

def extract_code(completion: str | None) -> str | None:
    """The last closed ``` fenced block (its language line dropped), else the whole completion."""
    if not completion:
        return None
    parts = completion[-MAX_TEXT * 5:].split("```")
    closed = parts[1:len(parts) - (len(parts) % 2 == 0):2]  # odd parts followed by a closing fence
    if not closed:
        return completion
    block = closed[-1]
    first, _, rest = block.partition("\n")
    return rest if first.strip().isidentifier() or not first.strip() else block


def code_reward(completion: str | None, tests: Sequence[dict] | Sequence[str], timeout_s: float = 5.0,
                memory_mb: int = 512, isolation: str = "auto") -> float:
    """Fraction of test cases the completion's Python code passes, each run in a fresh `sandbox`.

    tests: {"input": str, "output": str} stdin/stdout pairs (output compared after stripping trailing
    whitespace of each line; the expected output never enters the sandbox); Python test source
    (asserts, `check(fn)`); or {"test": source, "entry_point": name(s), "setup": trusted source such
    as HumanEval's prompt}. Test source runs outside the sandbox against the solution's functions
    (`runner.run_tests`), so no output or exit status of the solution can fake a pass, and it sees
    only the solution's entry points, never its other names.
    """
    code = extract_code(completion)
    if not code or not tests:
        return 0.0
    limits = runner.Limits(timeout_s=timeout_s, memory_mb=memory_mb, isolation=isolation)
    stdio = [t for t in tests if isinstance(t, dict) and "test" not in t]
    passed = sum(runner.run_tests(code, [t for t in tests if not (isinstance(t, dict) and "test" not in t)], limits))
    for test in stdio:
        r = runner.run_script(code, str(test.get("input", "")), limits)
        want = [ln.rstrip() for ln in str(test.get("output", "")).strip().splitlines()]
        got = [ln.rstrip() for ln in r["stdout"].strip().splitlines()]
        passed += r["returncode"] == 0 and not r["timed_out"] and got == want
    return passed / len(tests)


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment in tokens: 0 up to max_length - buffer, then falling linearly to
    -1 at max_length, and -1 beyond."""
    if buffer <= 0 or length <= max_length - buffer:
        return 0.0 if length <= max_length else -1.0
    if length <= max_length:
        return (max_length - buffer - length) / buffer
    return -1.0
