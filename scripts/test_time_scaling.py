"""Test-time scaling of a trained policy: pass@k, maj@k and best-of-k as functions of k.

    python scripts/test_time_scaling.py --config=configs/r1_pipeline.py --n=16 --plot=docs/tts.png
    python scripts/test_time_scaling.py --hf=exports/r1 --select=logprob,format_lenient

Samples n completions of each held-out problem once (the run's sampling settings), scores them with
the run's verifier (eval.reward), and reports for k = 1, 2, 4, ..., n the unbiased pass@k, majority
vote over normalised final answers (maj@k) and best-of-k picked by each --select score: a reward
function name (built-in or "module:function") or `logprob` (the policy's mean token log-probability,
its own confidence). Picking by the verifier itself would give pass@k. Greedy pass@1 is reported
too. Prints a markdown table; --output writes JSON, --plot a PNG. See grpo_jax/rollout/at_k.py.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from grpo_jax.common import data
from grpo_jax.parallel import multihost
from grpo_jax.rewards import math_grader
from grpo_jax.rewards import scoring
from grpo_jax.rollout import at_k
from grpo_jax.rollout import evaluation
from grpo_jax.run import config
from grpo_jax.run import pipeline

config.check_argv(sys.argv)  # an old field name: say the new one (flag parsing would not)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.py"),
    "the run's ml-collections config file", lock_config=True)
_STAGE = flags.DEFINE_string("stage", None, "pipeline configs: the stage (default: the last)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_HF = flags.DEFINE_string("hf", None, "a Hugging Face folder or hub id instead of a checkpoint")
_N = flags.DEFINE_integer("n", 16, "samples per problem; k goes up to n")
_SELECT = flags.DEFINE_list("select", ["logprob"], "best-of-k selectors: reward function names or logprob")
_PROBLEMS = flags.DEFINE_integer("problems", 0, "the first this many held-out problems (0: all)")
_OUTPUT = flags.DEFINE_string("output", None, "write the table as JSON here")
_PLOT = flags.DEFINE_string("plot", None, "draw the curves into this PNG")


def measure(pol, cfg, scorer, rows, n: int, selectors) -> dict:
    """Greedy pass@1 and the scaling curve of the policy `pol` on `rows` (all hosts' figures)."""
    import jax
    import numpy as np


    greedy = evaluation.evaluate(pol, rows, scorer, **{**evaluation.settings(cfg), "k": 0})["eval/pass@1"]
    block = multihost.host_block(rows, jax.process_count())
    gen = pol.sample(block, n, jax.random.key(cfg.seed + 7), batch_size=evaluation.prompts_per_call(cfg, n))
    scores, _, _ = scorer([scoring.RewardSpec(cfg.eval.reward, 1.0)], block, n, gen.texts, gen.lengths)
    correct = multihost.all_hosts(np.asarray(scores).reshape(len(block), n) > 0.5)
    answers = multihost.all_hosts_json(
        [[math_grader.normalize_answer(math_grader.extract_answer(t) or "") for t in gen.texts[i * n:(i + 1) * n]]
         for i in range(len(block))])
    chosen = {}
    for name in selectors:
        s = gen.mean_logp if name == "logprob" else scorer([scoring.RewardSpec(name, 1.0)], block, n, gen.texts, gen.lengths)[0]
        chosen[name] = multihost.all_hosts(np.asarray(s, np.float64).reshape(len(block), n))
    return {"problems": len(rows), "n": n, "greedy_pass@1": greedy,
            "curve": at_k.scaling_curve(correct, answers, chosen)}


def table(result: dict) -> str:
    cols = [c for c in result["curve"][0] if c != "k"]
    lines = ["| k | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {r['k']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for r in result["curve"]]
    return "\n".join(lines) + f"\n\ngreedy pass@1: {result['greedy_pass@1']:.3f} ({result['problems']} problems, n={result['n']})"


def plot(result: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in result["curve"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for col in (c for c in result["curve"][0] if c != "k"):
        ax.plot(ks, [r[col] for r in result["curve"]], marker="o", label=col.replace("@k", "@k "))
    ax.axhline(result["greedy_pass@1"], color="gray", ls="--", label="greedy pass@1")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging

    import jax


    logging.set_verbosity(logging.WARNING)
    pol, cfg, source = pipeline.load_policy(_CONFIG.value, _STAGE.value, _STEP.value, _HF.value)
    task = data.load_task(cfg.data, cfg.seed)
    rows = task.eval[:_PROBLEMS.value] if _PROBLEMS.value else task.eval
    with scoring.Scorer.from_config(cfg) as scorer:
        result = {"model": source, **measure(pol, cfg, scorer, rows, _N.value, _SELECT.value)}
    if jax.process_index() != 0:
        return
    print(table(result))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(result, f, indent=2)
    if _PLOT.value:
        plot(result, _PLOT.value, f"test-time scaling: {source}")


if __name__ == "__main__":
    app.run(main)
