"""Deterministic checkers of completions: math answers, the R1 format, countdown equations, code.

Pure functions of strings, written for text that can be anything: no regular expression here can
backtrack catastrophically (no nested or adjacent unbounded quantifiers over the same characters),
inputs are truncated before expensive work, and nothing calls eval on completion text. Hangs and
crashes that remain possible (sympy on a huge expression) are caught from outside by
`verifier_pool.VerifierPool`, which runs these functions in worker processes with a timeout per item.
"""

from __future__ import annotations

import ast
import re
import threading
from fractions import Fraction
from typing import Any, Sequence

from grpo_jax import sandbox

MAX_TEXT = 20_000  # characters of a completion looked at for answers (the end, where answers are)
MAX_ANSWER = 400  # longest extracted answer handed to sympy

# --------------------------------------------------------------------------------------------------
# Math: extraction


def _last_braced(text: str, command: str) -> str | None:
    """Content of the last `command{...}` whose braces balance (nested), in one linear pass."""
    starts = set()
    i = text.find(command + "{")
    while i != -1:
        starts.add(i + len(command))
        i = text.find(command + "{", i + 1)
    if not starts:
        return None
    stack, best = [], None
    for j, c in enumerate(text):
        if c == "{":
            stack.append(j)
        elif c == "}" and stack:
            o = stack.pop()
            if o in starts and (best is None or o > best[0]):
                best = (o, j)
    return None if best is None else text[best[0] + 1:best[1]]


_ANSWER_IS = re.compile(r"answer is[:\s]*([^\n]{1,200})", re.IGNORECASE)
_GSM8K = re.compile(r"####[ \t]*([^\n]{1,200})")


def extract_answer(text: str | None) -> str | None:
    """The final answer of a completion, or None if it states none.

    Looks, in this order, for <answer>...</answer> (the last one; a \\boxed{} inside wins), the last
    \\boxed{...} (nested braces), GSM8K's `#### 42`, and "the answer is ...".
    """
    if not text:
        return None
    text = text[-MAX_TEXT:]
    close = text.rfind("</answer>")
    if close != -1:
        open_ = text.rfind("<answer>", 0, close)
        if open_ != -1:
            inner = text[open_ + len("<answer>"):close]
            return _last_braced(inner, "\\boxed") or _last_braced(inner, "\\fbox") or inner.strip() or None
    for command in ("\\boxed", "\\fbox"):
        boxed = _last_braced(text, command)
        if boxed is not None:
            return boxed
    m = None
    for m in _GSM8K.finditer(text):
        pass
    if m:
        return m.group(1)
    for m in _ANSWER_IS.finditer(text):
        pass
    if m:
        return m.group(1).strip().rstrip(".")
    return None


# --------------------------------------------------------------------------------------------------
# Math: normalisation and comparison

_LATEX_NOISE = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\displaystyle", "\\$", "$",
                "^\\circ", "^{\\circ}", "\\circ", "\\%", "%", "\\mathrm", "\\textbf", "\\mbox")
_TEXT_CMD = re.compile(r"\\text\{([^{}]{0,100})\}")
_NUMBER_WITH_UNIT = re.compile(r"^([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)(?:\s*[a-zA-Z][a-zA-Z ]{0,30})?$")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{?(-?\d+)\}?\{?(-?\d+)\}?$")
_SIMPLE_LHS = re.compile(r"^[a-zA-Z](?:_\{?\w{1,5}\}?)?$")


def normalize_answer(ans: str) -> str:
    """Canonical string of an answer: no $, units, percent signs, thousands separators, LaTeX spacing,
    trailing period; `x = 5` becomes `5`."""
    s = ans.strip()
    s = _TEXT_CMD.sub(lambda m: m.group(1), s)
    for noise in _LATEX_NOISE:
        s = s.replace(noise, "")
    s = s.strip().rstrip(".").strip()
    if "=" in s and s.count("=") == 1:
        lhs, rhs = s.split("=")
        if _SIMPLE_LHS.match(lhs.strip()):
            s = rhs.strip()
    m = _NUMBER_WITH_UNIT.match(s)
    if m:
        s = m.group(1)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = " ".join(s.split())
    return s


