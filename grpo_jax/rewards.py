"""Reward functions, their registry, and a worker pool that keeps hostile completions from hurting
the trainer.

A reward function is a plain callable

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

where `columns` are the dataset's other fields (e.g. `answer`), one value per completion; None means
"not applicable" and is left out of sums and means. Built-ins are found by name (`REGISTRY`); a user's
own function is named "module:function".

`score` runs each function one completion at a time in a `VerifierPool`: persistent worker processes,
a wall-clock limit per item enforced from the parent (a worker that hangs or dies is killed and
replaced, the item scores 0 and is counted), so neither a hang nor a crash reaches the trainer.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import multiprocessing as mp
import os
import pickle
import time
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

import numpy as np

from grpo_jax import verifiers

RewardFn = Callable[..., list]

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


def math_accuracy(prompts, completions, answer=None, **columns) -> list[float]:
    """1 when the completion's final answer (####, \\boxed{}, <answer>, "the answer is") equals `answer`."""
    (answers,) = _columns({"answer": answer, **columns}, len(completions), "answer")
    return [verifiers.math_reward(c, a) for c, a in zip(completions, answers)]


def format_strict(prompts, completions, **columns) -> list[float]:
    """1 for exactly `<think>...</think>` then `<answer>...</answer>` (DeepSeek-R1 template)."""
    return [verifiers.format_reward(c, strict=True) for c in completions]


def format_lenient(prompts, completions, **columns) -> list[float]:
    """1 when the four R1 tags appear in order, anything around them."""
    return [verifiers.format_reward(c, strict=False) for c in completions]


def tag_count(prompts, completions, **columns) -> list[float]:
    """0.25 per R1 tag present exactly once."""
    return [verifiers.tag_count_reward(c) for c in completions]


def countdown(prompts, completions, numbers=None, target=None, **columns) -> list[float]:
    """1 when the equation uses each of `numbers` once and evaluates to `target`."""
    nums, targets = _columns({"numbers": numbers, "target": target, **columns}, len(completions), "numbers", "target")
    return [verifiers.countdown_reward(c, n, t) for c, n, t in zip(completions, nums, targets)]


def code_tests(prompts, completions, tests=None, **columns) -> list[float | None]:
    """Fraction of `tests` (stdin/stdout pairs or assert strings) the completion's code passes."""
    (tests,) = _columns({"tests": tests, **columns}, len(completions), "tests")
    return [None if t is None else verifiers.code_reward(c, t) for c, t in zip(completions, tests)]


def overlong_penalty(prompts, completions, completion_lengths=None, max_completion_length=None,
                     overlong_buffer=None, **columns) -> list[float]:
    """DAPO's soft overlong punishment, in tokens (`completion_lengths` is passed by the trainer)."""
    lengths, max_len, buf = _columns({"completion_lengths": completion_lengths,
                                      "max_completion_length": max_completion_length,
                                      "overlong_buffer": overlong_buffer, **columns}, len(completions),
                                     "completion_lengths", "max_completion_length", "overlong_buffer")
    return [verifiers.overlong_penalty(int(n), int(m), int(b)) for n, m, b in zip(lengths, max_len, buf)]


REGISTRY: dict[str, RewardFn] = {
    "math": math_accuracy,
    "format_strict": format_strict,
    "format_lenient": format_lenient,
    "tag_count": tag_count,
    "countdown": countdown,
    "code": code_tests,
    "overlong": overlong_penalty,
}


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
# Worker pool


def _worker_main(conn, memory_mb: int) -> None:
    """Worker loop: receive (fn, prompt, completion, columns), send back the reward or the error."""
    import resource

    if memory_mb:
        limit = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn, prompt, completion, columns = msg
        try:
            value = fn([prompt], [completion], **{k: [v] for k, v in columns.items()})[0]
            out = ("ok", None if value is None else float(value))
        except BaseException as e:  # noqa: BLE001 - a reward error must come back, not kill the worker
            out = ("error", f"{type(e).__name__}: {str(e)[:300]}")
        try:
            conn.send(out)
        except (BrokenPipeError, OSError):
            return


