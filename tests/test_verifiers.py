"""Verifiers on real-world answers, and the reward-function interface."""

import numpy as np
import pytest

from grpo_jax import rewards
from grpo_jax import verifiers

# (gold answer, completion, expected reward). Numbers, fractions, LaTeX, units, tuples, malformed.
ANSWER_TABLE = [
    # GSM8K style
    ("72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),
    ("72", "#### 72.", 1.0),
    ("72", "#### 71", 0.0),
    ("1234", "#### 1,234", 1.0),
    ("1234567", "#### 1,234,567", 1.0),
    ("18", "She makes 9 * 2 = $18 every day.\n#### $18", 1.0),
    ("10", "#### 10 dollars", 1.0),
    ("5", "#### 5 apples", 1.0),
    ("0.5", "#### .5", 1.0),
    ("-3", "#### -3", 1.0),
    ("-3", "#### 3", 0.0),
    ("20", "#### 20%", 1.0),
    ("1,000", "#### 1000", 1.0),
    ("3.0", "#### 3", 1.0),
    ("3", "#### 3.00", 1.0),
    ("7", "#### seven", 0.0),
    # "the answer is"
    ("42", "So the answer is 42.", 1.0),
    ("42", "The answer is: 42", 1.0),
    ("42", "Therefore, the answer is $42$.", 1.0),
    ("42", "the answer is 41", 0.0),
    ("12", "The final answer is 12 apples.", 1.0),
    # \boxed{}
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}}", 1.0),
    ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),
    ("0.5", "\\boxed{\\dfrac{1}{2}}", 1.0),
    ("\\frac{1}{2}", "\\boxed{1/2}", 1.0),
    ("\\frac{1}{2}", "\\boxed{\\frac{2}{4}}", 1.0),
    ("\\frac{1}{3}", "\\boxed{0.33}", 0.0),
    ("\\frac{1}{3}", "\\boxed{\\frac{1}{2}}", 0.0),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1.0),
    ("\\sqrt{2}", "\\boxed{\\frac{2}{\\sqrt{2}}}", 1.0),
    ("\\sqrt{3}", "\\boxed{\\sqrt{2}}", 0.0),
    ("\\frac{\\pi}{2}", "\\boxed{\\pi/2}", 1.0),
    ("2\\pi", "\\boxed{2\\pi}", 1.0),
    ("\\pi", "\\boxed{3.14}", 0.0),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1.0),
    ("x^2+2x+1", "\\boxed{(x-1)^2}", 0.0),
    ("2x+3", "\\boxed{3+2x}", 1.0),
    ("(1,2)", "\\boxed{(1,2)}", 1.0),
    ("(1,2)", "\\boxed{(2,1)}", 0.0),
    ("(3, -4)", "\\boxed{(3,-4)}", 1.0),
    ("[1,3)", "\\boxed{[1,3)}", 1.0),
    ("[1,3)", "\\boxed{(1,3)}", 0.0),
    ("(-\\infty, 2]", "\\boxed{(-\\infty,2]}", 1.0),
    ("10", "\\boxed{10\\%}", 1.0),
    ("90", "\\boxed{90^\\circ}", 1.0),
    ("5", "\\boxed{\\text{5 cm}}", 1.0),
    ("5", "\\boxed{x = 5}", 1.0),
    ("\\frac{3}{4}", "\\boxed{\\frac{6}{8}}", 1.0),
    ("3", "\\boxed{\\boxed{3}}", 1.0),
    ("\\frac{1}{2}", "first \\boxed{3} then corrected: \\boxed{\\frac{1}{2}}", 1.0),
    ("{1,2}", "\\boxed{\\{1,2\\}}", 1.0),
    ("4", "\\boxed{{4}}", 1.0),
    ("\\frac{a+b}{2}", "\\boxed{\\frac{b+a}{2}}", 1.0),
    # <answer> tags (R1 template)
    ("6", "<think>2*3</think>\n<answer>6</answer>", 1.0),
    ("6", "<think>...</think><answer>\\boxed{6}</answer>", 1.0),
    ("6", "<think>...</think><answer> 6 </answer>", 1.0),
    ("6", "<think>...</think><answer>7</answer>", 0.0),
    ("6", "<think>the answer is 6</think><answer></answer>", 0.0),
    ("(1,2)", "<answer>(1, 2)</answer>", 1.0),
    # malformed / no answer
    ("6", "", 0.0),
    ("6", "I don't know.", 0.0),
    ("6", "\\boxed{6", 0.0),
    ("6", "\\boxed{}", 0.0),
    ("6", "####", 0.0),
    ("6", "<answer>6", 0.0),
    ("6", "\\boxed{\\frac{6}{}}", 0.0),
    ("6", "#### 6/0", 0.0),
]


