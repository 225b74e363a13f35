"""Held-out accuracy of a policy: greedy pass@1, and with k samples per problem the mean sampled
accuracy, majority vote (maj@k) and the unbiased pass@k (grpo_jax.rollout.at_k).

    scores = evaluate(pol, task.eval, scorer, **settings(cfg))   # {"eval/pass@1": ..., ...}

Every evaluation draws its samples from the same key, so differences between two evaluations of a
run are the policy's. On several hosts each scores its block of the problems; the figures cover all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from grpo_jax.parallel import multihost
from grpo_jax.rewards import math_grader
from grpo_jax.rewards import scoring
from grpo_jax.rollout import at_k
from grpo_jax.rollout import policy


def settings(cfg: ConfigDict) -> dict[str, Any]:
    """evaluate's keyword arguments from a run config's `eval` section."""
    return dict(k=cfg.eval.k, batch_size=cfg.eval.batch_size, reward=cfg.eval.reward, seed=cfg.seed + 7)


def prompts_per_call(cfg: ConfigDict, n: int) -> int:
    """Prompts per sampler call (per host) for n samples each: as many completions per call as
    evaluation makes (eval.batch_size prompts x eval.k)."""
    return max(1, cfg.eval.batch_size * max(cfg.eval.k, 1) // (n * jax.process_count()))


def evaluate(pol: policy.Policy, rows: Sequence[dict], scorer: scoring.Scorer, *, k: int, batch_size: int,
             reward: str = "math", seed: int = 0) -> dict[str, float]:
    """pass@1 (greedy), and for k > 0 `eval/pass@k`, `eval/maj@k` and `eval/mean@1_sampled`.

    Args:
      pol: the policy (its sampling settings, greedy for pass@1).
      rows: held-out problems (all hosts'; each host takes its block).
      scorer: scores completions with the `reward` verifier (correct when > 0.5).
      k: samples per problem for the sampled figures; 0 skips them.
      batch_size: problems per sampler call, all hosts together.
      seed: the sampling key's seed.
    """
    rows = multihost.host_block(rows, batch_size)
    spec = [scoring.RewardSpec(reward, 1.0)]
    greedy = dataclasses.replace(pol.sampling, greedy=True)
    out = {}
    for name, sampling, n in (("greedy", greedy, 1), ("sampled", pol.sampling, k)):
        if n == 0:
            continue
        gen = pol.sample(rows, n, jax.random.key(seed), sampling, batch_size=max(1, batch_size // jax.process_count()))
        scores, _, _ = scorer(spec, rows, n, gen.texts, gen.lengths, gen.columns)
        ok = np.asarray(scores).reshape(len(rows), n) > 0.5
        answers = [math_grader.normalize_answer(math_grader.extract_answer(t) or "") for t in gen.texts]
        majority = [at_k.majority_correct(answers[i * n:(i + 1) * n], ok[i]) for i in range(len(rows))]
        correct, majority = multihost.all_hosts(ok), multihost.all_hosts(np.asarray(majority))
        if name == "greedy":
            out["eval/pass@1"] = float(correct.mean())
        else:
            out[f"eval/pass@{k}"] = float(np.mean([at_k.pass_at_k(n, int(c.sum()), k) for c in correct]))
            out["eval/mean@1_sampled"] = float(correct.mean())
            out[f"eval/maj@{k}"] = float(majority.mean())
    return out
