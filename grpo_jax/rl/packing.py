"""Packed batches for the update: each group's prompt computed once, completions without padding.

The padded batch repeats a group's prompt for each of its G completions and pads every completion
to the step's longest. A packed batch holds rows of a fixed token budget T, each with one or more
segments

    [prompt_g, completion_g1, ..., completion_gG] [prompt_h, completion_h1, ...] ... (empty)

in which a completion attends to its own prompt and its own earlier tokens only (the prefix-sharing
mask, grpo_jax.models.attention.prefix_sharing_mask) and its rotary positions continue from its
prompt's length, so each token sees exactly what it sees in its own padded row. A group that does
not fit the free space of any row is split into pieces, the prompt repeated in each. Rows are
filled first-fit decreasing (largest group first), then ordered so that the data x fsdp shards get
equal real tokens (rows are static shapes: every shard computes T tokens per row; the balance is of
real work, for kernels that skip empty blocks, and of memory read by the loss). The number of rows
R and their length T are those of least estimated cost (`plan`), on a grid that keeps the shapes of
a run to a few compiled programs.

    plan = packing.plan(prompt_lengths, completion_lengths, G, row_multiple=shards * microbatches)
    batch = packing.layout(plan, prompts, completions, C, pad_id)    # numpy, the [R, T] arrays
    batch["advantages"] = plan.to_slots(advantages)                 # [N] -> [R, S]

Arrays of a packed batch (R rows of T tokens, S completion slots per row, C tokens per completion):
    tokens      [R, T] int32  the packed tokens (pad_id where a row is empty)
    positions   [R, T] int32  rotary positions: 0.. along a prompt, continuing along each completion
    pieces      [R, T] int32  the piece (a prompt and completions of it) a token belongs to, from 1; 0 empty
    members     [R, T] int32  0 on a prompt, i on the piece's i-th completion
    sources     [R, T] int32  where the hidden state that predicts tokens[r, t] is: t - 1 inside a
                              completion, its prompt's last token at a completion's first token
    slot_start  [R, S] int32  where each slot's completion starts in its row
    completion_mask [R, S, C] bool, completion_valid [R, S] bool (the slot holds a completion)
and the per-completion inputs of the loss in the same slots (advantages, truncated [R, S];
old_logp, ref_logp, sampler_logp [R, S, C]): the loss reads log-probabilities in the
[completions, tokens] layout it has always used, so every aggregation and metric stays exact.

Tokens computed per unique token (R x T over each group's prompt once plus every completion token)
is the cost this layout cuts: about 1.1 where the padded batch computes 6x (a recipe's short
completions under a long chat prompt) to 10x and more (long-tailed lengths); docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

# Keys of a packed batch laid out per row token ([R, T]), and all that a log-probability pass reads.
ROW_KEYS = ("tokens", "positions", "pieces", "members", "sources")
SEQUENCE_KEYS = (*ROW_KEYS, "slot_start", "completion_mask")


NEAR = 0.05  # layouts within 5% of the cheapest estimate count as equally good (plan)


def row_bucket(n: int) -> int:
    """The smallest row length >= n on a grid of 1/8 of n's power of two (at least 16): a few
    programs over a run, at most 12% of a row lost to the rounding (plan then prefers the
    lengths that lose little)."""
    n = int(n)
    q = max(16, 1 << max(0, n.bit_length() - 4))
    return -(-n // q) * q


def rows_bucket(k: int) -> int:
    """Row counts (in units of row_multiple): 1, 2, 3, 4, then on a grid of 1/4 of k's power of
    two (5, 6, 7, 8, 10, 12, 14, 16, 20, ...): the row length absorbs the rest."""
    q = 1 << max(0, int(k).bit_length() - 3)
    return -(-int(k) // q) * q


def slot_bucket(n: int) -> int:
    """Completion slots per row: the next power of two (slots cost C floats each, not a forward)."""
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where each group's pieces and each completion go. Completions are indexed as in the step's
    batch (group g's completions are g * G ... g * G + G - 1)."""

    rows: int  # R
    row_tokens: int  # T
    slots: int  # S
    piece_row: np.ndarray  # [pieces] int
    piece_offset: np.ndarray  # [pieces] where the piece's prompt starts in its row
    piece_group: np.ndarray  # [pieces]
    completion_row: np.ndarray  # [N]
    completion_slot: np.ndarray  # [N]
    completion_start: np.ndarray  # [N] where the completion starts in its row
    completion_piece: np.ndarray  # [N] index into the pieces
    prompt_lengths: np.ndarray  # [groups]
    completion_lengths: np.ndarray  # [N]

    @property
    def unique_tokens(self) -> int:
        """Each group's prompt once plus every completion token."""
        return int(self.prompt_lengths.sum() + self.completion_lengths.sum())

    @property
    def computed_tokens(self) -> int:
        return self.rows * self.row_tokens

    @property
    def row_real_tokens(self) -> np.ndarray:
        """[R] tokens that are not empty space, per row."""
        real = np.bincount(self.piece_row, self.prompt_lengths[self.piece_group], minlength=self.rows)
        return real + np.bincount(self.completion_row, self.completion_lengths, minlength=self.rows)

    def to_slots(self, x: np.ndarray, fill=0) -> np.ndarray:
        """Per-completion values [N, ...] in the slot layout [R, S, ...] (`fill` in empty slots)."""
        x = np.asarray(x)
        if x.shape[0] != len(self.completion_row):
            raise ValueError(f"{x.shape[0]} completions given; the plan holds {len(self.completion_row)}")
        out = np.full((self.rows, self.slots, *x.shape[1:]), fill, x.dtype)
        out[self.completion_row, self.completion_slot] = x
        return out


