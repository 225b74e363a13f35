"""Prompt datasets: synthetic generators, local files, hub datasets, and a resumable iterator.

    rows, skipped = load_rows("synthetic:arithmetic", n=2000, seed=0)      # no download
    rows, skipped = load_rows("data/train.jsonl", required=("question", "answer"))
    rows, skipped = load_rows("openai/gsm8k", config="main", split="train")  # where a hub is reachable
    it = PromptIterator(rows, batch_size=8, seed=0)
    batch = it.next()            # list of row dicts; it.state() / it.restore(state) resume
    rows, position = it.batch(position)   # the same, pure: the position lives in the train state
    task = load_task(cfg.data, seed=0)    # a run's training and held-out rows

Rows are plain dicts. A row that lacks a required field (missing, None or empty) is skipped and
counted, never raised on, so one bad line cannot stop a run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
from typing import Any, Callable, Sequence

Row = dict[str, Any]

# --------------------------------------------------------------------------------------------------
# Synthetic tasks (verifiable, no download)


def arithmetic_rows(n: int, seed: int = 0, digits: int = 2, ops: str = "+-*",
                    digits_b: int | None = None) -> list[Row]:
    """`What is a op b?` with the exact integer answer; `a` has up to `digits` digits, `b` up to
    `digits_b` (default: the same). `expression` is "a op b" without spaces (a calculator's input in
    tool-use demonstrations)."""
    rng = random.Random(seed)
    hi_a, hi_b = 10 ** digits - 1, 10 ** (digits if digits_b is None else digits_b) - 1
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(0, hi_a), rng.randint(0, hi_b), rng.choice(ops)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append({"question": f"What is {a} {op} {b}?", "answer": str(value), "expression": f"{a}{op}{b}"})
    return rows


def countdown_rows(n: int, seed: int = 0, count: int = 4, max_number: int = 50) -> list[Row]:
    """Countdown: `count` numbers and a target reachable with + - * (each number once).

    The target comes from a random expression over the numbers, kept in `solution`, so every
    problem is solvable (other solutions are accepted by the verifier too).
    """
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        nums = [rng.randint(1, max_number) for _ in range(count)]
        order = nums[:]
        rng.shuffle(order)
        expr = str(order[0])
        value = order[0]
        for x in order[1:]:
            op = rng.choice("+-*")
            expr = f"({expr} {op} {x})"
            value = {"+": value + x, "-": value - x, "*": value * x}[op]
        if 0 < value < 1000:
            rows.append({"numbers": nums, "target": value, "solution": expr,
                         "question": f"Using the numbers {nums}, each exactly once, with + - * /, make {value}."})
    return rows


SYNTHETIC = {"arithmetic": arithmetic_rows, "countdown": countdown_rows}


# --------------------------------------------------------------------------------------------------
# Loading


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, (list, tuple)) and len(value) == 0)


def filter_rows(rows: Sequence[Row], required: Sequence[str]) -> tuple[list[Row], int]:
    """Rows that have every required field, and how many were skipped."""
    kept = [r for r in rows if isinstance(r, dict) and not any(_is_missing(r.get(f)) for f in required)]
    return kept, len(rows) - len(kept)


class DataError(ValueError):
    """A dataset the run cannot use (missing, empty, unreadable, without the fields it needs, too
    small for the held-out split): said in one line, before any model loads."""


def load_rows(source: str, *, split: str = "train", config: str | None = None, n: int = 1000, seed: int = 0,
              required: Sequence[str] = (), **synthetic_options: Any) -> tuple[list[Row], int]:
    """Rows from `synthetic:NAME` (options such as digits/ops go to the generator), a local
    .jsonl/.json/.parquet file, a folder written by `datasets`' `save_to_disk`, or a hub dataset name.

    Returns (rows, skipped): rows lacking a required field are dropped and counted.
    """
    if source.startswith("synthetic:"):
        name = source.split(":", 1)[1]
        if name not in SYNTHETIC:
            raise DataError(f"unknown synthetic dataset {name!r}; expected one of {sorted(SYNTHETIC)}")
        return _usable(SYNTHETIC[name](n, seed, **synthetic_options), required, source)
    import datasets

    ext = os.path.splitext(source)[1].lower()
    if os.path.isdir(source):  # a dataset saved with `save_to_disk` (a DatasetDict: its `split`)
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"dataset folder {source} has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
    elif ext in (".jsonl", ".json", ".parquet"):
        if not os.path.exists(source):
            raise DataError(f"dataset file {source} does not exist")
        if ext == ".jsonl":  # read here: a bad line is named by its number
            return _usable(_read_jsonl(source), required, source)
        try:
            ds = datasets.load_dataset("parquet" if ext == ".parquet" else "json", data_files=source, split="train")
        except Exception as e:  # noqa: BLE001 -- datasets' errors name neither the file nor the problem plainly
            cause = e.__cause__ or e.__context__ or e
            raise DataError(f"could not read dataset file {source}: {type(cause).__name__}: {cause}"
                             + (" (it holds no rows)" if os.path.getsize(source) == 0 else "")) from e
    else:
        try:
            ds = datasets.load_dataset(source, config, split=split)
        except Exception as e:  # offline, unknown name, missing config
            raise DataError(f"could not load dataset {source!r} (config={config!r}, split={split!r}): {e}") from e
    return _usable(list(ds), required, source)


def _read_jsonl(path: str) -> list[Row]:
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line.decode("utf-8")))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DataError(f"dataset file {path}, line {number}: {type(e).__name__}: {e}") from None
    return rows


def _usable(rows: Sequence[Row], required: Sequence[str], source: str) -> tuple[list[Row], int]:
    """filter_rows, refusing a source that leaves nothing, with which fields were missing."""
    kept, skipped = filter_rows(rows, required)
    if not kept:
        if not rows:
            raise DataError(f"dataset {source} holds no rows")
        missing = {f: sum(not isinstance(r, dict) or _is_missing(r.get(f)) for r in rows) for f in required}
        raise DataError(f"dataset {source}: every one of its {len(rows)} rows lacks a required field ("
                         + ", ".join(f"{f!r} missing or empty in {k}" for f, k in missing.items() if k)
                         + f"; data.required_fields={list(required)}, and the rows have {sorted(rows[0])[:12]})"
                         if isinstance(rows[0], dict) else ")")
    return kept, skipped


def split_rows(rows: Sequence[Row], eval_size: int, seed: int = 0,
               key: str | None = None) -> tuple[list[Row], list[Row]]:
    """(train, held-out) with `eval_size` rows held out, chosen by a seeded shuffle.

    With `key` (the prompt field), held-out prompts are distinct and no training row repeats one,
    so a synthetic task that draws the same problem twice cannot leak its answer into evaluation.
    """
    if not 0 <= eval_size < len(rows):
        raise DataError(f"eval_size={eval_size} must be in [0, {len(rows)}) for {len(rows)} rows")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    ident = (lambda i: str(rows[i][key])) if key else (lambda i: i)
    held, seen = [], set()
    for i in order:
        if len(held) == eval_size:
            break
        if ident(i) not in seen:
            held.append(i)
            seen.add(ident(i))
    train = [r for i, r in enumerate(rows) if ident(i) not in seen]
    if len(held) < eval_size or not train:
        raise DataError(f"{len(seen)} distinct prompts cannot give eval_size={eval_size} held-out rows "
                         f"and a non-empty training set")
    return train, [rows[i] for i in held]


# --------------------------------------------------------------------------------------------------
# Iteration


@dataclasses.dataclass
class PromptIterator:
    """Seeded, resumable batches of rows: a new permutation every epoch; this host's share only.

    Host h of H takes the h-th block of each global-batch window of the permutation, so hosts read
    disjoint prompts and, stacked in host order, form exactly the batch one host would read. The
    position is a small dict (`state()`), which the train state keeps and checkpoints:

        rows, position = it.batch(position)   # pure: the same position gives the same rows
        rows = it.next()                      # the same, advancing the iterator's own position
    """

    rows: Sequence[Row]
    batch_size: int  # per host
    seed: int = 0
    epoch: int = 0
    position: int = 0  # rows of the epoch's permutation already used (all hosts together)
    host: int = 0
    num_hosts: int = 1

    def __post_init__(self):
        if self.batch_size < 1 or self.batch_size * self.num_hosts > len(self.rows):
            raise ValueError(f"batch_size={self.batch_size} x {self.num_hosts} hosts must be in [1, "
                             f"{len(self.rows)}], the rows of the dataset")
        self._permutation: tuple[int, list[int]] | None = None  # (epoch, order): one shuffle per epoch

    def _order(self, epoch: int) -> list[int]:
        if self._permutation is None or self._permutation[0] != epoch:
            order = list(range(len(self.rows)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._permutation = (epoch, order)
        return self._permutation[1]

    def _check_seed(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data state was saved with seed {int(state['seed'])}, this run uses {self.seed}")

    def batch(self, state: dict[str, Any], size: int | None = None) -> tuple[list[Row], dict[str, int]]:
        """This host's rows at `state` (from `state()` or an earlier `batch`) and the next state;
        `size` rows per host (default: batch_size)."""
        self._check_seed(state)
        size = self.batch_size if size is None else size
        epoch, position = int(state["epoch"]), int(state["position"])
        global_batch = size * self.num_hosts
        if position + global_batch > len(self.rows):  # drop the epoch's remainder
            epoch, position = epoch + 1, 0
        window = self._order(epoch)[position:position + global_batch]
        rows = [self.rows[i] for i in window[self.host * size:(self.host + 1) * size]]
        return rows, {"epoch": epoch, "position": position + global_batch, "seed": self.seed}

    def next(self) -> list[Row]:
        rows, state = self.batch(self.state())
        self.epoch, self.position = state["epoch"], state["position"]
        return rows

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def restore(self, state: dict[str, Any]) -> None:
        self._check_seed(state)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# --------------------------------------------------------------------------------------------------
# A run's task: training and held-out rows from the config's `data` section


@dataclasses.dataclass(frozen=True)
class Task:
    """The rows of a run: training prompts, held-out problems (never among the training prompts),
    and how many rows were skipped for missing fields."""

    train: list[Row]
    eval: list[Row]
    skipped: int


def without_long_prompts(task: Task, too_long: Callable[[Sequence[Row]], list[int]], limit: int) -> tuple[Task, str]:
    """The task less the rows whose prompt `too_long` finds longer than `limit` tokens (counted with
    the skipped rows), and a line saying so ("" when none is). A task left without training or
    held-out rows is an error."""
    drop_train, drop_eval = set(too_long(task.train)), set(too_long(task.eval))
    if not drop_train and not drop_eval:
        return task, ""
    train = [r for i, r in enumerate(task.train) if i not in drop_train]
    held = [r for i, r in enumerate(task.eval) if i not in drop_eval]
    what = (f"{len(drop_train)} of {len(task.train)} training and {len(drop_eval)} of {len(task.eval)} held-out "
            f"prompts are longer than the largest prompt bucket ({limit} tokens, sampling.prompt_buckets)")
    if not train or (task.eval and not held):
        raise DataError(f"data: {what}: nothing would be left to {'train on' if not train else 'evaluate'}; "
                         "add a larger bucket or shorten the prompts")
    return Task(train, held, task.skipped + len(drop_train) + len(drop_eval)), f"data: {what}: skipped"


def load_task(d, seed: int) -> Task:
    """Training and held-out rows for a config's `data` section (`cfg.data`): `eval_size` prompts
    held out of `split`, or a seeded sample of `eval_split` when it is set. `data.seed`, when set,
    replaces the run's `seed` here: runs of several seeds then share their rows and held-out set."""
    seed = seed if d.get("seed") is None else d.seed
    options = {k: d[k] for k in ("digits", "digits_b", "ops")} if d.source == "synthetic:arithmetic" else {}
    load = functools.partial(load_rows, d.source, config=d.config or None, n=d.synthetic_size,
                             required=tuple(d.required_fields), **options)
    rows, skipped = load(split=d.split, seed=seed)
    if d.eval_split:  # a separate split (GSM8K's test)
        held, more = load(split=d.eval_split, seed=seed + 1)
        held = held if d.eval_size >= len(held) else split_rows(held, d.eval_size, seed)[1]
        return Task(list(rows), list(held), skipped + more)
    train, held = split_rows(rows, d.eval_size, seed, key=d.prompt_field)
    return Task(train, held, skipped)