class VerifierPool:
    """Persistent worker processes that score one completion at a time under a wall-clock limit.

    Args:
      num_workers: processes (default: the number of CPUs).
      timeout_s: wall-clock limit per item; past it the worker is killed and replaced.
      memory_mb: address-space limit of each worker (a memory bomb raises MemoryError there).
    """

    def __init__(self, num_workers: int | None = None, timeout_s: float = 10.0, memory_mb: int = 4096):
        self.num_workers = num_workers or os.cpu_count() or 1
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.last_error: str | None = None
        # spawn, not fork: the parent runs JAX's threads, which a fork would copy in a broken state.
        self._ctx = mp.get_context("spawn")
        self._workers = [self._launch() for _ in range(self.num_workers)]
        for proc, conn in self._workers:
            self._await_ready(proc, conn)

    def _launch(self):
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self.memory_mb), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    @staticmethod
    def _await_ready(proc, conn, timeout_s: float = 300.0) -> None:
        # A worker that dies before it serves anything would otherwise be replaced once per item,
        # each replacement re-importing the main script: fail once, loudly, with the usual cause.
        try:
            ok = conn.poll(timeout_s) and conn.recv() == "ready"
        except (EOFError, OSError):
            ok = False
        if not ok:
            proc.join(1)
            proc.kill()
            raise RuntimeError(
                f"a verifier worker did not start (exit code {proc.exitcode}). Worker processes are "
                "spawned and re-import the main script: put the script's work under "
                "`if __name__ == '__main__':`, or score in this process (the trainer's "
                "verifier.workers=-1).")

    def _replace(self, i: int) -> None:
        proc, conn = self._workers[i]
        proc.kill()
        proc.join(5)
        conn.close()
        self._workers[i] = self._launch()
        self._await_ready(*self._workers[i])

    def map(self, fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
            columns: dict[str, Sequence[Any]]) -> tuple[list[float | None], dict[str, int]]:
        """fn on each (prompt, completion, row of columns); (rewards, counts of timeouts/crashes/errors)."""
        n = len(completions)
        results: list[float | None] = [0.0] * n
        stats = {"timeouts": 0, "crashes": 0, "errors": 0}
        pending = list(range(n))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # worker -> (item, deadline)
        while pending or busy:
            for w in range(self.num_workers):
                if w not in busy and pending:
                    i = pending.pop()
                    row = {k: v[i] for k, v in columns.items()}
                    try:
                        self._workers[w][1].send((fn, prompts[i], completions[i], row))
                    except (BrokenPipeError, OSError):
                        self._replace(w)
                        self._workers[w][1].send((fn, prompts[i], completions[i], row))
                    busy[w] = (i, time.monotonic() + self.timeout_s)
            conns = {self._workers[w][1]: w for w in busy}
            next_deadline = min(d for _, d in busy.values())
            ready = wait(list(conns), timeout=max(0.0, next_deadline - time.monotonic()))
            for conn in ready:
                w = conns[conn]
                i, _ = busy.pop(w)
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):  # the worker died (segfault, OOM kill, os._exit)
                    stats["crashes"] += 1
                    self._replace(w)
                    continue
                if status == "ok":
                    results[i] = value
                else:
                    stats["errors"] += 1
                    self.last_error = value
            now = time.monotonic()
            for w, (i, deadline) in list(busy.items()):
                if now >= deadline:
                    busy.pop(w)
                    stats["timeouts"] += 1
                    self._replace(w)
        return results, stats

    def close(self) -> None:
        for proc, conn in self._workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(1)
            if proc.is_alive():
                proc.kill()
            conn.close()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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


