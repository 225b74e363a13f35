"""Hostile completions: every item is scored within its time limit and nothing reaches this process."""

import os
import time

import numpy as np
import pytest

from grpo_jax.rewards import checks
from grpo_jax.rewards import math_grader
from grpo_jax.rewards import scoring
from grpo_jax.rewards import verifier_pool
from grpo_jax.rewards.sandbox import runner


# Under pytest-xdist (-n 2 --dist loadgroup) these run on one worker: they count the machine's sandbox processes and time the pool.
pytestmark = pytest.mark.xdist_group("sandbox")

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
    values, stats = pool.map(scoring.math_accuracy, [""] * n, HOSTILE_MATH, {"answer": ["42"] * n})
    elapsed = time.monotonic() - t
    assert values == [0.0] * n
    # Each item is bounded by the timeout; items run two at a time.
    assert elapsed < TIMEOUT * n / 2 + 30, (elapsed, stats)
    # The pool still scores correctly afterwards.
    ok, _ = pool.map(scoring.math_accuracy, ["", ""], ["#### 42", "\\boxed{41}"], {"answer": ["42", "42"]})
    assert ok == [1.0, 0.0]


def test_verifiers_are_fast_on_hostile_text_in_process():
    """The extraction and normalisation themselves are linear: no regex backtracking blow-up."""
    for text in HOSTILE_MATH:
        t = time.monotonic()
        ans = math_grader.extract_answer(text)
        if ans is not None:
            math_grader.normalize_answer(ans)
        checks.format_reward(text)
        checks.tag_count_reward(text)
        checks.countdown_reward(text, [1, 2], 3)
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
    total, _, m = scoring.score([scoring.RewardSpec("math"), scoring.RewardSpec("test_reward_pool:raises_on_odd")],
                          ["", ""], ["#### 1", "#### 12"], {"answer": ["1", "12"]}, pool=pool)
    np.testing.assert_allclose(total, [2.0, 1.0])  # "#### 12" has odd length: its error scores 0
    assert m["rewards/errors"] == 1


def returns_nan(prompts, completions, **columns):
    return [float("nan") if c == "b" else 1.0 for c in completions]


def returns_inf(prompts, completions, **columns):
    return [float("-inf") if c == "b" else 1.0 for c in completions]


def returns_one_too_many(prompts, completions, **columns):
    return [1.0] * (len(completions) + 1)


def returns_text(prompts, completions, **columns):
    return ["0.5" if c == "b" else 1.0 for c in completions]


def returns_arrays(prompts, completions, **columns):  # numpy values and None are fine
    return np.array([np.float32(1.0)] * len(completions), dtype=object) if completions[0] != "c" else [None]


FAILURES = {  # function -> (its rewards for completions a, b, c; errors; what the error says)
    "returns_nan": ([1.0, 0.0, 1.0], 1, "returned nan: rewards must be finite"),
    "returns_inf": ([1.0, 0.0, 1.0], 1, "returned -inf: rewards must be finite"),
    "returns_text": ([1.0, 0.0, 1.0], 1, "returned str '0.5', expected a number or None"),
    "raises_on_odd": ([0.0, 1.0, 0.0], 2, "ValueError: bad completion"),
}


@pytest.mark.parametrize("in_pool", [True, False])
@pytest.mark.parametrize("name", sorted(FAILURES))
def test_bad_reward_values_are_errors_counted_by_function_in_both_paths(pool, name, in_pool):
    want, errors, said = FAILURES[name]
    spec = scoring.RewardSpec(f"test_reward_pool:{name}")
    total, per_fn, m, failed = scoring.score_functions([scoring.RewardSpec("math", 0.0), spec], [""] * 3,
                                                       ["a", "bb" if name == "raises_on_odd" else "b", "c"],
                                                       {"answer": ["1"] * 3}, pool=pool if in_pool else None)
    if name == "raises_on_odd" and not in_pool:  # in this process a raise is every item's error
        want, errors = [0.0, 0.0, 0.0], 3
    assert total.tolist() == want and m[f"rewards/{spec.name}/errors"] == errors == m["rewards/errors"]
    assert list(failed) == [spec.name] and said in failed[spec.name]["last_error"]  # named by function


