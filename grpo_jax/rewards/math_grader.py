"""Math answers: extract the final answer of a completion and decide whether it equals the gold one.

Written to never accept a wrong answer (a reward a policy would learn to hack), accepting every
equivalent form it can prove equal:

  - integers compare exactly (`1000001` is not `1000000`); `1,234`, `1\\,234`, `11,\\! 111` and
    `1 000` are thousands separators, `1 2 3` is three numbers, not 123;
  - a decimal gold answer has a precision: a prediction written with more digits, or an exact value
    (`\\frac13`, `\\pi`), matches when it rounds to the gold at the gold's number of decimals
    (gold 0.33: 1/3 yes, 0.34 no); with as many digits or fewer it must be equal. Rounding is half
    away from zero, so each prediction rounds to one gold only (4.55 is 4.6, not 4.5: no hedge
    between two answers). With `decimals="exact"` (datasets whose decimal golds are exact values, as
    MATH's are; the `math_exact` reward) a decimal gold needs an exactly equal prediction too. An
    exact gold (integer, fraction, surd) needs an exactly equal prediction (`\\pi` is not 3.14);
  - LaTeX as LaTeX means it: `\\frac123` is (1/2)*3, `\\sqrt2` is sqrt(2); surds, powers and
    expressions in variables are compared with sympy (math-verify's LaTeX parser; no wall-clock
    limit inside: a reward is a function of the text alone, the verifier pool's timeout is the
    only one);
  - only known units are dropped (`5 \\mathrm{cm}`, `5\\,\\text{m}^2`, `12 dollars`): letters after
    a number are never assumed to be units (`5x`, `2i`, `3 pi` are not 5, 2, 3); other words make
    the comparison a string comparison;
  - plain comma lists compare in order, item by item (`1, 2` is not `2, 1`, and a list never equals
    one number); solutions joined by `and`/`or` or semicolons, the values of one unknown
    (`a = 4, -8, -10`) and lists of tuples are sets; tuples and intervals by their brackets and
    items; sets `\\{...\\}` as sets; matrices and vectors by shape and entries (pmatrix, bmatrix,
    matrix and a bracketed array alike);
  - equations as equations: `2x+4y-3=0` equals `y=-\\frac12x+\\frac34` (one side minus the other
    agrees up to a nonzero constant factor); `x = 5` equals 5.

The table this is measured against (false positives 0, false negatives counted) is
tests/data/math_answers.jsonl; `python benchmarks/bench_math_grader.py` prints the figures and the
disagreements with math-verify.
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from typing import Any

MAX_TEXT = 20_000  # characters of a completion looked at for answers (the end, where answers are)
MAX_ANSWER = 400  # longest answer handed to sympy

# --------------------------------------------------------------------------------------------------
# Extraction


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


# What may stand between boxes that together give one answer: `\boxed{1}, \boxed{2} and \boxed{3}`
_BETWEEN_BOXES = re.compile(r"^(?:\s|,|;|\\quad|\\qquad|\\[,;: ]|\$|\\\)|\\\(|\\\]|\\\[|"
                            r"\\text\{\s*(?:and|or|,)\s*\}|and|or)*$")


# Between a gold's boxes, a few words joined by `and`/`or` too: `\\boxed{1} papers and \\boxed{2} bins`
_BETWEEN_GOLD_BOXES = re.compile(_BETWEEN_BOXES.pattern + r"|^(?=.*\b(?:and|or)\b)[^{}$\\]{0,40}$")


def _last_boxes(text: str, command: str, between: re.Pattern = _BETWEEN_BOXES) -> str | None:
    """The last `command{...}`, or the last run of them separated only by `between` (commas, `and`,
    `\\quad` or math delimiters: several solutions boxed one by one), joined into one list (with
    `and` where words join them: a set of solutions)."""
    parts = []
    end = len(text)
    while True:
        start = text.rfind(command + "{", 0, end)
        if start == -1:
            break
        inner = _last_braced(text[start:end], command)
        if inner is None:
            break
        close = start + len(command) + 1 + len(inner) + 1
        if parts and not between.match(text[close:parts[-1][0]]):
            break
        parts.append((start, inner, re.search(r"\b(?:and|or)\b", text[close:end])))
        end = start
    if not parts:
        return None
    return "".join(inner + ("" if i == 0 else " and " if parts[i][2] else ", ")
                   for i, (_, inner, _) in reversed(list(enumerate(parts))))


_ANSWER_IS = re.compile(r"answer is[:\s]*([^\n]{1,200})", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=\S)\.\s+(?=[A-Z])|<\|")
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
    stated = None
    for stated in _ANSWER_IS.finditer(text):
        pass
    for command in ("\\boxed", "\\fbox"):
        boxed = _last_boxes(text, command)
        if boxed is not None:
            # `... = \\boxed{255}. ... Final Answer: The final answer is $10,455$.`: a later statement
            # of a number or formula wins over an intermediate box
            if stated and stated.start() > text.rfind(command + "{") and re.search(r"[\d$]", stated.group(1)):
                break
            return boxed
    m = None
    for m in _GSM8K.finditer(text):
        pass
    if m:
        return m.group(1)
    for m in _ANSWER_IS.finditer(text):
        pass
    if m:  # up to the end of its sentence: `... is $100$. I hope it is correct.`
        return _SENTENCE_END.split(m.group(1), maxsplit=1)[0].strip().rstrip(".")
    return None


# --------------------------------------------------------------------------------------------------
# Normalisation

_UNIT_WORDS = """mm cm dm m km in inch inches ft foot feet yd yard yards mi mile miles meter meters metre
metres centimeter centimeters millimeter millimeters kilometer kilometers mg g kg gram grams kilogram
kilograms lb lbs pound pounds oz ounce ounces ton tons tonne tonnes s sec secs second seconds min mins
minute minutes h hr hrs hour hours day days week weeks month months year years ml mL l L liter liters
litre litres gallon gallons cup cups quart quarts pint pints mph kph km/h m/s dollar dollars cent cents
euro euros degree degrees deg rad radian radians unit units percent percentage pct sq""".split()
_UNIT = "|".join(sorted((re.escape(u) for u in _UNIT_WORDS), key=len, reverse=True))
_LONG_UNIT = "|".join(sorted((re.escape(u) for u in _UNIT_WORDS if len(u) > 2), key=len, reverse=True))
_POWER = r"(?:\s*\^\s*\{?\s*[23]\s*\}?|[²³])?"
_TEXT_UNIT = re.compile(r"\\(?:text|textbf|textit|textnormal|mathrm|mathbf|mbox|rm)\s*\{\s*(?:(?:square|cubic|sq\.?)\s+)?"
                        rf"(?:{_UNIT})\s*\}}{_POWER}\s*$")
# A plain-text unit ends the answer; one of one or two letters only after a space (`5 m`, not `5m`).
_PLAIN_UNIT = re.compile(rf"(?:\s+(?:(?:square|cubic|sq\.?)\s+)?(?:{_UNIT})|(?<=[\d}}])(?:{_LONG_UNIT})){_POWER}\s*$|"
                         rf"(?<=\d)(?:{_UNIT})[²³]\s*$")  # `12m²`: a power sign makes a short unit sure
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textnormal|mathrm|mathbf|mbox|rm)\s*\{([^{}]{0,100})\}")
_NOISE = re.compile(r"\\(?:left|right|displaystyle)(?![a-zA-Z])|\\q?quad|(?<!\\)\\[!,;: ]\s*|~|\$|\\\$|\\[()\[\]]|"
                    r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\%|%|[€£¥]")
_FUNCTION_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
                   "log", "ln", "exp", "sqrt", "frac", "dfrac", "tfrac", "pi", "infty", "inf", "cdot", "times",
                   "div", "pm", "mp", "le", "ge", "leq", "geq", "neq", "ne", "lt", "gt", "in", "cup", "cap",
                   "emptyset", "varnothing", "mathbb", "begin", "end", "matrix", "pmatrix", "bmatrix",
                   "Bmatrix", "vmatrix", "Vmatrix", "smallmatrix", "alpha", "beta", "gamma", "delta",
                   "theta", "phi", "varphi", "lambda", "mu", "sigma", "omega", "tau", "rho", "epsilon", "to",
                   "circ", "prime", "dots", "ldots", "cdots", "mathbf", "vec", "overline", "hat", "det"}
# ASCII and short relation signs as LaTeX, so that `!=` and `>=` are not read as equations
_RELATIONS = ((">=", "\\geq "), ("<=", "\\leq "), ("!=", "\\neq "), ("\\ge ", "\\geq "), ("\\le ", "\\leq "),
              ("\\ne ", "\\neq "), ("\\lt", "<"), ("\\gt", ">"))
_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}")


def _unbraced_args(s: str) -> str:
    """`\\frac123` -> `\\frac{1}{2}3` and `\\sqrt2` -> `\\sqrt{2}`: a LaTeX argument is a braced group
    or one token (a character or a command), so brace every argument before parsing."""
    if "frac" not in s and "sqrt" not in s:
        return s
    out, i, n = [], 0, len(s)
    commands = (("\\dfrac", 2), ("\\tfrac", 2), ("\\frac", 2), ("\\sqrt", 1))
    while i < n:
        for name, nargs in commands:
            if s.startswith(name, i) and not (i + len(name) < n and s[i + len(name)].isalpha()):
                i += len(name)
                out.append("\\frac" if nargs == 2 else name)
                if name == "\\sqrt" and i < n and s[i] == "[":  # \sqrt[3]{x}
                    j = s.find("]", i)
                    if j == -1:
                        return "".join(out) + s[i:]
                    out.append(s[i:j + 1])
                    i = j + 1
                for _ in range(nargs):
                    while i < n and s[i] == " ":
                        i += 1
                    if i >= n:
                        break
                    if s[i] == "{":
                        depth, j = 0, i
                        while j < n:
                            depth += {"{": 1, "}": -1}.get(s[j], 0)
                            if depth == 0:
                                break
                            j += 1
                        out.append(_unbraced_args(s[i:j + 1]))
                        i = j + 1
                    elif s[i] == "\\":
                        m = re.match(r"\\[a-zA-Z]+|\\.", s[i:])
                        out.append("{" + m.group(0) + "}")
                        i += len(m.group(0))
                    else:
                        out.append("{" + s[i] + "}")
                        i += 1
                break
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def normalize_answer(ans: str) -> str:
    """Canonical string of an answer: known units, $, percent and degree signs, LaTeX spacing, \\left/
    \\right and trailing punctuation (. , ;) removed; \\text{} unwrapped; arguments of \\frac and \\sqrt braced;
    whitespace collapsed. (Also what majority votes count.)"""
    s = str(ans).strip().replace("{,}", ",")  # `14{,}916`
    s = re.sub(r"\\\\(?=[a-zA-Z])", r"\\", s)  # `\\le` written with an escaped backslash
    s = _TEXT_UNIT.sub("", s).strip()  # `5\,\text{m}^2`
    s = _TEXT_CMD.sub(lambda m: m.group(1), s)  # `\text{5 cm}` -> `5 cm`
    if re.search(r"[\d}]", s[:-1]):
        s = _PLAIN_UNIT.sub("", s)
    s = _NOISE.sub(lambda m: " " if m.group(0).startswith("\\quad") else "", s)
    s = s.strip().rstrip(".,;").strip()
    if re.search(r"[\d}]", s[:-1]):  # `12 dollars.`, `$5$ cm`
        s = _PLAIN_UNIT.sub("", s).strip()
    for ascii_, latex in _RELATIONS:
        s = s.replace(ascii_, latex)
    s = _unbraced_args(s)
    return " ".join(s.split())


# --------------------------------------------------------------------------------------------------
# Numbers written plainly: exact values with the precision they were written at

_DECIMAL = re.compile(r"^([-+]?)(\d{1,3}(?:,\d{3})+|\d{1,3}(?: \d{3})+|\d+)?(?:\.(\d+))?(?:[eE]([-+]?\d+))?$")
_DECIMAL_COMMA = re.compile(r"^[-+]?(?:\d{4,},\d{1,2}|0,\d+)$")
_FRAC = re.compile(r"^([-+]?)\\frac\{([-+]?\d+)\}\{([-+]?\d+)\}$")
_SLASH = re.compile(r"^([-+]?)(\d+)\s*/\s*([-+]?\d+)$")
_MIXED = re.compile(r"^(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}$")


def to_number(s: str) -> tuple[Fraction, int | None] | None:
    """(exact value, decimal places as written: 0 for an integer, None for an exact form such as a/b)
    of an integer or decimal (thousands separators and an exponent allowed), a/b, \\frac{a}{b} or a
    mixed number a\\frac{b}{c}; else None."""
    s = s.strip()
    if len(s) > 80 or not s:
        return None
    if _DECIMAL_COMMA.match(s):  # `1000,99`, `0,111`: a comma that cannot separate thousands
        s = s.replace(",", ".")
    m = _DECIMAL.match(s)
    if m and (m.group(2) or m.group(3)):
        sign, whole, digits, exponent = m.groups()
        exponent = int(exponent or 0)
        if abs(exponent) > 100:  # Fraction("1e999999999") would build a huge integer
            return None
        value = Fraction(int((whole or "0").replace(",", "").replace(" ", "")))
        if digits:
            value += Fraction(int(digits), 10 ** len(digits))
        if exponent:
            value *= Fraction(10) ** exponent
        return (-value if sign == "-" else value), max(len(digits or "") - exponent, 0)
    for pattern in (_FRAC, _SLASH):
        m = pattern.match(s)
        if m:
            sign, num, den = m.groups()
            if int(den) == 0:
                return None
            return Fraction(int(num), int(den)) * (-1 if sign == "-" else 1), None
    m = _MIXED.match(s)
    if m and int(m.group(3)) != 0 and int(m.group(2)) < int(m.group(3)):
        return int(m.group(1)) + Fraction(int(m.group(2)), int(m.group(3))), None
    return None


DECIMALS = ("rounded", "exact")


def _rounded(x: Fraction, places: int) -> Fraction:
    """x rounded to `places` decimals, half away from zero (4.55 -> 4.6, -4.55 -> -4.6)."""
    scaled = abs(x) * 10**places
    whole = scaled.numerator // scaled.denominator
    whole += scaled - whole >= Fraction(1, 2)
    return (1 if x >= 0 else -1) * Fraction(whole, 10**places)


def _close_at_precision(gold: Fraction, places: int, pred) -> bool:
    """Whether `pred` (a Fraction or a sympy number) rounds to `gold` at `places` decimals, half away
    from zero: a tie belongs to one side only, so no prediction matches two golds."""
    if isinstance(pred, Fraction):
        return _rounded(pred, places) == gold
    import sympy

    if getattr(pred, "is_Rational", False):
        return _rounded(Fraction(int(pred.p), int(pred.q)), places) == gold
    # An irrational is never exactly on a tie: strictly within half a unit of the last place.
    diff = sympy.N(pred - sympy.Rational(gold.numerator, gold.denominator), 60)
    return bool(diff.is_real) and bool(abs(diff) < sympy.Rational(1, 2 * 10**places))


LONG_DECIMAL = 6  # places from which a decimal of an exact fraction counts as that fraction


def _numbers_equal(gold: tuple[Fraction, int | None], pred: tuple[Fraction, int | None], exact: bool) -> bool:
    (g, g_places), (p, p_places) = gold, pred
    if g == p:
        return True
    # An exact fraction gold (1/12) and a long decimal of it (0.0833333333333333): equal when the
    # decimal is the fraction rounded or cut at its own number of places. Integers never: 999.9999999
    # is not 1000.
    if g_places is None and g.denominator != 1 and p_places is not None and p_places >= LONG_DECIMAL:
        cut = Fraction(int(g * 10**p_places), 10**p_places)  # toward zero
        return p in (_rounded(g, p_places), cut)
    # A decimal gold: a more precise prediction may round to it; an equally precise one must equal it.
    if not exact and g_places is not None and g_places > 0 and (p_places is None or p_places > g_places):
        return _close_at_precision(g, g_places, p)
    return False


# --------------------------------------------------------------------------------------------------
# Structure: lists, tuples and intervals, sets, matrices


def _split_top(s: str, sep: str | re.Pattern = ",") -> list[str]:
    """Split at `sep` (a string or a pattern) outside (), [], {} (and \\{ \\})."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and i >= start:
            m = sep.match(s, i) if isinstance(sep, re.Pattern) else (s.startswith(sep, i) and sep)
            if m:
                parts.append(s[start:i])
                start = m.end() if isinstance(sep, re.Pattern) else i + len(sep)
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


