"""Prompt datasets: synthetic generators, local files, hub datasets, and a resumable iterator.

    rows, skipped = load_rows("synthetic:arithmetic", n=2000, seed=0)      # no download
    rows, skipped = load_rows("data/train.jsonl", required=("question", "answer"))
    rows, skipped = load_rows("openai/gsm8k", config="main", split="train")  # where a hub is reachable
    it = PromptIterator(rows, batch_size=8, seed=0)
    batch = it.next()            # list of row dicts; it.state() / PromptIterator.from_state(...) resume

Rows are plain dicts. A row that lacks a required field (missing, None or empty) is skipped and
counted, never raised on, so one bad line cannot stop a run.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any, Sequence

Row = dict[str, Any]

# --------------------------------------------------------------------------------------------------
# Synthetic tasks (verifiable, no download)


def arithmetic_rows(n: int, seed: int = 0, digits: int = 2, ops: str = "+-*",
                    digits_b: int | None = None) -> list[Row]:
    """`What is a op b?` with the exact integer answer; `a` has up to `digits` digits, `b` up to
    `digits_b` (default: the same)."""
    rng = random.Random(seed)
    hi_a, hi_b = 10 ** digits - 1, 10 ** (digits if digits_b is None else digits_b) - 1
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(0, hi_a), rng.randint(0, hi_b), rng.choice(ops)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append({"question": f"What is {a} {op} {b}?", "answer": str(value)})
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


def load_rows(source: str, *, split: str = "train", config: str | None = None, n: int = 1000, seed: int = 0,
              required: Sequence[str] = (), **synthetic_options: Any) -> tuple[list[Row], int]:
    """Rows from `synthetic:NAME` (options such as digits/ops go to the generator), a local
    .jsonl/.json/.parquet file, a folder written by `datasets`' `save_to_disk`, or a hub dataset name.

    Returns (rows, skipped): rows lacking a required field are dropped and counted.
    """
    if source.startswith("synthetic:"):
        name = source.split(":", 1)[1]
        if name not in SYNTHETIC:
            raise ValueError(f"unknown synthetic dataset {name!r}; expected one of {sorted(SYNTHETIC)}")
        return filter_rows(SYNTHETIC[name](n, seed, **synthetic_options), required)
    import datasets

    ext = os.path.splitext(source)[1].lower()
    if os.path.isdir(source):  # a dataset saved with `save_to_disk` (a DatasetDict: its `split`)
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset folder {source} has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
    elif ext in (".jsonl", ".json", ".parquet"):
        if not os.path.exists(source):
            raise FileNotFoundError(f"dataset file {source} does not exist")
        ds = datasets.load_dataset("parquet" if ext == ".parquet" else "json", data_files=source, split="train")
    else:
        try:
            ds = datasets.load_dataset(source, config, split=split)
        except Exception as e:  # offline, unknown name, missing config
            raise ValueError(f"could not load dataset {source!r} (config={config!r}, split={split!r}): {e}") from e
    return filter_rows(list(ds), required)


def split_rows(rows: Sequence[Row], eval_size: int, seed: int = 0,
               key: str | None = None) -> tuple[list[Row], list[Row]]:
    """(train, held-out) with `eval_size` rows held out, chosen by a seeded shuffle.

    With `key` (the prompt field), held-out prompts are distinct and no training row repeats one,
    so a synthetic task that draws the same problem twice cannot leak its answer into evaluation.
    """
    if not 0 <= eval_size < len(rows):
        raise ValueError(f"eval_size={eval_size} must be in [0, {len(rows)}) for {len(rows)} rows")
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
        raise ValueError(f"{len(seen)} distinct prompts cannot give eval_size={eval_size} held-out rows "
                         f"and a non-empty training set")
    return train, [rows[i] for i in held]


# --------------------------------------------------------------------------------------------------
# Iteration


@dataclasses.dataclass
class PromptIterator:
    """Seeded, resumable batches of rows: a new permutation every epoch; this host's share only.

    Host h of H takes the h-th block of each global-batch window of the permutation, so hosts read
    disjoint prompts and, stacked in host order, form exactly the batch one host would read.
    """

    rows: Sequence[Row]
    batch_size: int  # per host
    seed: int = 0
    epoch: int = 0
    position: int = 0  # rows of the epoch's permutation already used (all hosts together)
    host: int = 0
    num_hosts: int = 1

    def __post_init__(self):
        if self.batch_size * self.num_hosts > len(self.rows):
            raise ValueError(f"batch_size={self.batch_size} x {self.num_hosts} hosts exceeds the "
                             f"{len(self.rows)} rows of the dataset")

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> list[Row]:
        global_batch = self.batch_size * self.num_hosts
        if self.position + global_batch > len(self.rows):  # drop the epoch's remainder
            self.epoch, self.position = self.epoch + 1, 0
        window = self._order(self.epoch)[self.position:self.position + global_batch]
        self.position += global_batch
        return [self.rows[i] for i in window[self.host * self.batch_size:(self.host + 1) * self.batch_size]]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