@pytest.mark.parametrize("in_pool", [True, False])
def test_a_wrong_number_of_values_is_an_error_in_both_paths(pool, in_pool):
    spec = scoring.RewardSpec("test_reward_pool:returns_one_too_many")
    total, _, m, failed = scoring.score_functions([spec], [""] * 3, ["a", "b", "c"], {}, pool=pool if in_pool else None)
    assert total.tolist() == [0.0] * 3 and m["rewards/errors"] == 3
    # The pool calls it on one completion at a time; this process on all of them.
    assert failed[spec.name]["last_error"] == ("returned 2 values for 1 completion" if in_pool
                                               else "returned 4 values for 3 completions")
    total, per_fn, m, failed = scoring.score_functions([scoring.RewardSpec("test_reward_pool:returns_arrays")],
                                                       [""], ["a"], {}, pool=pool if in_pool else None)
    assert total.tolist() == [1.0] and not failed


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
    r = runner.run_script(HOSTILE_CODE[name], limits=runner.Limits(timeout_s=2.0, memory_mb=256, max_output=1 << 16))
    assert time.monotonic() - t < 6.0
    assert "s3cret" not in r["stdout"]
    assert len(r["stdout"]) <= 1 << 16
    assert not os.path.exists("/tmp/grpo_sandbox_escape")
    assert open(victim).read() == "keep"
    # The reward for such code against a real test is 0.
    assert checks.code_reward(HOSTILE_CODE[name], [{"input": "", "output": "42"}], timeout_s=2.0, memory_mb=256) == 0.0


# ---- dispatch ----------------------------------------------------------------------------------------

def hangs_on_seven(prompts, completions, **columns):
    if completions[0] == "7":
        time.sleep(60)
    return [float(completions[0])]


def dies_on_five(prompts, completions, **columns):
    if completions[0] == "5":
        os._exit(1)
    return [float(completions[0])]


def test_chunks_keep_a_timeout_and_a_crash_on_their_own_item():
    n = 40
    items = [str(i) for i in range(n)]
    with verifier_pool.VerifierPool(num_workers=2, timeout_s=2.0) as pool:
        t = time.monotonic()
        values, stats = pool.map(hangs_on_seven, [""] * n, items, {})
        assert time.monotonic() - t < 2.0 + 10
        assert values == [0.0 if i == 7 else float(i) for i in range(n)]
        assert (stats["timeouts"], stats["crashes"], stats["errors"], stats["hung"]) == (1, 0, 0, False)
        values, stats = pool.map(dies_on_five, [""] * n, items, {})
        assert values == [0.0 if i == 5 else float(i) for i in range(n)]
        assert (stats["timeouts"], stats["crashes"], stats["errors"], stats["hung"]) == (0, 1, 0, False)
        assert pool._spare.proc.poll() is None  # a spare is started again after each replacement