def _fill(prompt_lengths: np.ndarray, completion_lengths: np.ndarray, rows: int, T: int) -> list | None:
    """First-fit decreasing of groups into `rows` rows of T tokens, splitting a group that fits no
    row's free space into pieces (the prompt in each, as many completions as fit the emptiest row,
    longest first). Returns pieces [(row, offset, group, completion indices)] or None."""
    G = completion_lengths.shape[1]
    free = np.full(rows, T, np.int64)
    pieces = []

    def place(row, group, members):
        size = prompt_lengths[group] + completion_lengths[group, members].sum()
        pieces.append((row, T - free[row], group, np.sort(members)))
        free[row] -= size

    sizes = prompt_lengths + completion_lengths.sum(axis=1)
    for g in np.argsort(-sizes, kind="stable"):
        fits = np.flatnonzero(free >= sizes[g])
        if fits.size:
            place(fits[0], g, np.arange(G))
            continue
        left = [int(i) for i in np.argsort(-completion_lengths[g], kind="stable")]
        while left:
            row = int(np.argmax(free))
            room, take = free[row] - prompt_lengths[g], []
            for i in left:
                if completion_lengths[g, i] <= room:
                    take.append(i)
                    room -= completion_lengths[g, i]
            if not take:
                return None
            place(row, g, np.asarray(take))
            left = [i for i in left if i not in take]
    return pieces