def to_number(s: str) -> Fraction | float | None:
    """A plain number (integer, decimal, a/b, \\frac{a}{b}) as an exact Fraction, else None."""
    s = s.replace(" ", "")
    if len(s) > 60:
        return None
    m = _FRAC.match(s)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        return None if den == 0 else Fraction(num, den) * (-1 if m.group(1) else 1)
    exponent = _EXPONENT.search(s)
    if exponent and abs(int(exponent.group(1))) > 100:  # Fraction("1e999999999") builds a huge integer
        return None
    try:
        if "/" in s:
            a, b = s.split("/", 1)
            return Fraction(Fraction(a), Fraction(b)) if Fraction(b) != 0 else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


_EXPONENT = re.compile(r"[eE]([-+]?\d+)")


def numbers_equal(a: Fraction, b: Fraction, rel_tol: float = 1e-6) -> bool:
    """Equal up to a relative 1e-6 (or 1e-9 absolute), in exact arithmetic: no float overflow."""
    if a == b:
        return True
    diff, tol = abs(Fraction(a) - Fraction(b)), Fraction(rel_tol) * max(abs(Fraction(a)), abs(Fraction(b)))
    return diff <= max(tol, Fraction(1, 10**9))


# Expressions sympy would spend forever on: towers of powers and huge exponents or factorials.
_DANGEROUS = re.compile(r"(\*\*|\^)\s*\{?\s*\(?\s*\d{4,}|(\*\*|\^)[^\n]{0,20}(\*\*|\^)|\d{5,}\s*!|\\underbrace|\\overbrace")


def _symbolic_equal(gold: str, pred: str) -> bool:
    """math-verify (sympy) equivalence; gold wrapped in $...$ so that (1,2) parses as a tuple."""
    if len(pred) > MAX_ANSWER or len(gold) > MAX_ANSWER or _DANGEROUS.search(pred) or _DANGEROUS.search(gold):
        return False
    from math_verify import parse, verify

    # math-verify's own timeouts use SIGALRM, which only works in a main thread: use them there (the
    # pool's workers), and rely on the pool's external timeout elsewhere.
    main = threading.current_thread() is threading.main_thread()
    timeout = 3 if main else None
    try:
        g = parse(f"${gold}$", parsing_timeout=timeout)
        p = parse(pred if "\\boxed" in pred or "$" in pred else f"${pred}$", parsing_timeout=timeout)
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - any failure to parse or compare means "not shown equal"
        return False


def answers_match(gold: str, pred: str | None) -> bool:
    """True when the predicted answer equals the gold one exactly, numerically, or symbolically."""
    if pred is None or gold is None:
        return False
    g, p = normalize_answer(str(gold)), normalize_answer(str(pred))
    if not p:
        return False
    if g == p:
        return True
    gn, pn = to_number(g), to_number(p)
    if gn is not None and pn is not None:
        return numbers_equal(gn, pn)
    return _symbolic_equal(g, p)


def math_reward(completion: str | None, answer: Any) -> float:
    """1.0 when the completion's final answer matches `answer`, else 0.0."""
    if answer is None:
        return 0.0
    gold = str(answer)
    gold = (extract_answer(gold) or gold) if "####" in gold or "\\boxed" in gold else gold
    return 1.0 if answers_match(gold, extract_answer(completion)) else 0.0


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

    tests: either {"input": str, "output": str} stdin/stdout pairs (output compared after stripping
    trailing whitespace of each line; the expected output never enters the sandbox), or Python test
    source (asserts, `check(fn)`) that `sandbox.run_tests` runs outside the sandbox against the
    solution's functions, so that no output or exit status of the solution can fake a pass.
    """
    code = extract_code(completion)
    if not code or not tests:
        return 0.0
    limits = sandbox.Limits(timeout_s=timeout_s, memory_mb=memory_mb, isolation=isolation)
    passed = 0
    asserts = [str(t) for t in tests if not isinstance(t, dict)]
    if asserts:
        passed += sum(sandbox.run_tests(code, asserts, limits))
    for test in tests:
        if isinstance(test, dict):
            r = sandbox.run_script(code, str(test.get("input", "")), limits)
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