def score(
    specs: Sequence[RewardSpec],
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: dict[str, Sequence[Any]],
    pool: VerifierPool | None = None,
    fns: dict[str, RewardFn] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """Weighted sum of several reward functions.

    Args:
      specs: reward function names and weights.
      prompts, completions: one entry per completion.
      columns: dataset fields, one value per completion.
      pool: where to run them; None runs in this process (no timeout: trusted functions only).
      fns: optional name -> callable overrides (functions not in the registry, e.g. lambdas).

    Returns:
      (total [N] float32, per-function rewards [N] with NaN for None, metrics: each function's mean
      and std over its non-None values, the fraction of None, and the pool's timeouts/crashes/errors).
    """
    n = len(completions)
    total = np.zeros(n, np.float64)
    per_fn = {}
    counts = {"timeouts": 0, "crashes": 0, "errors": 0}
    for spec in specs:
        fn = (fns or {}).get(spec.name) or get_reward_fn(spec.name)
        if pool is not None and _picklable(fn):
            values, stats = pool.map(fn, prompts, completions, columns)
            for k in counts:
                counts[k] += stats[k]
        else:
            try:
                values = list(fn(list(prompts), list(completions), **{k: list(v) for k, v in columns.items()}))
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"reward function {spec.name!r} raised {type(e).__name__}: {e}") from e
            if len(values) != n:
                raise ValueError(f"reward function {spec.name!r} returned {len(values)} values for {n} completions")
        r = np.array([np.nan if v is None or not math.isfinite(float(v)) else float(v) for v in values], np.float64)
        per_fn[spec.name] = r.astype(np.float32)
        total += spec.weight * np.nan_to_num(r, nan=0.0)
    return total.astype(np.float32), per_fn, reward_metrics(per_fn, counts)


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
    """

    prompt_field: str
    max_completion_length: int
    overlong_buffer: int = 0
    fns: dict[str, RewardFn] = dataclasses.field(default_factory=dict)
    workers: int = 0
    timeout_s: float = 10.0
    _pool: VerifierPool | None = dataclasses.field(default=None, init=False, repr=False)

    @classmethod
    def from_config(cls, cfg, fns: dict[str, RewardFn] | None = None) -> Scorer:
        """The scorer of a run config (`data.prompt_field`, `sampling.max_new_tokens`,
        `grpo.overlong_buffer`, `reward_functions`, `verifier`), with `fns` on top."""
        own = {k: get_reward_fn(v) for k, v in cfg.reward_functions.items()}
        return cls(cfg.data.prompt_field, cfg.sampling.max_new_tokens, cfg.grpo.overlong_buffer,
                   {**own, **(fns or {})}, workers=cfg.verifier.workers, timeout_s=cfg.verifier.timeout_s)

    @property
    def pool(self) -> VerifierPool | None:
        if self._pool is None and self.workers >= 0:
            self._pool = VerifierPool(self.workers or None, self.timeout_s)
        return self._pool

    @property
    def last_error(self) -> str | None:
        return None if self._pool is None else self._pool.last_error

    def columns(self, rows: Sequence[dict], n: int, lengths: Sequence[int]) -> dict[str, list]:
        """The reward functions' keyword columns: each row's fields repeated n times, plus lengths."""
        columns = {k: [r.get(k) for r in rows for _ in range(n)] for k in rows[0]}
        columns.update(completion_lengths=[int(x) for x in lengths],
                       max_completion_length=[self.max_completion_length] * len(lengths),
                       overlong_buffer=[self.overlong_buffer] * len(lengths))
        return columns

    def __call__(self, specs: Sequence[RewardSpec], rows: Sequence[dict], n: int, texts: Sequence[str],
                 lengths: Sequence[int]) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
        """`score` of `texts` (the n completions of each row, adjacent)."""
        prompts = [str(r[self.prompt_field]) for r in rows for _ in range(n)]
        return score(specs, prompts, texts, self.columns(rows, n, lengths), pool=self.pool, fns=self.fns)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
