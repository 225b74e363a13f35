"""Reward functions, their registry, and a worker pool that keeps hostile completions from hurting
the trainer.

A reward function is a plain callable

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

where `columns` are the dataset's other fields (e.g. `answer`), one value per completion; None means
"not applicable" and is left out of sums and means. Built-ins are found by name (`REGISTRY`); a user's
own function is named "module:function".

`score` runs each function over the completions in a `verifier_pool.VerifierPool`: persistent worker
processes fed in chunks, with a wall-clock limit per item enforced from the parent (a worker that
hangs or dies is killed and replaced, the item scores 0 and is counted), so neither a hang nor a
crash reaches the trainer. A function marked with `in_process` (a reward model on the accelerator,
which should see the whole batch at once) is called in the trainer's process with all completions.
"""

from __future__ import annotations

import dataclasses
import importlib
import pickle
from typing import Any, Callable, Sequence

import numpy as np

from grpo_jax.rewards import checks
from grpo_jax.rewards import math_grader
from grpo_jax.rewards import pool_worker
from grpo_jax.rewards import verifier_pool

RewardFn = verifier_pool.RewardFn

# --------------------------------------------------------------------------------------------------
# Built-in reward functions (batch interface over the per-item verifiers)


def _columns(columns: dict[str, Sequence[Any]], n: int, *names: str) -> list[list[Any]]:
    out = []
    for name in names:
        col = columns.get(name)
        if col is None:
            raise KeyError(f"reward needs the dataset column {name!r}; got columns {sorted(columns)}")
        if len(col) != n:
            raise ValueError(f"column {name!r} has {len(col)} values for {n} completions")
        out.append(list(col))
    return out


def math_accuracy(prompts, completions, answer=None, decimals="rounded", **columns) -> list[float]:
    """1 when the completion's final answer (####, \\boxed{}, <answer>, "the answer is") equals `answer`
    (`decimals`: math_grader.answers_match's)."""
    (answers,) = _columns({"answer": answer, **columns}, len(completions), "answer")
    return [math_grader.math_reward(c, a, decimals) for c, a in zip(completions, answers)]


def math_exact_accuracy(prompts, completions, answer=None, **columns) -> list[float]:
    """`math` for datasets whose decimal answers are exact values (MATH): a decimal gold needs an
    equal prediction, not one that rounds to it."""
    return math_accuracy(prompts, completions, answer, decimals="exact", **columns)


def answer_format(prompts, completions, **columns) -> list[float]:
    """1 when the completion states a final answer that `math` can read (####, \\boxed{}, ...) and it
    is a number, right or wrong: the format half of `math`. Weight 0 logs it without paying for it."""
    return [math_grader.format_reward(c) for c in completions]


def format_strict(prompts, completions, **columns) -> list[float]:
    """1 for exactly `<think>...</think>` then `<answer>...</answer>` (DeepSeek-R1 template)."""
    return [checks.format_reward(c, strict=True) for c in completions]


def format_lenient(prompts, completions, **columns) -> list[float]:
    """1 when the four R1 tags appear in order, anything around them."""
    return [checks.format_reward(c, strict=False) for c in completions]


def tag_count(prompts, completions, **columns) -> list[float]:
    """0.25 per R1 tag present exactly once."""
    return [checks.tag_count_reward(c) for c in completions]


def countdown(prompts, completions, numbers=None, target=None, **columns) -> list[float]:
    """1 when the equation uses each of `numbers` once and evaluates to `target`."""
    nums, targets = _columns({"numbers": numbers, "target": target, **columns}, len(completions), "numbers", "target")
    return [checks.countdown_reward(c, n, t) for c, n, t in zip(completions, nums, targets)]