_MATRIX = re.compile(r"^\\begin\{(p|b|B|v|V|small|)matrix\}(.*)\\end\{\1matrix\}$", re.DOTALL)
# `\left[\begin{array}{cc} 1 & 2 \\ 3 & 4 \end{array}\right]`: an array in brackets is a matrix
_ARRAY = re.compile(r"^[\[(]\s*\\begin\{array\}\{[lcr| ]*\}(.*)\\end\{array\}\s*[\])]$", re.DOTALL)
_NUMBER_SPACE_NUMBER = re.compile(r"\d\s+[-+]?\d")


def _matrix(s: str) -> tuple[str, list[list[str]]] | None:
    m, array = _MATRIX.match(s), _ARRAY.match(s)
    if not (m or array):
        return None
    kind = "det" if m and m.group(1) in ("v", "V") else "matrix"
    rows = [r.strip() for r in (m.group(2) if m else array.group(1)).split("\\\\")]
    while rows and not rows[-1]:
        rows.pop()
    return kind, [[c.strip() for c in r.split("&")] for r in rows]


def _brackets(s: str) -> tuple[str, str, str] | None:
    """(open, close, inner) of a bracketed tuple, interval or set, else None."""
    if s.startswith("\\{") and s.endswith("\\}"):
        return "{", "}", s[2:-2]
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        inner = s[1:-1]
        # `(x+1)(x-1)` is not one bracketed group
        depth = 0
        for c in inner:
            depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(c, 0)
            if depth < 0:
                return None
        if depth == 0 and len(_tuple_items(inner)) > 1:
            return s[0], s[-1], inner
    return None


