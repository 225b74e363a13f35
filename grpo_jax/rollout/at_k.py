"""Test-time scaling: pass@k, majority voting (maj@k) and best-of-N selection as functions of k.

Given n samples per problem, every figure at k <= n is the expectation over k samples drawn without
replacement from the n (so k = 1 is the mean sampled accuracy, and no k-dependence comes from which
samples happened to come first):

    pass@k    1 - C(n - c, k) / C(n, k)                          (Chen et al. 2021, c correct of n)
    best@k    sum_r correct_(r) C(n - 1 - r, k - 1) / C(n, k)    (samples ranked r = 0.. by a selector)
    maj@k     P(the most frequent final answer of k samples is a correct one)   (Wang et al. 2023)

best@k picks the top-scoring of the k samples by any score (a reward function, a reward model, the
policy's own log-probability); picking by the verifier itself gives pass@k. Ties in votes or scores
go to the earliest sample. maj@k is exact (every subset) while C(n, k) <= `trials`, else a seeded
Monte-Carlo estimate over `trials` subsets.
"""

from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), for c correct of n samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def best_of_k(scores: Sequence[float], correct: Sequence[bool], k: int) -> float:
    """Expected correctness of the top-scoring sample among k of the n (ties: the earliest sample).

    The sample ranked r (0 = best) is the top of a random k-subset with probability
    C(n - 1 - r, k - 1) / C(n, k): it must be in the subset and the other k - 1 ranked below it.
    """
    n = len(scores)
    if len(correct) != n or not 1 <= k <= n:
        raise ValueError(f"best_of_k needs {n} correctness values and 1 <= k <= {n}; got {len(correct)}, k={k}")
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    total = math.comb(n, k)
    return sum(math.comb(n - 1 - r, k - 1) for r, i in enumerate(order) if correct[i]) / total


def majority_vote(answers: Sequence[str]) -> str | None:
    """The most frequent non-empty answer (ties: the one given first), or None if none was given."""
    votes = [a for a in answers if a]
    return max(votes, key=votes.count) if votes else None


def majority_correct(answers: Sequence[str], correct: Sequence[bool]) -> bool:
    """Whether the majority answer is correct: some sample that gave it was verified correct."""
    top = majority_vote(answers)
    return top is not None and any(a == top and c for a, c in zip(answers, correct))


def maj_at_k(answers: Sequence[str], correct: Sequence[bool], k: int, trials: int = 2000,
             seed: int = 0) -> float:
    """Expected `majority_correct` of k of the n samples (normalised final answers; "" = none)."""
    n = len(answers)
    if len(correct) != n or not 1 <= k <= n:
        raise ValueError(f"maj_at_k needs {n} correctness values and 1 <= k <= {n}; got {len(correct)}, k={k}")
    names = {a: i for i, a in enumerate(dict.fromkeys(a for a in answers if a))}
    ids = np.array([names.get(a, -1) for a in answers])
    ok = np.asarray(correct, bool)
    if not names:
        return 0.0
    if math.comb(n, k) <= trials:
        subsets = np.array(list(itertools.combinations(range(n), k)))
    else:
        rng = np.random.default_rng(seed)
        subsets = np.sort(np.argsort(rng.random((trials, n)), axis=1)[:, :k], axis=1)
    sub, sub_ok = ids[subsets], ok[subsets]  # [subsets, k]
    counts = (sub[:, :, None] == np.arange(len(names))[None, None, :]).sum(1)  # [subsets, answers]
    votes = np.where(sub >= 0, counts[np.arange(len(sub))[:, None], np.maximum(sub, 0)], 0)  # [subsets, k]
    first_top = np.argmax(votes == votes.max(1, keepdims=True), axis=1)  # earliest sample with the top count
    winner = sub[np.arange(len(sub)), first_top]
    won = (winner >= 0) & ((sub == winner[:, None]) & sub_ok).any(1)
    return float(won.mean())


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n (n included)."""
    ks = [2 ** i for i in range(n.bit_length()) if 2 ** i <= n]
    return ks if ks[-1] == n else ks + [n]


def scaling_curve(correct: np.ndarray, answers: Sequence[Sequence[str]],
                  selectors: Mapping[str, np.ndarray] | None = None,
                  ks: Sequence[int] | None = None) -> list[dict[str, float]]:
    """pass@k, maj@k and best@k for each k, averaged over problems.

    Args:
      correct: [problems, n] bool, the verifier's verdict on each sample.
      answers: [problems][n] normalised final answers ("" where none).
      selectors: name -> [problems, n] scores for best-of-k (higher is better).
      ks: the k's (default: 1, 2, 4, ..., n).

    Returns:
      One dict per k: {"k", "pass@k", "maj@k", "best@k/NAME" for each selector}.
    """
    correct = np.asarray(correct, bool)
    P, n = correct.shape
    rows = []
    for k in ks or default_ks(n):
        row = {"k": k,
               "pass@k": float(np.mean([pass_at_k(n, int(c.sum()), k) for c in correct])),
               "maj@k": float(np.mean([maj_at_k(answers[p], correct[p], k) for p in range(P)]))}
        for name, s in (selectors or {}).items():
            row[f"best@k/{name}"] = float(np.mean([best_of_k(s[p], correct[p], k) for p in range(P)]))
        rows.append(row)
    return rows