def code_tests(prompts, completions, tests=None, sandbox=None, **columns) -> list[float | None]:
    """Fraction of `tests` (stdin/stdout pairs or test source) the completion's code passes, run in a
    `sandbox` (the optional `sandbox` column: its isolation, "auto" when absent)."""
    (tests,) = _columns({"tests": tests, **columns}, len(completions), "tests")
    isolation = sandbox or ["auto"] * len(completions)
    return [None if t is None else checks.code_reward(c, t, isolation=i)
            for c, t, i in zip(completions, tests, isolation)]


def overlong_penalty(prompts, completions, completion_lengths=None, max_completion_length=None,
                     overlong_buffer=None, **columns) -> list[float]:
    """DAPO's soft overlong punishment, in tokens (`completion_lengths` is passed by the trainer)."""
    lengths, max_len, buf = _columns({"completion_lengths": completion_lengths,
                                      "max_completion_length": max_completion_length,
                                      "overlong_buffer": overlong_buffer, **columns}, len(completions),
                                     "completion_lengths", "max_completion_length", "overlong_buffer")
    return [checks.overlong_penalty(int(n), int(m), int(b)) for n, m, b in zip(lengths, max_len, buf)]


REGISTRY: dict[str, RewardFn] = {
    "math": math_accuracy,
    "math_exact": math_exact_accuracy,
    "answer_format": answer_format,
    "format_strict": format_strict,
    "format_lenient": format_lenient,
    "tag_count": tag_count,
    "countdown": countdown,
    "code": code_tests,
    "overlong": overlong_penalty,
}


def in_process(fn: RewardFn) -> RewardFn:
    """Mark a reward function to run in the trainer's process on the whole batch (e.g. one that
    loads a reward model): no worker, no timeout, so only for trusted code.

        @scoring.in_process
        def preference(prompts, completions, **columns): return model_scores(prompts, completions)
    """
    fn.grpo_in_process = True
    return fn