def _tuple_items(inner: str) -> list[str]:
    """Items of a tuple's or set's inside: split at commas, else at semicolons (`(0; -2; 6)`)."""
    items = _split_top(inner)
    return items if len(items) > 1 else _split_top(inner, ";")


# --------------------------------------------------------------------------------------------------
# Comparison

# What sympy would spend forever on: huge exponents, towers of powers, huge factorials.
_DANGEROUS = re.compile(r"(\*\*|\^)\s*\{?\s*\(?\s*\d{4,}|\^\s*\{[^{}]*\^|(\*\*|\^)\s*\(?\s*\w+\s*\)?\s*(\*\*|\^)|"
                        r"\d{5,}\s*!|\\underbrace|\\overbrace")
# `x =`, `x_1 =`, `f(x) =`, `(p, q) =` in front of an answer
_SIMPLE_LHS = re.compile(r"^(?:[A-Z]{2,3}|[a-zA-Z](?:_\{?\w{1,5}\}?)?|[a-zA-Z]\([a-zA-Z]\)|\((?:\s*[a-zA-Z]\s*,)+\s*[a-zA-Z]\s*\))"
                         r"\s*=\s*(?!.*=)(.+)$")
_CLOCK = re.compile(r"^\d+(?::\d+)+$")
_BASE = re.compile(r"^(\w+)_\{?(\d+)\}?$")