@pytest.mark.parametrize("gold,completion,expected", ANSWER_TABLE)
def test_answer_table(gold, completion, expected):
    assert verifiers.math_reward(completion, gold) == expected


def test_answer_table_is_large_and_balanced():
    assert len(ANSWER_TABLE) >= 60
    verdicts = [e for _, _, e in ANSWER_TABLE]
    assert verdicts.count(1.0) >= 25 and verdicts.count(0.0) >= 20


def test_gold_in_gsm8k_format_is_extracted():
    assert verifiers.math_reward("#### 8", "Janet has 5+3 apples.\n#### 8") == 1.0
    assert verifiers.math_reward("#### 8", "Janet has 5+3 apples.\n#### 9") == 0.0


@pytest.mark.parametrize("completion,strict,lenient,tags", [
    ("<think>\nadd them\n</think>\n<answer>\n6\n</answer>", 1, 1, 1.0),
    ("<think>a</think><answer>6</answer>", 1, 1, 1.0),
    ("  <think>a</think>\n\n<answer>6</answer>\n", 1, 1, 1.0),
    ("Sure! <think>a</think><answer>6</answer>", 0, 1, 1.0),
    ("<think>a</think> so <answer>6</answer>", 0, 1, 1.0),
    ("<think>a</think><answer>6</answer> bye", 0, 1, 1.0),
    ("<answer>6</answer><think>a</think>", 0, 0, 1.0),
    ("<think>a</think><think>b</think><answer>6</answer>", 0, 1, 0.5),
    ("<think>a</think>", 0, 0, 0.5),
    ("6", 0, 0, 0.0),
    ("", 0, 0, 0.0),
])
def test_format_rewards(completion, strict, lenient, tags):
    assert verifiers.format_reward(completion, strict=True) == strict
    assert verifiers.format_reward(completion, strict=False) == lenient
    assert verifiers.tag_count_reward(completion) == tags


@pytest.mark.parametrize("completion,numbers,target,expected", [
    ("<answer>(6*4) - (3-1)</answer>", [6, 4, 3, 1], 22, 1.0),
    ("<answer>6*4-3+1</answer>", [6, 4, 3, 1], 22, 1.0),
    ("<answer>(100 - 4) / 6</answer>", [100, 4, 6], 16, 1.0),
    ("<answer>6*4-3+1 = 22</answer>", [6, 4, 3, 1], 22, 1.0),
    ("<answer>6 × 4 − 2</answer>", [6, 4, 2], 22, 0.0),  # a unicode minus is not an operator
    ("<answer>6 × 4 - 2</answer>", [6, 4, 2], 22, 1.0),
    ("<answer>6*4</answer>", [6, 4, 3, 1], 24, 0.0),  # not all numbers used
    ("<answer>6*4*1*1</answer>", [6, 4, 1], 24, 0.0),  # 1 used twice
    ("<answer>7/2*2</answer>", [7, 2, 2], 7, 1.0),  # exact fractions
    ("<answer>1/(3-3)</answer>", [1, 3, 3], 0, 0.0),
    ("<answer>2**5</answer>", [2, 5], 32, 0.0),  # powers are not allowed
    ("<answer>__import__('os').system('ls')</answer>", [1], 1, 0.0),
    ("<answer>[6, 4]</answer>", [6, 4], 10, 0.0),
    ("<answer>6.5 + 3.5</answer>", [6, 4], 10, 0.0),
    ("thinking...\n6 + 4", [6, 4], 10, 1.0),
    ("", [6, 4], 10, 0.0),
])
def test_countdown(completion, numbers, target, expected):
    assert verifiers.countdown_reward(completion, numbers, target) == expected