def get_reward_fn(name: str) -> RewardFn:
    """A built-in by name, or a user's function as "package.module:function"."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward function {name!r} cannot be imported: {e}") from e
        if not callable(fn):
            raise ValueError(f"reward function {name!r} is not callable")
        return fn
    raise ValueError(f"unknown reward function {name!r}; built-ins are {sorted(REGISTRY)}, "
                     "or name your own as 'module:function'")


# --------------------------------------------------------------------------------------------------
# Combining several reward functions


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    name: str
    weight: float = 1.0


def _picklable(fn) -> bool:
    try:
        pickle.dumps(fn)
        return True
    except Exception:  # noqa: BLE001
        return False


def score(specs: Sequence[RewardSpec], prompts: Sequence[str], completions: Sequence[str],
          columns: dict[str, Sequence[Any]], pool: verifier_pool.VerifierPool | None = None,
          fns: dict[str, RewardFn] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """Weighted sum of several reward functions: (total [N] float32, per-function rewards [N] with
    NaN for None, metrics); `score_functions` without the failures by function."""
    return score_functions(specs, prompts, completions, columns, pool, fns)[:3]


def score_functions(
    specs: Sequence[RewardSpec],
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: dict[str, Sequence[Any]],
    pool: verifier_pool.VerifierPool | None = None,
    fns: dict[str, RewardFn] | None = None,
    hang_after: int | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float], dict[str, dict[str, Any]]]:
    """Weighted sum of several reward functions.

    Args:
      specs: reward function names and weights.
      prompts, completions: one entry per completion.
      columns: dataset fields, one value per completion.
      pool: where to run them; None runs in this process (no timeout: trusted functions only), as do
        functions marked `in_process` and ones that cannot be pickled.
      fns: optional name -> callable overrides (functions not in the registry, e.g. lambdas).
      hang_after: the pool's (`VerifierPool.map`): give up on a function after this many timeouts
        with no item finished.

    The same failures count in both paths: an exception, a value that is not a number or None, NaN
    or inf is an error of its item (every item's, when the function raises or returns the wrong
    number of values in this process), which scores 0; the pool adds timeouts and crashes.

    Returns:
      (total [N] float32, per-function rewards [N] with NaN for None, metrics: each function's mean
      and std over its non-None values, its fraction of None, its errors/timeouts/crashes, and their
      totals; failures: {name: {"errors", "timeouts", "crashes", "last_error", "hung", "items"}} for
      each function that failed on some item).
    """
    n = len(completions)
    total = np.zeros(n, np.float64)
    per_fn, failed = {}, {}
    counts = {"timeouts": 0, "crashes": 0, "errors": 0}
    for spec in specs:
        fn = (fns or {}).get(spec.name) or get_reward_fn(spec.name)
        if pool is not None and not getattr(fn, "grpo_in_process", False) and _picklable(fn):
            values, stats = pool.map(fn, prompts, completions, columns, hang_after=hang_after)
        else:
            try:
                results = pool_worker.checked(fn(list(prompts), list(completions),
                                                        **{k: list(v) for k, v in columns.items()}), n)
            except Exception as e:  # noqa: BLE001 - counted and named, as in the pool
                results = [("error", f"{type(e).__name__}: {str(e)[:300]}")] * n
            errors = [v for status, v in results if status == "error"]
            values = [v if status == "ok" else 0.0 for status, v in results]
            stats = {"timeouts": 0, "crashes": 0, "errors": len(errors), "last_error": errors[-1] if errors else None,
                     "hung": False}
        if stats["timeouts"] or stats["crashes"] or stats["errors"]:
            failed[spec.name] = {**stats, "items": n}
        for k in counts:
            counts[k] += stats[k]
        r = np.array([np.nan if v is None else v for v in values], np.float64)
        per_fn[spec.name] = r.astype(np.float32)
        total += spec.weight * np.nan_to_num(r, nan=0.0)
    metrics = reward_metrics(per_fn, counts)
    for name, stats in failed.items():
        metrics.update({f"rewards/{name}/{k}": float(stats[k]) for k in counts})
    return total.astype(np.float32), per_fn, metrics, failed


def reward_metrics(per_fn: dict[str, np.ndarray], counts: dict[str, int]) -> dict[str, float]:
    """Each function's mean and std over its non-None (NaN) values and its fraction of None, and the
    pool's counts (timeouts, crashes, errors)."""
    metrics = {}
    for name, r in per_fn.items():
        valid = r[~np.isnan(r)].astype(np.float64)
        metrics[f"rewards/{name}/mean"] = float(valid.mean()) if valid.size else float("nan")
        metrics[f"rewards/{name}/std"] = float(valid.std()) if valid.size else float("nan")
        metrics[f"rewards/{name}/frac_none"] = 1.0 - valid.size / max(r.size, 1)
    metrics.update({f"rewards/{k}": float(v) for k, v in counts.items()})
    return metrics


# --------------------------------------------------------------------------------------------------
# Scoring the completions of dataset rows


class RewardFailure(RuntimeError):
    """A reward function the run depends on cannot score: the run stops (one line, no traceback)."""


class RewardHangError(RewardFailure):
    """A weighted reward function timed out on every completion it was given (verifier.on_hang="stop")."""