def _without_timeout_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Timeout is disabled")


def _sympy(s: str):
    """A sympy object of a LaTeX string through math-verify's parser, or None."""
    if len(s) > MAX_ANSWER or _DANGEROUS.search(s):
        return None
    from latex2sympy2_extended.math_normalization import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse

    # Its own normalisation off: it would drop any letters after a number as units (`4m` -> 4).
    config = LatexExtractionConfig(normalization_config=NormalizationConfig(
        basic_latex=True, units=False, malformed_operators=False, nits=False, boxed="none", equations=False))
    # Its timeout (SIGALRM, main thread only) is off: the verifier pool times each item out. It warns
    # about that once per process, into every run's output; the filter is added once (same object).
    logging.getLogger("math_verify.parser").addFilter(_without_timeout_warning)
    try:
        parsed = parse(f"${s}$", extraction_config=[config], parsing_timeout=None)
    except Exception:  # noqa: BLE001 - unparseable means "not shown equal"
        return None
    return parsed[0] if parsed and not isinstance(parsed[0], str) else None


def _exact(x):
    """sympy Floats (a decimal written in an expression) as exact rationals."""
    import sympy

    return x.xreplace({f: sympy.Rational(str(f)) for f in x.atoms(sympy.Float)}) if hasattr(x, "atoms") else x


def _expr_equal(a, b) -> bool:
    import sympy

    try:
        if any(isinstance(x, sympy.Basic) and x.has(sympy.zoo, sympy.nan) for x in (a, b)):
            return False  # `12:00` parses to zoo, and so does every other time of day
        if isinstance(a, sympy.Equality) or isinstance(b, sympy.Equality):
            if not (isinstance(a, sympy.Equality) and isinstance(b, sympy.Equality)):
                return False
            da, db = _exact(a.lhs - a.rhs), _exact(b.lhs - b.rhs)
            if da == 0 or db == 0:
                return da == db
            ratio = sympy.simplify(da / db)
            return bool(ratio.is_number and ratio.is_finite and ratio != 0)
        if isinstance(a, sympy.core.relational.Relational) or isinstance(b, sympy.core.relational.Relational):
            if not (isinstance(a, sympy.core.relational.Relational) and isinstance(b, sympy.core.relational.Relational)):
                return False
            ca, cb = a.canonical, b.canonical  # `5 \leq x` is `x \geq 5`
            return type(ca) is type(cb) and sympy.simplify(_exact(ca.lhs - ca.rhs) - _exact(cb.lhs - cb.rhs)) == 0
        if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr)):
            return a == b
        a, b = _exact(a), _exact(b)
        if a == b:
            return True
        diff = sympy.simplify(a - b)
        if diff == 0:
            return True
        if diff.is_number:  # equal surds sympy cannot simplify: 60 significant digits agree
            value = sympy.N(diff, 60)
            return bool(value.is_zero) or (value.is_real and abs(value) < sympy.Float("1e-45")) or False
        return False
    except Exception:  # noqa: BLE001 - sympy failures mean "not shown equal"
        return False


