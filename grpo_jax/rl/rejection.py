"""Rejection sampling (stage 3 of DeepSeek-R1): sample n completions per problem with a policy,
keep the verified ones, and write them as an SFT dataset.

    kept, summary = rejection_sample(pol, scorer, rows, n=16, keep=4)   # a policy.Policy, a scoring.Scorer
    write_dataset(kept, summary, "runs/rs/rejection_samples.jsonl")  # read back by sft.data

A completion is kept when its weighted reward (the `specs`, by default the eval verifier) reaches
`min_reward` and it ended with EOS (a cut-off completion would teach the model not to stop); with
`dedupe`, one copy of each distinct text per problem; with `keep` > 0, the best `keep` per problem
by reward, then shorter first (R1 kept concise, readable solutions), then sample order.
Each kept row is the problem's row plus `completion`, `reward` and `length` (tokens).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from grpo_jax.common import storage
from grpo_jax.parallel import multihost
from grpo_jax.rewards import scoring
from grpo_jax.rollout import evaluation
from grpo_jax.rollout import policy


def select(rows: Sequence[dict], n: int, texts: Sequence[str], lengths: Sequence[int],
           truncated: Sequence[bool], rewards: Sequence[float], *, min_reward: float = 1.0, keep: int = 0,
           dedupe: bool = True) -> tuple[list[dict], dict[str, float]]:
    """The kept completions (n per row, adjacent, in `texts`) as SFT rows, and counts for the summary."""
    if len(texts) != len(rows) * n or not len(texts) == len(lengths) == len(truncated) == len(rewards):
        raise ValueError(f"{len(rows)} problems x n={n} need {len(rows) * n} completions, lengths, truncation "
                         f"flags and rewards; got {len(texts)}, {len(lengths)}, {len(truncated)}, {len(rewards)}")
    kept, counts = [], dict(problems=len(rows), samples=len(texts), verified=0, truncated=0, duplicates=0,
                            problems_solved=0)
    for p, row in enumerate(rows):
        chosen, seen = [], set()
        for i in range(p * n, (p + 1) * n):
            counts["truncated"] += bool(truncated[i])
            if truncated[i] or not rewards[i] >= min_reward:
                continue
            counts["verified"] += 1
            text = texts[i].strip()
            if dedupe and text in seen:
                counts["duplicates"] += 1
                continue
            seen.add(text)
            chosen.append(i)
        chosen.sort(key=lambda i: (-float(rewards[i]), int(lengths[i]), i))
        chosen = chosen[:keep] if keep else chosen
        counts["problems_solved"] += bool(chosen)
        kept += [{**row, "completion": texts[i], "reward": float(rewards[i]), "length": int(lengths[i])}
                 for i in sorted(chosen)]
    return kept, counts


def summarize(kept: Sequence[dict], counts: dict[str, float]) -> dict[str, float]:
    """Problems solved, samples kept, pass rate and the kept completions' mean length."""
    return {**counts, "samples_kept": len(kept),
            "sample_accuracy": counts["verified"] / max(counts["samples"], 1),
            "frac_problems_solved": counts["problems_solved"] / max(counts["problems"], 1),
            "mean_length_tokens": float(np.mean([r["length"] for r in kept])) if kept else 0.0,
            "mean_length_chars": float(np.mean([len(r["completion"]) for r in kept])) if kept else 0.0}


def rejection_sample(pol: policy.Policy, scorer: scoring.Scorer, rows: Sequence[dict], *, n: int = 16,
                     keep: int = 0, dedupe: bool = True, min_reward: float = 1.0,
                     specs: Sequence[scoring.RewardSpec] = (scoring.RewardSpec("math"),), seed: int = 13,
                     batch_size: int | None = None) -> tuple[list[dict], dict[str, float]]:
    """n samples of each row with `pol` (its sampling settings), `batch_size` problems per sampler
    call, scored by `specs` and kept as in `select`. On several hosts each samples its block of the
    rows and every host returns all of them."""
    hosts, host = jax.process_count(), jax.process_index()
    # Hosts sample equal blocks in step (a remainder of fewer than `hosts` problems is left out).
    per_host = len(rows) // hosts
    block = list(rows[host * per_host:(host + 1) * per_host])
    gen = pol.sample(block, n, jax.random.key(seed), batch_size=batch_size)
    scores, _, _ = scorer(list(specs), block, n, gen.texts, gen.lengths)
    kept, counts = select(block, n, gen.texts, gen.lengths, gen.truncated, scores, min_reward=min_reward,
                          keep=keep, dedupe=dedupe)
    kept = multihost.all_hosts_json(kept)
    return kept, summarize(kept, multihost.host_sum(counts))


def from_config(pol: policy.Policy, scorer: scoring.Scorer, cfg: ConfigDict, rows: Sequence[dict],
                n: int | None = None, keep: int | None = None) -> tuple[list[dict], dict[str, float]]:
    """rejection_sample with a run config's settings (`rejection.*`; the eval verifier when
    `rejection.rewards` is empty) over its first `rejection.max_problems` rows, as many completions
    per sampler call as evaluation makes (eval.batch_size prompts x eval.k)."""
    c = cfg.rejection
    n = c.n if n is None else n
    specs = [scoring.RewardSpec(k, w) for k, w in c.rewards.items()] or [scoring.RewardSpec(cfg.eval.reward)]
    return rejection_sample(pol, scorer, rows[:c.max_problems] if c.max_problems else rows, n=n,
                            keep=c.keep if keep is None else keep, dedupe=c.dedupe, min_reward=c.min_reward,
                            specs=specs, seed=cfg.seed + 13, batch_size=evaluation.prompts_per_call(cfg, n))


def write_dataset(kept: Sequence[dict], summary: dict[str, Any], path: str) -> None:
    """The kept rows as JSONL at `path` (local or an object store) and the summary as
    PATH.summary.json, each written atomically, so that an interrupted run never leaves a partial
    dataset behind."""
    storage.write_text(summary_path(path), json.dumps(summary, indent=2))
    # Last: the dataset's presence means both are complete.
    storage.write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in kept))


def summary_path(path: str) -> str:
    return os.path.splitext(str(path))[0] + ".summary.json"


def load_or_sample(pol: policy.Policy, scorer: scoring.Scorer, cfg: ConfigDict, rows: Sequence[dict],
                   workdir: str) -> list[dict]:
    """The SFT `rejection_samples` source: WORKDIR/rejection_samples.jsonl, sampled from `pol` (a
    stage's starting policy) with `cfg.rejection` the first time, read back afterwards."""
    path = storage.path(workdir) / "rejection_samples.jsonl"
    if not path.exists():
        kept, summary = from_config(pol, scorer, cfg, rows)
        write_dataset(kept, summary, path)
        if jax.process_index() == 0:
            print("rejection sampling: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in summary.items()), flush=True)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
