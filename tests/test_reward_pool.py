"""Hostile completions: every item is scored within its time limit and nothing reaches this process."""

import os
import time

import numpy as np
import pytest

from grpo_jax import math_grader
from grpo_jax import rewards
from grpo_jax import sandbox
from grpo_jax import verifier_pool
from grpo_jax import verifiers

TIMEOUT = 3.0


@pytest.fixture(scope="module")
def pool():
    with verifier_pool.VerifierPool(num_workers=2, timeout_s=TIMEOUT, memory_mb=2048) as p:
        yield p


HOSTILE_MATH = [
    "\\boxed{10^{10^{10}}}",
    "\\boxed{9^{9^{9^{9}}}}",
    "#### 10**10**10",
    "\\boxed{(10**10**10)}",
    "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    "\\boxed{99999999!}",
    "\\boxed{" + "{" * 100_000 + "}" * 100_000 + "}",
    "\\boxed{" * 50_000,
    "\\frac{" * 5_000 + "1" + "}{2}" * 5_000,
    "\\boxed{" + "\\sqrt{" * 3_000 + "2" + "}" * 3_000 + "}",
    "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
    "the answer is " + " " * 200_000,
    "answer is:" * 50_000,
    "####" + " \t" * 100_000 + "x",
    "<answer>" * 30_000 + "</answer>" * 30_000,
    "\\text{" * 20_000,
    "a" * 2_000_000,
    "\udcff\ud800 \\boxed{\udc80} \x00\x01",
    "\\boxed{\x00}",
    "",
    None,
    "\\boxed{x^{" + "9" * 5000 + "}}",
    "\\boxed{" + "1+" * 20_000 + "1}",
]


def test_hostile_math_completions(pool):
    n = len(HOSTILE_MATH)
    t = time.monotonic()
    values, stats = pool.map(rewards.math_accuracy, [""] * n, HOSTILE_MATH, {"answer": ["42"] * n})
    elapsed = time.monotonic() - t
    assert values == [0.0] * n
    # Each item is bounded by the timeout; items run two at a time.
    assert elapsed < TIMEOUT * n / 2 + 30, (elapsed, stats)
    # The pool still scores correctly afterwards.
    ok, _ = pool.map(rewards.math_accuracy, ["", ""], ["#### 42", "\\boxed{41}"], {"answer": ["42", "42"]})
    assert ok == [1.0, 0.0]


def test_verifiers_are_fast_on_hostile_text_in_process():
    """The extraction and normalisation themselves are linear: no regex backtracking blow-up."""
    for text in HOSTILE_MATH:
        t = time.monotonic()
        ans = math_grader.extract_answer(text)
        if ans is not None:
            math_grader.normalize_answer(ans)
        verifiers.format_reward(text)
        verifiers.tag_count_reward(text)
        verifiers.countdown_reward(text, [1, 2], 3)
        assert time.monotonic() - t < 1.0, repr(text[:40])


def sleeps_forever(prompts, completions, **columns):
    while True:
        time.sleep(1)


def dies(prompts, completions, **columns):
    os._exit(3)


def raises_on_odd(prompts, completions, **columns):
    if len(completions[0]) % 2:
        raise ValueError("bad completion")
    return [1.0]


def memory_bomb(prompts, completions, **columns):
    x = bytearray(8 << 30)  # 8 GB: over the worker's address-space limit
    return [float(len(x))]


def test_hangs_crashes_errors_are_counted_and_scored_zero(pool):
    values, stats = pool.map(sleeps_forever, ["", ""], ["a", "b"], {})
    assert values == [0.0, 0.0] and stats["timeouts"] == 2
    values, stats = pool.map(dies, [""] * 3, ["a", "b", "c"], {})
    assert values == [0.0] * 3 and stats["crashes"] == 3
    values, stats = pool.map(raises_on_odd, [""] * 4, ["a", "bb", "ccc", "dddd"], {})
    assert values == [0.0, 1.0, 0.0, 1.0] and stats["errors"] == 2
    assert "bad completion" in pool.last_error
    values, stats = pool.map(memory_bomb, [""], ["x"], {})
    assert values == [0.0] and stats["errors"] + stats["crashes"] == 1
    # score() reports the counters with the rewards.
    total, _, m = rewards.score([rewards.RewardSpec("math"), rewards.RewardSpec("test_reward_pool:raises_on_odd")],
                          ["", ""], ["#### 1", "#### 12"], {"answer": ["1", "12"]}, pool=pool)
    np.testing.assert_allclose(total, [2.0, 1.0])  # "#### 12" has odd length: its error scores 0
    assert m["rewards/errors"] == 1


def test_score_without_pool_surfaces_errors_clearly():
    with pytest.raises(RuntimeError, match="reward function 'test_reward_pool:raises_on_odd' raised ValueError"):
        rewards.score([rewards.RewardSpec("test_reward_pool:raises_on_odd")], [""], ["a"], {})


# ---- untrusted code --------------------------------------------------------------------------------

HOSTILE_CODE = {
    "infinite loop": "while True:\n    pass",
    "sleep": "import time\ntime.sleep(100)",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass",
    "memory bomb": "x = []\nwhile True:\n    x.append(' ' * 10**8)",
    "huge int": "print(10**10**10)",
    "gigabytes of output": "while True:\n    print('x' * 1_000_000)",
    "stderr flood": "import sys\nwhile True:\n    sys.stderr.write('y' * 1_000_000)",
    "read secrets": "import os\nprint(os.environ.get('GRPO_TEST_SECRET', 'none'))",
    "write outside": "open('/tmp/grpo_sandbox_escape', 'w').write('pwned')\nprint('wrote')",
    "delete outside": "import os\nos.remove('/tmp/grpo_sandbox_victim')",
    "subprocess": "import subprocess\nprint(subprocess.run(['echo', 'hi'], capture_output=True).stdout)",
    "kill parent": f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)",
    "deep recursion": "def f(n):\n    return f(n + 1)\nf(0)",
    "invalid unicode": "print('\\udcff')",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CODE))
def test_hostile_code_is_contained(name, tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_TEST_SECRET", "s3cret")
    victim = "/tmp/grpo_sandbox_victim"
    with open(victim, "w") as fh:
        fh.write("keep")
    t = time.monotonic()
    r = sandbox.run_script(HOSTILE_CODE[name], limits=sandbox.Limits(timeout_s=2.0, memory_mb=256, max_output=1 << 16))
    assert time.monotonic() - t < 6.0
    assert "s3cret" not in r["stdout"]
    assert len(r["stdout"]) <= 1 << 16
    assert not os.path.exists("/tmp/grpo_sandbox_escape")
    assert open(victim).read() == "keep"
    # The reward for such code against a real test is 0.
    assert verifiers.code_reward(HOSTILE_CODE[name], [{"input": "", "output": "42"}], timeout_s=2.0, memory_mb=256) == 0.0