class FailureStreaks:
    """Stops a run whose weighted reward function fails on every completion of `limit` consecutive
    steps (it raises on each, times out, crashes its worker): its rewards are all 0, every group is
    equal, every update is skipped, and the run would go on to its end without training."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"verifier.max_failing_steps={limit}; expected >= 1")
        self.limit, self.streaks = limit, {}

    def observe(self, failed: dict[str, int], items: int, last_errors: dict[str, str | None], step: int) -> None:
        """failed: {name: completions it failed on this step}, over every host, of `items`."""
        for name, n in failed.items():
            self.streaks[name] = self.streaks.get(name, 0) + 1 if items and n >= items else 0
            if self.streaks[name] >= self.limit:
                last = last_errors.get(name)
                raise RewardFailure(
                    f"step {step}: reward {name!r} failed on every completion of {self.streaks[name]} consecutive "
                    f"steps (verifier.max_failing_steps={self.limit}): the run stops instead of training on "
                    f"zeros" + (f"; last error: {last}" if last else ""))


@dataclasses.dataclass
class Scorer:
    """Scores n completions of each dataset row with reward functions: `score` with the rows' fields
    as columns (each repeated n times) plus the completion lengths and length limit that the
    overlong penalty reads. The verifier pool is started on first use, so code that never scores
    (export, sampling) never starts one.

        with Scorer(prompt_field="question", max_completion_length=256, workers=2) as scorer:
            total, per_fn, metrics = scorer([RewardSpec("math")], rows, n, texts, lengths)

    Args:
      prompt_field: the rows' field passed to reward functions as the prompt.
      max_completion_length, overlong_buffer: the `overlong` reward's settings, in tokens.
      fns: callables by name, on top of the registry (a reward model, a lambda, ...).
      workers: verifier processes (0: one per CPU), or -1 to score in this process.
      timeout_s: wall-clock limit per item in the pool.
      sandbox: isolation of the `code` reward's programs (grpo_jax.rewards.sandbox.runner.ISOLATIONS).
      hang_after, on_hang: a function that times out on `hang_after` completions of a call with none
        finished (or whose worker cannot load it in `load_timeout_s`) is taken to hang on all of them
        (its other items are not run). A function with weight 0 (it only logs) is then disabled for
        the rest of the run, said once; one with a weight "stop"s the run (RewardHangError, the
        default) or, with on_hang="disable", is disabled too: the run then optimises the other
        rewards. Without this every later step would wait timeout_s per completion for it. The
        disabled set is `disabled_mask` over a list of names (a trainer agrees on it across hosts
        and keeps it in its checkpoint).
      say: where the one line about a disabled function goes.

    Failures (errors, timeouts, crashes, by function) accumulate until `take_failures()`.
    """

    prompt_field: str
    max_completion_length: int
    overlong_buffer: int = 0
    fns: dict[str, RewardFn] = dataclasses.field(default_factory=dict)
    workers: int = 0
    timeout_s: float = 10.0
    sandbox: str = "auto"
    hang_after: int = 16
    on_hang: str = "stop"
    load_timeout_s: float = 120.0
    say: Callable[[str], None] = print
    disabled: dict[str, str] = dataclasses.field(default_factory=dict, init=False)  # name -> why
    last_errors: dict[str, str] = dataclasses.field(default_factory=dict, init=False)  # name -> its latest error
    _failures: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _pool: verifier_pool.VerifierPool | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.on_hang not in ("disable", "stop"):
            raise ValueError(f"verifier.on_hang={self.on_hang!r}; expected 'stop' or 'disable'")

    @classmethod
    def from_config(cls, cfg, fns: dict[str, RewardFn] | None = None) -> Scorer:
        """The scorer of a run config (`data.prompt_field`, `sampling.max_new_tokens`,
        `grpo.overlong_buffer`, `reward_functions`, `verifier`), with `fns` on top."""
        own = {k: get_reward_fn(v) for k, v in cfg.reward_functions.items()}
        v = cfg.verifier
        return cls(cfg.data.prompt_field, cfg.sampling.max_new_tokens, cfg.grpo.overlong_buffer,
                   {**own, **(fns or {})}, workers=v.workers, timeout_s=v.timeout_s, sandbox=v.get("sandbox", "auto"),
                   hang_after=v.get("hang_after", 16), on_hang=v.get("on_hang", "stop"),
                   load_timeout_s=v.get("load_timeout_s", 120.0))

    @property
    def pool(self) -> verifier_pool.VerifierPool | None:
        if self._pool is None and self.workers >= 0:
            self._pool = verifier_pool.VerifierPool(self.workers or None, self.timeout_s,
                                                    load_timeout_s=self.load_timeout_s)
        return self._pool

    def disabled_mask(self, names: Sequence[str]) -> int:
        """The disabled functions among `names`, as bits (bit i: names[i])."""
        return sum(1 << i for i, name in enumerate(names) if name in self.disabled)

    def set_disabled(self, mask: int, names: Sequence[str]) -> None:
        """Disable the functions of `mask`'s bits (another host's, or a checkpoint's record)."""
        for i, name in enumerate(names):
            if mask >> i & 1 and name not in self.disabled:
                self.disabled[name] = "disabled on another host or before the checkpoint this run resumed from"

    def take_failures(self) -> dict[str, dict[str, Any]]:
        """{name: {"errors", "timeouts", "crashes", "items", "last_error"}} of the functions that failed
        on some completion since the last call."""
        out, self._failures = self._failures, {}
        return out

    def columns(self, rows: Sequence[dict], n: int, lengths: Sequence[int]) -> dict[str, list]:
        """The reward functions' keyword columns: each row's fields repeated n times, plus lengths."""
        columns = {k: [r.get(k) for r in rows for _ in range(n)] for k in rows[0]}
        columns.update(completion_lengths=[int(x) for x in lengths],
                       max_completion_length=[self.max_completion_length] * len(lengths),
                       overlong_buffer=[self.overlong_buffer] * len(lengths), sandbox=[self.sandbox] * len(lengths))
        return columns

    def __call__(self, specs: Sequence[RewardSpec], rows: Sequence[dict], n: int, texts: Sequence[str],
                 lengths: Sequence[int], extra: dict[str, list] | None = None,
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
        """`score` of `texts` (the n completions of each row, adjacent); `extra`: more columns, one
        value per completion (a multi-turn episode's `tool_calls` and `environment`)."""
        prompts = [str(r[self.prompt_field]) for r in rows for _ in range(n)]
        live = [s for s in specs if s.name not in self.disabled]
        total, per_fn, metrics, failed = score_functions(live, prompts, texts, {**self.columns(rows, n, lengths), **(extra or {})},
                                                         pool=self.pool, fns=self.fns, hang_after=self.hang_after)
        weights = {s.name: s.weight for s in specs}
        for name, stats in failed.items():
            seen = self._failures.setdefault(name, {"errors": 0, "timeouts": 0, "crashes": 0, "items": 0})
            for k in ("errors", "timeouts", "crashes", "items"):
                seen[k] += stats[k]
            seen["last_error"] = stats["last_error"] or seen.get("last_error")
            if stats["last_error"]:
                self.last_errors[name] = stats["last_error"]
            elif stats["timeouts"]:
                self.last_errors[name] = f"timed out (verifier.timeout_s={self.timeout_s:g})"
            if stats["hung"]:
                self._hung(name, stats, weights[name])
        for s in specs:  # a disabled function: not applicable (NaN) everywhere, so its keys stay
            if s.name not in per_fn:
                per_fn[s.name] = np.full(len(texts), np.nan, np.float32)
                metrics.update(reward_metrics({s.name: per_fn[s.name]}, {}))
        return total, per_fn, metrics

    def _hung(self, name: str, stats: dict[str, Any], weight: float) -> None:
        if stats["last_error"] and stats["last_error"].startswith("loading"):
            why = f"reward {name!r} hangs: {stats['last_error']}"
        else:
            why = (f"reward {name!r} timed out on the first {stats['timeouts'] - stats.get('abandoned', 0)} "
                   f"completions it was given and finished none (verifier.timeout_s={self.timeout_s:g}, "
                   f"verifier.hang_after={self.hang_after})")
        if weight and self.on_hang == "stop":
            raise RewardHangError(f"{why}: the run stops, it has weight {weight:g} (verifier.on_hang='stop'; "
                                  "'disable' would go on without it)")
        self.disabled[name] = why
        self.say(f"{why}: disabled for the rest of the run, it scores 0 from now on" + (
            " (weight 0: it only logs)" if not weight else
            f" (weight {weight:g}, verifier.on_hang='disable'; 'stop' stops the run instead)"))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