# `12 apples`: a number and a word or two that are not a unit (units are dropped already) and do not
# change its value (`5 thousand`, `3 squared`, `2 dozen`, `7 times 3`)
_NOUNS = re.compile(r"^([-+]?[\d.,]+)\s+([a-zA-Z]{3,}(?:\s+[a-zA-Z]{3,})?)$")
_VALUE_WORDS = {"hundred", "hundreds", "thousand", "thousands", "million", "millions", "billion", "billions",
                "trillion", "dozen", "dozens", "score", "gross", "squared", "cubed", "half", "halves", "third",
                "thirds", "quarter", "quarters", "fourth", "fourths", "fifth", "fifths", "tenth", "tenths",
                "hundredth", "hundredths", "thousandth", "thousandths", "percent", "times", "plus", "minus",
                "over", "less", "more", "fewer", "than", "divided", "factorial", "power", "root", "roots",
                "degrees", "radians", "pi", "and", "or", "not", "per", "each", "from", "to", "with", "off"}


def _number_and_nouns(s: str) -> str | None:
    """`12 apples` -> `12`, when the words cannot change the number (see _VALUE_WORDS); else None."""
    m = _NOUNS.match(s)
    if not m or any(w.lower() in _VALUE_WORDS or w.lower() in _FUNCTION_WORDS for w in m.group(2).split()):
        return None
    return m.group(1) if to_number(m.group(1)) is not None else None


def _scalar_equal(g: str, p: str, exact: bool) -> bool:
    if g == p:
        return True
    gn, pn = to_number(g), to_number(p)
    if gn is not None and pn is not None:
        return _numbers_equal(gn, pn, exact)
    if ":" in g or ":" in p:  # times and ratios: the same numbers in the same order
        return bool(_CLOCK.match(g) and _CLOCK.match(p)) and [int(x) for x in g.split(":")] == [int(x) for x in p.split(":")]
    for s in (g, p):  # `1 2 3` is three numbers; `5 apples` is words: string equality only
        if _NUMBER_SPACE_NUMBER.search(s) or any(w not in _FUNCTION_WORDS for w in _WORD.findall(s)):
            return g.lower() == p.lower()
    gb, pb = _BASE.match(g), _BASE.match(p)
    if gb or pb:  # 4210_{7}: digits and base must both agree
        return bool(gb and pb and gb.groups() == pb.groups())
    gs, ps = _sympy(g), _sympy(p)
    if gs is None or ps is None:
        return False
    if not exact and gn is not None and gn[1] and getattr(ps, "is_number", False):  # decimal gold, exact prediction
        return _close_at_precision(gn[0], gn[1], ps)
    return _expr_equal(gs, ps)  # an exact gold needs an exactly equal prediction (decimals made exact)


def _unwrap(s: str) -> str:
    """`{4}` -> `4`: braces around the whole answer group nothing."""
    while len(s) > 2 and s[0] == "{" and s[-1] == "}" and _split_top(s[1:-1], "}")[0] == s[1:-1]:
        s = s[1:-1].strip()
    return s


_GOLD_DECIMAL_COMMA = re.compile(r"^[-+]?\d+,\d{1,2}$")
_IN = re.compile(r"^[a-zA-Z]\s*\\in\s*(.+)$")
_BETWEEN = re.compile(r"^([^<=>]+?)\s*(\\leq|<)\s*([a-zA-Z](?:\([a-zA-Z]\))?)\s*(\\leq|<)\s*([^<=>]+)$")


def _interval(s: str, inequality: bool = True) -> str | None:
    """`x \\in [-2, 7]` -> `[-2, 7]`; with `inequality`, `-2 \\leq x \\leq 7` -> `[-2, 7]` and
    `0 < f(x) < 1` -> `(0, 1)`; else None."""
    m = _IN.match(s)
    if m:
        return m.group(1).strip()
    m = _BETWEEN.match(s) if inequality else None
    if not m or "\\leq" in m.group(1) + m.group(5) or "\\geq" in m.group(1) + m.group(5):
        return None
    lo, first, _, second, hi = (x.strip() for x in m.groups())
    return ("[" if first == "\\leq" else "(") + f"{lo}, {hi}" + ("]" if second == "\\leq" else ")")


_PM = re.compile(r"^\\(?:pm|mp)\s*(.+)$")


def _plus_minus(s: str) -> list[str] | None:
    """`\\pm 2021` -> [`-2021`, `2021`]: the two values it stands for; else None."""
    m = _PM.match(s)
    if not m:
        return None
    x = m.group(1).strip()
    simple = to_number(x) is not None or re.fullmatch(r"\\?[a-zA-Z]+(?:\{[^{}]*\})*", x)
    return [f"-{x}" if simple else f"-({x})", x]