def plan(prompt_lengths: Sequence[int], completion_lengths: Sequence[int], num_generations: int, *,
         row_multiple: int = 1, max_row_tokens: int = 8192, attention_cost: float = 0.0, shards: int = 1,
         rows: int | None = None, row_tokens: int | None = None, slots: int | None = None) -> Plan:
    """Where the groups go: the rows R and row length T of least estimated cost

        R x T x (1 + attention_cost x T)

    (every position computes the same layers; attention over a packed row's T keys costs
    attention_cost x T of that per position: `grpo.attention_cost`), each row length on the
    `row_bucket` grid, R the fewest rows in which the groups fit at that length.

    Args:
      prompt_lengths: [groups] real prompt tokens.
      completion_lengths: [groups * G] real completion tokens (EOS included), G per group adjacent.
      num_generations: G.
      row_multiple: rows come in multiples of this (data x fsdp shards x micro-batches x minibatches).
      max_row_tokens: the row budget T is at most this, unless one prompt and its longest completion
        need more (then T is what they need).
      attention_cost: the attention's cost per key per position, relative to the rest of a position's
        cost (0: only positions count, and the tightest layout wins).
      shards: the data x fsdp shards the rows are split over (contiguous blocks of R / shards).
      rows, row_tokens, slots: force R, T and S (every host of a run lays out the same shapes: plan
        on each, take the maximum of each, plan again with them).
    """
    P = np.asarray(prompt_lengths, np.int64)
    L = np.asarray(completion_lengths, np.int64).reshape(len(P), num_generations)
    if (P < 1).any() or (L < 0).any():
        raise ValueError(f"prompt lengths must be >= 1 and completion lengths >= 0; got {P.tolist()}, {L.tolist()}")
    unique = int(P.sum() + L.sum())
    need = row_bucket(int((P + L.max(axis=1)).max()))  # the longest [prompt, completion]
    if row_tokens is not None and row_tokens < need:
        raise ValueError(f"row_tokens={row_tokens} cannot hold a prompt and its completion of {need} tokens")
    cost = lambda R, T: R * T * (1.0 + attention_cost * T)  # noqa: E731
    found, T = [], row_tokens or need
    while T <= (row_tokens or max(row_bucket(max_row_tokens), need)):
        if found and cost(1, T) * unique / T >= (1 + NEAR) * min(cost(R, T) for _, R, T in found):
            break  # no layout of rows this long comes near the best
        R = rows or row_multiple * rows_bucket(math.ceil(unique / (row_multiple * T)))
        pieces = _fill(P, L, R, T)
        while pieces is None and rows is None:
            R = row_multiple * rows_bucket(R // row_multiple + 1)
            pieces = _fill(P, L, R, T)
        if pieces is not None:
            found.append((pieces, R, T))
        T = row_bucket(T + 1)
    if not found:
        raise ValueError(f"{len(P)} groups ({unique} tokens) do not fit {rows} rows of {row_tokens or 'any'} tokens")
    # Of the layouts within NEAR of the cheapest, the fewest rows, then the shortest: steps of similar
    # lengths then share a few shapes (programs) instead of each finding its own optimum.
    least = min(cost(R, T) for _, R, T in found)
    return _finish(*min((f for f in found if cost(f[1], f[2]) <= (1 + NEAR) * least), key=lambda f: (f[1], f[2])),
                   P, L, shards, slots)


def _finish(pieces: list, R: int, T: int, P: np.ndarray, L: np.ndarray, shards: int, slots: int | None) -> Plan:
    """The plan of filled rows, reordered so that each of the `shards` blocks of R / shards rows
    gets about the same real tokens (largest row first to the lightest shard with room), heaviest
    rows first within a block (micro-batches take rows k, k + n, ...: round-robin over that order)."""
    G = L.shape[1]
    real = np.zeros(R, np.int64)
    for row, _, g, members in pieces:
        real[row] += P[g] + L[g, members].sum()
    per = R // shards if R % shards == 0 else R
    blocks, load = [[] for _ in range(R // per)], np.zeros(R // per, np.int64)
    for row in np.argsort(-real, kind="stable"):
        open_ = [b for b in range(len(blocks)) if len(blocks[b]) < per]
        b = min(open_, key=lambda b: (load[b], b))
        blocks[b].append(int(row))
        load[b] += real[row]
    new_row = np.empty(R, np.int64)
    new_row[[r for block in blocks for r in block]] = np.arange(R)

    n = P.size * G
    c_row, c_slot, c_start, c_piece = (np.zeros(n, np.int64) for _ in range(4))
    used = np.zeros(R, np.int64)
    for k, (row, offset, g, members) in enumerate(pieces):
        start = offset + P[g]
        for i in members:
            c = g * G + i
            c_row[c], c_slot[c], c_start[c], c_piece[c] = new_row[row], used[new_row[row]], start, k
            used[new_row[row]] += 1
            start += L[g, i]
    S = slot_bucket(max(int(used.max()), 1))
    if slots is not None:
        if slots < S:
            raise ValueError(f"slots={slots} per row; a row holds {int(used.max())} completions")
        S = slots
    return Plan(R, T, S, piece_row=new_row[[p[0] for p in pieces]], piece_offset=np.asarray([p[1] for p in pieces]),
                piece_group=np.asarray([p[2] for p in pieces]), completion_row=c_row, completion_slot=c_slot,
                completion_start=c_start, completion_piece=c_piece, prompt_lengths=P, completion_lengths=L.reshape(-1))


def layout(plan_: Plan, prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray], completion_tokens: int,
           pad_id: int = 0) -> dict[str, np.ndarray]:
    """The packed arrays of `plan_` (module docstring) from each group's prompt tokens and each
    completion's tokens (real tokens only, no padding), completions cut to `completion_tokens` (C)."""
    R, T = plan_.rows, plan_.row_tokens
    out = {"tokens": np.full((R, T), pad_id, np.int32), "positions": np.zeros((R, T), np.int32),
           "pieces": np.zeros((R, T), np.int32), "members": np.zeros((R, T), np.int32),
           "sources": np.tile(np.arange(T, dtype=np.int32), (R, 1))}
    piece_in_row = np.zeros(R, np.int64)
    piece_id = np.zeros(len(plan_.piece_row), np.int64)
    for k, (row, offset, g) in enumerate(zip(plan_.piece_row, plan_.piece_offset, plan_.piece_group)):
        piece_in_row[row] += 1
        piece_id[k] = piece_in_row[row]
        p = np.asarray(prompts[g])
        out["tokens"][row, offset:offset + len(p)] = p
        out["positions"][row, offset:offset + len(p)] = np.arange(len(p))
        out["pieces"][row, offset:offset + len(p)] = piece_id[k]
    member = np.zeros(len(plan_.piece_row), np.int64)
    for c, (row, start, k) in enumerate(zip(plan_.completion_row, plan_.completion_start, plan_.completion_piece)):
        toks = np.asarray(completions[c])
        n = len(toks)
        if n != plan_.completion_lengths[c] or n > completion_tokens:
            raise ValueError(f"completion {c} has {n} tokens; the plan holds {plan_.completion_lengths[c]} and "
                             f"the batch {completion_tokens} per completion")
        member[k] += 1
        L = plan_.prompt_lengths[plan_.piece_group[k]]
        span = slice(start, start + n)
        out["tokens"][row, span] = toks
        out["positions"][row, span] = L + np.arange(n)
        out["pieces"][row, span] = piece_id[k]
        out["members"][row, span] = member[k]
        out["sources"][row, span] = np.arange(start - 1, start + n - 1)
        out["sources"][row, start] = plan_.piece_offset[k] + L - 1  # the prompt's last token predicts the first
    C = completion_tokens
    out["slot_start"] = plan_.to_slots(plan_.completion_start.astype(np.int32))
    out["completion_mask"] = plan_.to_slots(np.arange(C)[None, :] < plan_.completion_lengths[:, None], False)
    out["completion_valid"] = plan_.to_slots(np.ones(len(plan_.completion_row), bool), False)
    return out


def from_padded(batch: dict[str, np.ndarray], num_generations: int, *, pad_id: int = 0,
                **plan_kwargs) -> tuple[dict[str, np.ndarray], Plan]:
    """The packed batch of a padded one (objective's layout, on the host: prompt_ids and prompt_mask
    [N, P] left-padded with the G rows of a group adjacent and equal, completion_ids and
    completion_mask [N, C] right-padded, and any per-completion arrays [N] or [N, C]), and its plan
    (`plan`'s keyword arguments). Completion masks must be a prefix of each row (tokens up to EOS)."""
    G = num_generations
    ids, pmask = np.asarray(batch["prompt_ids"]), np.asarray(batch["prompt_mask"]).astype(bool)
    cids, cmask = np.asarray(batch["completion_ids"]), np.asarray(batch["completion_mask"]).astype(bool)
    N, C = cids.shape
    if N % G:
        raise ValueError(f"{N} completions do not split into groups of num_generations={G}")
    first = ids[::G], pmask[::G]
    if not ((ids == np.repeat(first[0], G, 0)) | ~pmask).all() or not (pmask == np.repeat(first[1], G, 0)).all():
        raise ValueError(f"the {G} completions of a group must share its prompt (rows g * G ... g * G + G - 1)")
    lengths = cmask.sum(axis=1)
    if (cmask != (np.arange(C)[None] < lengths[:, None])).any():
        raise ValueError("completion_mask must be 1 on a prefix of each row (the tokens up to EOS), then 0")
    prompts = [p[m] for p, m in zip(*first)]
    pl = plan([len(p) for p in prompts], lengths, G, **plan_kwargs)
    out = layout(pl, prompts, [c[:n] for c, n in zip(cids, lengths)], C, pad_id)
    for k, v in batch.items():
        if k not in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask") and v is not None:
            out[k] = pl.to_slots(np.asarray(v))
    return out, pl
