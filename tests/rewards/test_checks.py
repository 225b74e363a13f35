"""Format and countdown verifiers, and the reward-function interface (math answers: test_math_grader)."""

import numpy as np
import pytest

from grpo_jax.rewards import checks
from grpo_jax.rewards import scoring

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
    assert checks.format_reward(completion, strict=True) == strict
    assert checks.format_reward(completion, strict=False) == lenient
    assert checks.tag_count_reward(completion) == tags


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
    assert checks.countdown_reward(completion, numbers, target) == expected


@pytest.mark.xdist_group("sandbox")  # sandboxes: with the others (test_sandbox counts them)
def test_code_reward_stdio_and_asserts():
    solution = "```python\nn = int(input())\nprint(n * 2)\n```"
    assert checks.code_reward(solution, [{"input": "3", "output": "6"}, {"input": "5\n", "output": "10\n"}]) == 1.0
    assert checks.code_reward(solution, [{"input": "3", "output": "6"}, {"input": "5", "output": "11"}]) == 0.5
    fn = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert checks.code_reward(fn, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]) == pytest.approx(2 / 3)
    # Exiting early with status 0 does not pass assert tests.
    assert checks.code_reward("import os\nos._exit(0)", ["assert False"]) == 0.0
    assert checks.code_reward("import sys\nsys.exit(0)", ["assert False"]) == 0.0
    assert checks.code_reward(None, ["assert True"]) == 0.0


@pytest.mark.parametrize("length,expected", [(0, 0.0), (80, 0.0), (90, -0.5), (100, -1.0), (101, -1.0)])
def test_overlong_penalty(length, expected):
    assert checks.overlong_penalty(length, max_length=100, buffer=20) == pytest.approx(expected)


# ---- the interface -------------------------------------------------------------------------------


def not_applicable_on_odd(prompts, completions, **columns):
    return [None if len(c) % 2 else 1.0 for c in completions]


def test_registry_and_module_function():
    assert scoring.get_reward_fn("math") is scoring.math_accuracy
    assert scoring.get_reward_fn("test_checks:not_applicable_on_odd") is not None
    with pytest.raises(ValueError, match="unknown reward function 'maths'"):
        scoring.get_reward_fn("maths")
    with pytest.raises(ValueError, match="cannot be imported"):
        scoring.get_reward_fn("no_such_module:fn")


def test_score_weights_none_and_metrics():
    completions = ["#### 3", "#### 4", "<think>a</think><answer>3</answer>", "oops"]
    columns = {"answer": ["3", "3", "3", "3"]}
    total, per_fn, m = scoring.score([scoring.RewardSpec("math", 1.0), scoring.RewardSpec("format_strict", 0.5),
                                scoring.RewardSpec("odd", 2.0)], [""] * 4, completions, columns,
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
        scoring.math_accuracy([""], ["#### 1"])