def test_a_function_that_hangs_on_every_item_is_given_up_then_stops_the_run_or_is_disabled():
    said = []
    rows = [{"question": str(i), "answer": "1"} for i in range(16)]
    texts, lengths = ["#### 1"] * 64, [3] * 64
    hangs = "test_reward_pool:sleeps_forever"
    weighted = [scoring.RewardSpec("math"), scoring.RewardSpec(hangs)]
    logs_only = [scoring.RewardSpec("math"), scoring.RewardSpec(hangs, 0.0)]
    # weighted (the default on_hang="stop"): the run stops, after 4 timeouts, not 64 x 0.5 s / 2 = 16 s
    with scoring.Scorer("question", 8, workers=2, timeout_s=0.5, hang_after=4, say=said.append) as scorer:
        t = time.monotonic()
        with pytest.raises(scoring.RewardHangError, match="sleeps_forever' timed out .* the run stops, it has weight 1"):
            scorer(weighted, rows, 4, texts, lengths)
        assert time.monotonic() - t < 6 and not scorer.disabled
    # weight 0 (it only logs), or on_hang="disable": disabled for the rest of the run, said once
    for specs, on_hang in ((logs_only, "stop"), (weighted, "disable")):
        said.clear()
        with scoring.Scorer("question", 8, workers=2, timeout_s=0.5, hang_after=4, on_hang=on_hang,
                            say=said.append) as scorer:
            total, per_fn, _ = scorer(specs, rows, 4, texts, lengths)
            assert total.tolist() == [1.0] * 64
            failures = scorer.take_failures()[hangs]
            assert failures["timeouts"] == failures["items"] == 64 and scorer.take_failures() == {}
            (line,) = said
            assert line.startswith(f"reward '{hangs}' timed out on the first ")
            assert "disabled for the rest of the run" in line and ("only logs" in line) == (specs is logs_only)
            t = time.monotonic()
            total, per_fn, m = scorer(specs, rows, 4, texts, lengths)  # not run again
            assert time.monotonic() - t < 1 and total.tolist() == [1.0] * 64 and len(said) == 1
            assert np.isnan(per_fn[hangs]).all() and m[f"rewards/{hangs}/frac_none"] == 1.0
            names = [s.name for s in specs]
            assert scorer.disabled_mask(names) == 0b10
    # A function that hangs on one item among others is not taken for one that hangs.
    with scoring.Scorer("question", 8, workers=1, timeout_s=0.5, hang_after=1) as scorer:
        total, _, _ = scorer([scoring.RewardSpec("test_reward_pool:hangs_on_seven")],
                             [{"question": str(i), "answer": "1"} for i in range(5, 12)], 1,
                             [str(i) for i in range(5, 12)], [1] * 7)
        assert total.tolist() == [5.0, 6.0, 0.0, 8.0, 9.0, 10.0, 11.0] and not scorer.disabled
        scorer.set_disabled(0b1, ["test_reward_pool:hangs_on_seven"])  # another host's, or a checkpoint's
        assert list(scorer.disabled) == ["test_reward_pool:hangs_on_seven"]