def _as_set(s: str) -> list[str]:
    """The items of a set `\\{a, b\\}` or of a list `a, b`."""
    b = _brackets(s)
    return _tuple_items(b[2]) if b and b[0] == "{" else _split_top(s)


# `1 and -2`, `21, 16 or 11`, `(11,7)or(7,11)`: solutions or alternatives joined by words
_JOINING_WORD = re.compile(r"\s*(?<![a-zA-Z\\])(?:and|or)(?![a-zA-Z])\s*")


def _items(s: str) -> tuple[list[str], bool]:
    """The items of a list answer, and whether they are a set of solutions (any order): joined by
    `and`/`or`, or by semicolons (`-12; -11; -10`, `p=5, q=2; p=7, q=2` as the pairs (5, 2), (7, 2)).
    A plain comma list keeps its order (MATH's lists: `10, 4, -2` is not `4, 10, -2`)."""
    if to_number(s) is not None:
        return [s], False
    groups = _split_top(s, ";")
    if len(groups) > 1:
        items = []
        for group in (_split_top(x) for x in groups if x):
            labels = [_SIMPLE_LHS.match(x) for x in group]
            values = [m.group(1).strip() for m in labels] if all(labels) else group
            items.append(values[0] if len(values) == 1 else "(" + ", ".join(values) + ")")
        return items, True
    items, joined = [], False
    for part in _split_top(s):
        words = [x for x in _split_top(part, _JOINING_WORD) if x]
        joined |= len(words) > 1 or words != [part]
        items += words
    return items, joined


def _distinct(items: list[str]) -> list[str]:
    """A set's items without repeats (`(3,17,3,7)` listed twice is one solution)."""
    seen, out = set(), []
    for x in items:
        key = "".join(x.split())
        if key not in seen:
            seen.add(key)
            out.append(x)
    return out


def _tuple_value(s: str) -> str:
    """`(x, y) = (5, 8)` -> `(5, 8)`: a tuple named by its unknowns."""
    m = _SIMPLE_LHS.match(s)
    return m.group(1).strip() if m and s.startswith("(") and _is_tuple(m.group(1).strip()) else s


# A name in front of a gold value (`V_{1}:V_{2} = 11:21`, `\frac{NO}{BO} = ...`, `|AB| = 1`): letters,
# subscripts, ratio and fraction signs only, no operator or digit outside subscripts
_NAME_PARTS = re.compile(r"_\{[^{}]*\}|_\w|\\frac|\\angle|\\triangle|[{}|:/()\s]")


def _gold_value(g: str) -> str | None:
    """The value a gold answer names (`S_{MBCN}:S = 7:32` -> `7:32`), else None."""
    lhs, eq, rhs = g.partition("=")
    if not eq or "=" in rhs or not rhs.strip():
        return None
    return rhs.strip() if re.fullmatch(r"[A-Za-z]{1,8}", _NAME_PARTS.sub("", lhs)) else None


def _is_tuple(s: str) -> bool:
    b = _brackets(s)
    return b is not None and b[:2] == ("(", ")")


def _has_words(s: str) -> bool:
    """Whether `s` holds words (prose), not only a formula's names and commands."""
    return any(w not in _FUNCTION_WORDS for w in _WORD.findall(s))