def test_code_reward_stdio_and_asserts():
    solution = "```python\nn = int(input())\nprint(n * 2)\n```"
    assert verifiers.code_reward(solution, [{"input": "3", "output": "6"}, {"input": "5\n", "output": "10\n"}]) == 1.0
    assert verifiers.code_reward(solution, [{"input": "3", "output": "6"}, {"input": "5", "output": "11"}]) == 0.5
    fn = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert verifiers.code_reward(fn, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]) == pytest.approx(2 / 3)
    # Exiting early with status 0 does not pass assert tests.
    assert verifiers.code_reward("import os\nos._exit(0)", ["assert False"]) == 0.0
    assert verifiers.code_reward("import sys\nsys.exit(0)", ["assert False"]) == 0.0
    assert verifiers.code_reward(None, ["assert True"]) == 0.0


@pytest.mark.parametrize("length,expected", [(0, 0.0), (80, 0.0), (90, -0.5), (100, -1.0), (101, -1.0)])
def test_overlong_penalty(length, expected):
    assert verifiers.overlong_penalty(length, max_length=100, buffer=20) == pytest.approx(expected)


# ---- the interface -------------------------------------------------------------------------------


def not_applicable_on_odd(prompts, completions, **columns):
    return [None if len(c) % 2 else 1.0 for c in completions]


def test_registry_and_module_function():
    assert rewards.get_reward_fn("math") is rewards.math_accuracy
    assert rewards.get_reward_fn("test_verifiers:not_applicable_on_odd") is not None
    with pytest.raises(ValueError, match="unknown reward function 'maths'"):
        rewards.get_reward_fn("maths")
    with pytest.raises(ValueError, match="cannot be imported"):
        rewards.get_reward_fn("no_such_module:fn")


def test_score_weights_none_and_metrics():
    completions = ["#### 3", "#### 4", "<think>a</think><answer>3</answer>", "oops"]
    columns = {"answer": ["3", "3", "3", "3"]}
    total, per_fn, m = rewards.score([rewards.RewardSpec("math", 1.0), rewards.RewardSpec("format_strict", 0.5),
                                rewards.RewardSpec("odd", 2.0)], [""] * 4, completions, columns,
                               fns={"odd": not_applicable_on_odd})
    np.testing.assert_allclose(per_fn["math"], [1, 0, 1, 0])
    np.testing.assert_allclose(per_fn["format_strict"], [0, 0, 1, 0])
    odd = [np.nan if len(c) % 2 else 1.0 for c in completions]
    np.testing.assert_allclose(per_fn["odd"], odd)
    want = np.array([1, 0, 1.5, 0]) + 2.0 * np.nan_to_num(odd)
    np.testing.assert_allclose(total, want)
    assert m["rewards/odd/frac_none"] == pytest.approx(np.isnan(odd).mean())
    assert m["rewards/math/mean"] == 0.5 and m["rewards/math/std"] == 0.5


def test_missing_column_is_a_clear_error():
    with pytest.raises(KeyError, match="column 'answer'"):
        rewards.math_accuracy([""], ["#### 1"])


def test_huge_and_tiny_exponents_neither_overflow_nor_hang():
    # Found by the default run: "1e999" made float(Fraction) raise OverflowError inside the verifier.
    assert not verifiers.answers_match("5", "1e999") and verifiers.answers_match("1e999", "1e999")
    assert not verifiers.answers_match("5", "1e999999999")  # never builds 10**999999999
    assert verifiers.to_number("1e999999999") is None and verifiers.to_number("2.5e3") == 2500
    assert verifiers.answers_match("0.3333333", "1/3") and verifiers.answers_match("100", "100.00001")
    assert not verifiers.answers_match("100", "100.001") and verifiers.answers_match("0", "1e-12")