def test_a_worker_that_cannot_load_the_function_in_time_is_a_hang(tmp_path, monkeypatch):
    """Loading (importing the function's module) has its own deadline: a module whose import hangs
    is not waited for forever, and the function is taken to hang."""
    (tmp_path / "slow_import.py").write_text("import time\ntime.sleep(3600)\n"
                                              "def reward(prompts, completions, **columns):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    fake = type(sys)("slow_import")  # pickled by reference here without running its import
    exec("def reward(prompts, completions, **columns):\n    return [1.0] * len(completions)\n", fake.__dict__)
    fake.reward.__module__ = "slow_import"
    monkeypatch.setitem(sys.modules, "slow_import", fake)
    with verifier_pool.VerifierPool(num_workers=1, timeout_s=0.5, load_timeout_s=2.0) as pool:
        t = time.monotonic()
        values, stats = pool.map(fake.reward, [""] * 8, ["x"] * 8, {}, hang_after=16)
        assert time.monotonic() - t < 10
        assert stats["hung"] and values == [0.0] * 8 and "loading the reward function took over 2 s" in stats["last_error"]
    importlib.invalidate_caches()
    with scoring.Scorer("question", 8, workers=1, timeout_s=0.5, load_timeout_s=2.0) as scorer:
        scorer.fns["slow"] = fake.reward
        with pytest.raises(scoring.RewardHangError, match="reward 'slow' hangs: loading the reward function took"):
            scorer([scoring.RewardSpec("slow")], [{"question": "q"}], 2, ["a", "b"], [1, 1])


def test_a_weighted_function_that_fails_on_every_item_for_n_steps_stops_the_run():
    streaks = scoring.FailureStreaks(3)
    errors = {"code": "TypeError: boom"}
    for step in (1, 2):
        streaks.observe({"code": 64, "math": 0}, 64, errors, step)
    streaks.observe({"code": 63, "math": 0}, 64, errors, 3)  # one item scored: the streak starts again
    streaks.observe({"code": 64, "math": 0}, 64, errors, 4)
    streaks.observe({"code": 64, "math": 0}, 64, errors, 5)
    with pytest.raises(scoring.RewardFailure, match=r"^step 6: reward 'code' failed on every completion of 3 "
                                                    r"consecutive steps \(verifier.max_failing_steps=3\).*"
                                                    r"last error: TypeError: boom$"):
        streaks.observe({"code": 64, "math": 0}, 64, errors, 6)
    with pytest.raises(ValueError, match="max_failing_steps=0"):
        scoring.FailureStreaks(0)


def test_in_process_functions_run_here_with_the_whole_batch():
    calls = []

    @scoring.in_process
    def batch(prompts, completions, **columns):
        calls.append((os.getpid(), len(completions)))
        return [1.0] * len(completions)

    with verifier_pool.VerifierPool(num_workers=1) as pool:
        total, _, _ = scoring.score([scoring.RewardSpec("rm")], [""] * 5, ["a"] * 5, {}, pool=pool, fns={"rm": batch})
    assert calls == [(os.getpid(), 5)] and total.tolist() == [1.0] * 5


def test_workers_do_not_import_the_main_script(tmp_path):
    """A script without a __main__ guard starts a pool: its top level runs once, not once per worker,
    and a reward function defined in the script still works."""
    import subprocess
    import sys

    log = tmp_path / "runs.txt"
    script = tmp_path / "train_like.py"
    script.write_text(f"""
import sys
from grpo_jax.rewards import scoring
from grpo_jax.rewards import verifier_pool
open({str(log)!r}, "a").write("top level ran\\n")

def mine(prompts, completions, **columns):
    return [float(len(c)) for c in completions]

if __name__ == "__main__":
    with verifier_pool.VerifierPool(num_workers=2) as pool:
        print(pool.map(scoring.math_accuracy, ["", ""], ["#### 4", "#### 5"], {{"answer": ["4", "4"]}})[0])
        print(open({str(log)!r}).read().count("top level ran"))
        print(pool.map(mine, ["", ""], ["ab", "abc"], {{}})[0])
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # the script's top level ran once (here) while the workers scored built-ins ...
    assert out.stdout.split("\n")[:3] == ["[1.0, 0.0]", "1", "[2.0, 3.0]"]
    # ... and only the workers that were sent `mine` loaded it (as __mp_main__), never the spare
    assert log.read_text().count("top level ran") <= 1 + 2


def test_a_pool_killed_with_sigkill_leaves_folders_that_the_next_pool_removes(tmp_path):
    import signal
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    script = ("import sys, time\nfrom grpo_jax.rewards import verifier_pool\n"
              "pool = verifier_pool.VerifierPool(num_workers=1)\nprint('ready', flush=True)\ntime.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    left = sorted(d for d in os.listdir(tmp_path) if d.startswith("grpo_worker_"))
    assert len(left) == 2  # the worker and the spare
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("grpo_worker_")) == left  # SIGKILL: nothing ran
    mine = tmp_path / "grpo_worker_alive"  # a live pool's folder (ours) and one without a record stay
    mine.mkdir()
    (mine / verifier_pool.OWNER).write_text(f"{os.getpid()} {verifier_pool._process_start(os.getpid())}")
    (tmp_path / "grpo_worker_unknown").mkdir()
    removed = verifier_pool.remove_stale_folders(str(tmp_path))
    assert sorted(os.path.basename(r) for r in removed) == left
    assert sorted(os.listdir(tmp_path)) == ["grpo_worker_alive", "grpo_worker_unknown"]