def _same_items(ga: list[str], pa: list[str], exact: bool, depth: int) -> bool:
    """Every item of `ga` matched by one item of `pa` (a multiset), in any order."""
    if len(ga) != len(pa):
        return False
    left = list(pa)
    for a in ga:
        hit = next((k for k, b in enumerate(left) if _equal(a, b, exact, depth + 1)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


def _equal(g: str, p: str, exact: bool, depth: int = 0) -> bool:
    g, p = _unwrap(g), _unwrap(p)
    if depth > 8 or not p:
        return False
    if g == p:
        return True
    if to_number(g) is not None:  # `1,200 people` is one number, not a list
        p = _number_and_nouns(p) or p
    if _GOLD_DECIMAL_COMMA.match(g):  # a gold `1,22` is 1.22 (a prediction's `1,2` stays a list)
        return to_number(p) is not None and _numbers_equal(to_number(g.replace(",", ".")), to_number(p), exact)
    # a gold inequality `-2 \leq x \leq 7` is the interval `x \in [-2, 7]` (math-verify's tests take a
    # predicted inequality for an interval gold as wrong: the answer asked for a set)
    gi, pi_ = _interval(g), _interval(p, inequality=False)
    if gi or pi_:
        g, p = gi or g, pi_ or p
        if g == p:
            return True
    # `\pm x`: the set {-x, x}, against a set, a list of two or another `\pm`
    g_pm, p_pm = _plus_minus(g), _plus_minus(p)
    if g_pm or p_pm:
        return _same_items(g_pm or _as_set(g), p_pm or _as_set(p), exact, depth)
    # lists: in order, item by item, unless the gold joins them as solutions (see _items); a list
    # never equals a single item. A list of tuples is the set of a system's solutions: in any order.
    (g_items, g_set), (p_items, _) = _items(g), _items(p)
    if len(g_items) > 1 or len(p_items) > 1:
        g_items, p_items = [_tuple_value(x) for x in g_items], [_tuple_value(x) for x in p_items]
        if all(_is_tuple(x) for x in g_items + p_items):
            return _same_items(_distinct(g_items), _distinct(p_items), exact, depth)
        if g_set and len(p_items) == 1 and (pb := _brackets(p_items[0])) and pb[0] == "{":
            p_items = _tuple_items(pb[2])  # solutions `1; 3` against the set `\{1, 3\}`
        g_labels, p_labels = ([_SIMPLE_LHS.match(x) for x in items] for items in (g_items, p_items))
        if all(g_labels) and all(p_labels):  # `a_3 = 2, a_{37} = 19`: named values, in any order
            return _same_items(g_items, p_items, exact, depth)
        if all(g_labels) and not any(p_labels):  # `AB = 4, CD = 5` against `4, 5`
            g_items = [m.group(1).strip() for m in g_labels]
        elif g_labels[0] and not any(g_labels[1:]) and re.fullmatch(r"[a-zA-Z]", name := g_items[0].split("=")[0].strip()):
            # `a = 4, -8, -10`: the values of one unknown, a set of solutions
            g_items, g_set = [g_labels[0].group(1).strip(), *g_items[1:]], True
            if p_labels[0] and not any(p_labels[1:]) and p_items[0].split("=")[0].strip() == name:
                p_items = [p_labels[0].group(1).strip(), *p_items[1:]]
        if g_set:
            return _same_items(g_items, p_items, exact, depth)
        return len(g_items) == len(p_items) and all(_equal(a, b, exact, depth + 1) for a, b in zip(g_items, p_items))
    # a chain `x = 5 + 5 + 1 = 11`: its last member is the answer (a formula's, not a sentence's)
    if p.count("=") > 1 and g.count("=") <= 1 and not _has_words(p):
        last = p.rsplit("=", 1)[1].strip()
        if "=" not in g:
            return _equal(g, last, exact, depth + 1)
        gm, pm = _SIMPLE_LHS.match(g), _SIMPLE_LHS.match(p.split("=", 1)[0] + "= " + last)
        return bool(gm and pm and g.split("=")[0].strip() == p.split("=")[0].strip()
                    and _equal(gm.group(1).strip(), last, exact, depth + 1))
    if g.count("=") > 1 and "=" not in p and not _has_words(g):  # a chain gold `1 = z = x = 0` against `0`
        return _equal(g.rsplit("=", 1)[1].strip(), p, exact, depth + 1)
    if g.count("=") > 1 and p.count("=") > 1 and not _has_words(g + " " + p):  # two chains `z = 1 + 1 = 2`, `z = 3 + 3 = 2`: what they name, where they end
        return (g.split("=", 1)[0].strip() == p.split("=", 1)[0].strip()
                and _equal(g.rsplit("=", 1)[1].strip(), p.rsplit("=", 1)[1].strip(), exact, depth + 1))
    # equations, and `x = 5` against `5`
    g_eq, p_eq = "=" in g, "=" in p
    if g_eq != p_eq:
        m = _SIMPLE_LHS.match(p if p_eq else g)
        if not m:  # a gold may name its value more freely (`V_{1}:V_{2} = 11:21`): it is trusted text
            value = _gold_value(g) if g_eq else None
            return value is not None and _equal(value, p, exact, depth + 1)
        return _equal(g, m.group(1).strip(), exact, depth + 1) if p_eq else _equal(m.group(1).strip(), p, exact, depth + 1)
    if g_eq and p_eq:
        gm, pm = _SIMPLE_LHS.match(g), _SIMPLE_LHS.match(p)
        if gm and pm and g.split("=")[0].strip() == p.split("=")[0].strip():
            return _equal(gm.group(1).strip(), pm.group(1).strip(), exact, depth + 1)
        if g.count("=") != 1 or p.count("=") != 1:
            return False
        gs, ps = _sympy(g), _sympy(p)
        return gs is not None and ps is not None and _expr_equal(gs, ps)
    # matrices and vectors
    gm, pm = _matrix(g), _matrix(p)
    if gm or pm:
        if not (gm and pm) or gm[0] != pm[0] or [len(r) for r in gm[1]] != [len(r) for r in pm[1]]:
            return False
        return all(_equal(a, b, exact, depth + 1) for ra, rb in zip(gm[1], pm[1]) for a, b in zip(ra, rb))
    # tuples, intervals, sets
    gb, pb = _brackets(g), _brackets(p)
    if gb or pb:
        if not (gb and pb) or gb[:2] != pb[:2]:
            return False
        ga, pa = _tuple_items(gb[2]), _tuple_items(pb[2])
        if len(ga) != len(pa):
            return False
        if gb[0] == "{":  # a set: every item matched once
            left = list(pa)
            for a in ga:
                hit = next((k for k, b in enumerate(left) if _equal(a, b, exact, depth + 1)), None)
                if hit is None:
                    return False
                left.pop(hit)
            return True
        return all(_equal(a, b, exact, depth + 1) for a, b in zip(ga, pa))
    return _scalar_equal(g, p, exact)


def matches(gold: Any, text: str | None, decimals: str = "rounded") -> bool:
    """`answers_match` of the answer `text` states (####, \\boxed{}, <answer>, "the answer is"; else
    what its last sentence states, `_stated_in_prose`; else its one formula), or of `text` itself:
    one call for completions and bare answers alike. A reward (`math_reward`) needs the markers."""
    if text is None or gold is None:
        return False
    answer = extract_answer(text)
    if answer is None:  # `Final Answer: The largest $n$ is 34.`: a last sentence that states it
        answer = _stated_in_prose(text)
    if answer is None:  # `Therefore $x \\geq 5$ is the solution.`: a sentence around its one formula
        answer = _sole_formula(text)
    return answers_match(_gold(gold), text if answer is None else answer, decimals)


# Display math may span lines; inline math ($...$, \\(...\\)) stays on one, as math-verify reads it.
_FORMULA = re.compile(r"\$\$([\s\S]+?)\$\$|\$([^$\n]+?)\$|\\\[([\s\S]+?)\\\]|\\\(([^\n]+?)\\\)")


def _sole_formula(text: str) -> str | None:
    """The formula of a short text that holds exactly one ($...$, $$...$$, \\[...\\], \\(...\\)), else None."""
    if len(text) > 300:
        return None
    found = [_inner(m) for m in _FORMULA.finditer(text)]
    return found[0].strip() if len(found) == 1 and text.strip() != found[0].strip() else None


def _inner(formula: re.Match) -> str:
    """The math inside a `_FORMULA` match, whichever delimiters it has."""
    return next(g for g in formula.groups() if g is not None)


_TURN_END = re.compile(r"<\|(?:im_start|im_end|endoftext|eot_id|end_of_turn)\|>|</s>|<end_of_turn>")
_HOPE = re.compile(r"\s*I hope it is correct\.?\s*$", re.IGNORECASE)
_FINAL_ANSWER = re.compile(r"final answer\s*:", re.IGNORECASE)
_SENTENCE = re.compile(r"[.!?](?:\$\$|\\\])?\s+(?=[A-Z])|(?<=\$)\s+(?=(?:So|Thus|Therefore|Hence|Finally)\b)")
_IS = re.compile(r"(?<![a-zA-Z])(?:is|are|it's|equals)\s+")
_MARKERS = re.compile(r"<answer>|</answer>|\\boxed|\\fbox|####")
_NUMBER = re.compile(r"(?<![\w.,])[-+]?\d+(?:,\d{3})*(?:\.\d+)?%?(?![\w,]|\.\d)")


def _stated_in_prose(text: str) -> str | None:
    """The answer a completion states in its last words without a marker, else None: in what follows
    "Final Answer:" (or in the last sentence), what the last `is`/`are` leads to when it is one
    number or one formula (`... is $(7, 6)$.`), else the one number or formula with a digit there
    (`Jane started 3 hours ago.`). A chat turn's end and "I hope it is correct." are not the answer."""
    text = _TURN_END.split(text[-MAX_TEXT:], maxsplit=1)[0]
    if _MARKERS.search(text):  # a marker it did not complete (`\\boxed{6`, `<answer></answer>`): none
        return None
    text = _HOPE.sub("", text.rsplit("</think>", 1)[-1].rstrip())
    final = None
    for final in _FINAL_ANSWER.finditer(text):
        pass
    segment = text[final.end():] if final else _SENTENCE.split(text)[-1]
    segment = segment.strip().rstrip(".").strip()
    if not segment or len(segment) > 300:
        return None
    tail = _IS.split(segment)[-1].strip() if _IS.search(segment) else None
    if tail:
        formula = _FORMULA.fullmatch(tail)
        if formula:
            return _inner(formula).strip()
        if to_number(normalize_answer(tail)) is not None:
            return tail
    rest = _FORMULA.sub(" ", segment)
    if "$" in rest or "\\(" in rest or "\\[" in rest:  # math left open (`Answer $ 9` over lines): not read
        return None
    # formulas with a digit (not names such as $n$), and plain numbers outside formulas
    found = [f for f in map(_inner, _FORMULA.finditer(segment)) if re.search(r"\d", f)] + _NUMBER.findall(rest)
    return found[0].strip() if len(found) == 1 else None


def answers_match(gold: Any, pred: str | None, decimals: str = "rounded") -> bool:
    """True when the predicted answer equals the gold one (see the module docstring for the rules).
    decimals: "rounded" (a decimal gold is a rounded value) or "exact" (it is exact)."""
    if decimals not in DECIMALS:
        raise ValueError(f"decimals={decimals!r}; expected one of {DECIMALS}")
    if pred is None or gold is None:
        return False
    g, p = normalize_answer(str(gold)), normalize_answer(str(pred))
    if not p or not g:
        return False
    return _equal(g, p, decimals == "exact")


def math_reward(completion: str | None, answer: Any, decimals: str = "rounded") -> float:
    """1.0 when the completion's final answer matches `answer`, else 0.0. A gold answer written as a
    solution (`#### 42`, `\\boxed{42}`) is reduced to its final answer first."""
    if answer is None:
        return 0.0
    return 1.0 if answers_match(_gold(answer), extract_answer(completion), decimals) else 0.0


def format_reward(completion: str | None) -> float:
    """1.0 when the completion states a final answer `math_reward` can read and it is a number, right
    or wrong (the format half of `math_reward`), else 0.0."""
    pred = extract_answer(completion)
    return 0.0 if pred is None or to_number(normalize_answer(pred)) is None else 1.0


def _gold(answer: Any) -> str:
    """A gold answer written as a solution reduced to its final answer: `#### 42`, its boxes (with a few
    words between them: `\\boxed{1} papers and \\boxed{2} bins` is both), "the final answer is 28%"."""
    gold = str(answer)
    if "\\boxed" in gold and "####" not in gold and "answer is" not in gold:
        boxed = _last_boxes(gold[-MAX_TEXT:], "\\boxed", _BETWEEN_GOLD_BOXES)
        if boxed is None:
            return gold
        named = re.search(r"(?<![\\a-zA-Z])([a-zA-Z])\s*=\s*\\boxed\{" + re.escape(boxed) + r"\}\W*$", gold)
        return f"{named.group(1)} = {boxed}" if named else boxed  # `n = \\boxed{1,-2}`: the values of n
    if "####" in gold or "\\boxed" in gold or (len(gold) > 200 and _ANSWER_IS.search(gold)):
        return extract_answer(gold) or gold
    return gold
