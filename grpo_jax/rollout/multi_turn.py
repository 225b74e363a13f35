"""Multi-turn rollouts with tools: token in, token out, each row's KV cache kept across its calls.

A row decodes as in `sampler.decode` until it ends a turn: the end of a tool call (the format's
`call_end`, e.g. </call>) or EOS. It is then parked, like a finished row that keeps its cache:
it draws nothing while the host parses its turn and runs the call on a thread pool, and the other
rows keep decoding. At the host's next return the row gets the observation (the template's boundary
tokens around the tool's result, tokenised on their own) as forced tokens: they run through the
decode loop into the row's own cache at its current length, with no log-probability and mask 0 in
the loss, and the row samples again after the last one. The history is never prefilled again, and
the sequence is assembled from token ids only: what the trainer reads is exactly what was sampled
and fed, which the host checks after every episode (`prefix_violations`, expected 0).

    runner = multi_turn.ToolRunner(toolbox, tool_formats.get("qwen"), tokenizer, budgets)
    rollout, stats = multi_turn.sample(params, model_cfg, prompts, G, sampling, key, runner)
    rollout.sampled           # [N, T] True on the tokens the policy drew (the loss's tokens)

Determinism: a token's random draw depends on (key, row, its position in the completion) only, and a
row parked at decode step s resumes at step s + `resume_after_steps` (waiting for its call there if
it has not finished): the other rows decode meanwhile, and nothing depends on when a call returns.
With deterministic tools a rollout is reproducible, whatever the tools' timing. The setting trades
a parked row's idle steps against waiting: about the tools' latency over a decode step's time.

A turn may hold several calls (formats that park at the turn's end: qwen, mistral); they run
concurrently and their results come back in one observation. Tools with state are an
`tools.Environment`: an instance per episode, reset from the episode's dataset row, its calls run in
order; the reward functions read its final `state()` and the episode's calls (`Stats.columns`).

Budgets (`Budgets`): turns per episode (a pause is a turn), calls per turn, observation tokens per
call (cut in the middle, saying so), the episode's tokens (model + observations:
sampling.max_new_tokens), and deadlines per call and for an episode's tools in all. An episode that
runs out of turns or tokens ends truncated; calls past a budget are answered with an error.

On several hosts each runs the calls of its own rows (its prompts' episodes); every host reads every
row's turns and makes the same decisions, and observations are shared with one all-gather when rows
resume, so a rollout equals one host's (tested with two processes).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grpo_jax.models import architecture
from grpo_jax.models import transformer
from grpo_jax.parallel import multihost
from grpo_jax.rollout import sampler
from grpo_jax.rollout import tool_formats
from grpo_jax.rollout import tools

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Budgets:
    max_turns: int = 4  # pauses per episode (calls, malformed calls and the final answer's end)
    max_calls_per_turn: int = 4  # the rest of a turn's calls are answered with an error, not run
    max_observation_tokens: int = 64  # of a tool's result; longer ones are cut in the middle
    call_timeout_s: float = 10.0
    episode_tool_s: float = 60.0  # an episode's calls in all; later calls are answered with an error
    resume_after_steps: int = 8  # a parked row takes its observation this many decode steps later

    def __post_init__(self):
        for name in ("max_turns", "max_calls_per_turn", "max_observation_tokens", "resume_after_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"tools.{name}={getattr(self, name)}; expected >= 1")
        for name in ("call_timeout_s", "episode_tool_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"tools.{name}={getattr(self, name)}; expected > 0")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EpisodeState:
    """The rows being decoded (sampler.DecodeState, with what multi-turn adds)."""

    RESULTS: ClassVar[tuple[str, ...]] = ("tokens", "logps", "lengths", "done", "sampled")

    cache: architecture.Cache
    logits: Array  # [n, V] float32
    rows: Array  # [n] int32: each row's index in the rollout
    step: Array  # [] int32: decode steps run (a parked row skips steps: its column is `lengths`)
    tokens: Array  # [n, T] int32
    logps: Array  # [n, T] float32, 0 on observation tokens
    lengths: Array  # [n] int32: tokens so far, observations included
    done: Array  # [n] bool: the episode has ended
    sampled: Array  # [n, T] bool: the policy drew this token (False on observation tokens)
    paused: Array  # [n] bool: parked at the end of a turn, waiting for the host
    reported: Array  # [n] bool: the host has read the pause
    forced: Array  # [n, F] int32: observation tokens to feed
    forced_n: Array  # [n] int32
    forced_at: Array  # [n] int32


def episode_state(cache: architecture.Cache, first_logits: Array, sampling: sampler.SamplingConfig,
                  forced_slots: int) -> EpisodeState:
    N, T = first_logits.shape[0], sampling.max_new_tokens
    zeros = lambda: jnp.zeros((N,), jnp.int32)  # one buffer each: the state is donated
    return EpisodeState(
        cache=cache, logits=first_logits, rows=jnp.arange(N, dtype=jnp.int32), step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((N, T), sampling.pad_id, jnp.int32), logps=jnp.zeros((N, T), jnp.float32),
        lengths=zeros(), done=jnp.zeros((N,), bool), sampled=jnp.zeros((N, T), bool), paused=jnp.zeros((N,), bool),
        reported=jnp.zeros((N,), bool), forced=jnp.zeros((N, forced_slots), jnp.int32), forced_n=zeros(),
        forced_at=zeros())


def _draw(state: EpisodeState, key: Array, sampling: sampler.SamplingConfig,
          call_end: tuple[int, ...]) -> tuple[EpisodeState, Array, Array]:
    """Each active row's next token: its next observation token while it has one, else a draw
    (keyed by its row and column, as single-turn draws are: the same rollout when no row calls).
    Written at the row's own column (elementwise, so rows stay on their devices)."""
    T, F = sampling.max_new_tokens, state.forced.shape[1]
    eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)
    keys = jax.vmap(lambda r, c: jax.random.fold_in(jax.random.fold_in(key, r), c))(state.rows, state.lengths)
    tok, lp = sampler.choose_tokens(keys, state.logits, sampling)
    active = ~state.done & ~state.paused
    feeding = state.forced_at < state.forced_n
    fed = jnp.take_along_axis(state.forced, jnp.minimum(state.forced_at, F - 1)[:, None], axis=1)[:, 0]
    tok = jnp.where(active, jnp.where(feeding, fed, tok), sampling.pad_id)
    lp = jnp.where(active & ~feeding, lp, 0.0)
    drawn = active & ~feeding
    at = (jnp.arange(T)[None, :] == state.lengths[:, None]) & active[:, None]  # [n, T]: this token's column
    tokens = jnp.where(at, tok[:, None], state.tokens)
    lengths = state.lengths + active.astype(jnp.int32)
    ends = drawn & jnp.isin(tok, eos)
    if call_end:
        k = len(call_end)
        last = jnp.take_along_axis(tokens, jnp.clip(lengths[:, None] - k + jnp.arange(k)[None], 0, T - 1), axis=1)
        ends |= drawn & (lengths >= k) & jnp.all(last == jnp.asarray(call_end, jnp.int32)[None], axis=1)
    state = dataclasses.replace(
        state, step=state.step + 1, tokens=tokens, logps=jnp.where(at, lp[:, None], state.logps),
        sampled=state.sampled | (at & drawn[:, None]), lengths=lengths,
        forced_at=state.forced_at + (active & feeding).astype(jnp.int32),
        paused=state.paused | ends, done=state.done | ((lengths >= T) & ~ends))
    return state, tok, active


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "kv_len", "mesh", "call_end"), donate_argnames=("state",))
def episode_steps(params, state: EpisodeState, key: Array, stop_step: Array, stop_live: Array, *,
                  cfg: architecture.ModelConfig, sampling: sampler.SamplingConfig, kv_len: int,
                  mesh: Mesh | None = None, call_end: tuple[int, ...] = ()) -> tuple[EpisodeState, Array, Array]:
    """sampler.decode_steps for episodes: step while step < stop_step, some row shard holds more
    than stop_live live rows, no pause is unread by the host, and some row is active."""
    shards = sampler._row_shards(state.rows.shape[0], mesh)

    def body(s):
        s, tok, active = _draw(s, key, sampling, call_end)
        logits, cache = transformer.forward(params, cfg, tok[:, None], active[:, None], s.cache, mesh=mesh,
                                            pin_weights=False, kv_len=kv_len)
        return sampler._constrain_state(dataclasses.replace(s, cache=cache, logits=logits[:, -1]), cfg, mesh)

    live = lambda s: jnp.sum(~s.done.reshape(shards, -1), axis=1, dtype=jnp.int32)  # [shards]
    cond = lambda s: ((s.step < stop_step) & (jnp.max(live(s)) > stop_live) & ~jnp.any(s.paused & ~s.reported)
                      & jnp.any(~s.done & ~s.paused))
    state = jax.lax.while_loop(cond, body, state)
    return state, jnp.sum(live(state)), jnp.max(live(state))


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"), donate_argnames=("state",))
def _resume(state: EpisodeState, seen: Array, finish: Array, feed: Array, forced: Array, forced_n: Array, *,
            cfg: architecture.ModelConfig, mesh: Mesh | None = None) -> EpisodeState:
    """The host's answers, per batch row ([n] masks, elementwise): `seen` pauses are read; `finish`
    episodes end; `feed` rows get observation tokens forced[n, F] (forced_n of them) and decode again."""
    state = dataclasses.replace(
        state, done=state.done | finish, paused=state.paused & ~finish & ~feed,
        reported=(state.reported | seen) & ~feed, forced=jnp.where(feed[:, None], forced, state.forced),
        forced_n=jnp.where(feed, forced_n, state.forced_n), forced_at=jnp.where(feed, 0, state.forced_at))
    return sampler._constrain_state(state, cfg, mesh)


# --------------------------------------------------------------------------------------------------
# The host: turns, calls and observations


@dataclasses.dataclass
class Stats:
    """Per episode ([N] arrays) and per tool: what the rollout's episodes did."""

    turns: np.ndarray  # pauses (calls, malformed calls, the final answer's end)
    calls: np.ndarray  # tool calls run
    errors: np.ndarray  # calls that failed (malformed, unknown tool, exception, timeout)
    observation_tokens: np.ndarray
    truncated: np.ndarray  # bool: ended by a budget, not by an answer
    void: np.ndarray  # bool: the last turn has neither a call nor an answer (ToolRunner.answers)
    prefix_violations: int  # episodes whose final ids differ from the ids sampled and fed (expected 0)
    by_tool: dict[str, dict[str, float]]  # name -> {"calls", "errors", "timeouts", "seconds"}
    tool_seconds: float  # summed over calls (they overlap each other and decode)
    decode_steps: int
    prefill_tokens: int  # tokens run through the model that were not drawn: prompts + observations
    # Per episode: its calls [{"name", "arguments", "result", "error"}] and its environment's final
    # state() (None without one): what reward functions read (`columns`).
    trajectories: list[list[dict]] = dataclasses.field(default_factory=list)
    states: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0  # the rollout's wall time

    def columns(self) -> dict[str, list]:
        """The reward functions' keyword columns, one value per episode."""
        return {"tool_calls": self.trajectories, "environment": self.states}

    def take(self, start: int, stop: int) -> Stats:
        """Episodes [start, stop) (this host's rows, without the rows added for the mesh)."""
        per_episode = ("turns", "calls", "errors", "observation_tokens", "truncated", "void", "trajectories", "states")
        return dataclasses.replace(self, **{k: getattr(self, k)[start:stop] for k in per_episode})


class ToolRunner:
    """Turns of a rollout's rows: parses each parked turn, runs its call, and makes the observation ids."""

    def __init__(self, toolbox: tools.ToolBox, fmt: tool_formats.Format, tokenizer: Any,
                 budgets: Budgets = Budgets(), environment: type[tools.Environment] | None = None,
                 answers: Callable[[str], bool] | None = None):
        self.toolbox, self.format, self.tokenizer, self.budgets = toolbox, fmt, tokenizer, budgets
        self.environment = environment  # a fresh instance per episode
        # Whether a final turn's text states an answer: an episode whose last turn has neither a call
        # nor an answer is void (SimpleTIR, Xue et al. 2025), `Stats.void`; None: none is.
        self.answers = answers
        self.last: Stats | None = None  # the latest rollout's (Policy.rollout keeps it here)
        enc = lambda text: list(tokenizer.encode(text, add_special_tokens=False)) if text else []
        self.encode = enc
        self.call_end = tuple(enc(fmt.call_end))
        self.opens, self.between, self.closes = enc(fmt.opens), enc(fmt.between), enc(fmt.closes)
        self.cut = lambda n: enc(f" [... {n} tokens cut ...] ")
        k = budgets.max_calls_per_turn + 1  # and one result saying that the turn had more
        self.forced_slots = len(self.opens) + len(self.closes) + k * budgets.max_observation_tokens + (k - 1) * len(self.between)

    def schemas(self) -> list[dict]:
        """Every tool's schema: the toolbox's, then the environment's (from an instance not reset)."""
        return self.toolbox.schemas() + ([t.schema() for t in self.environment().tools().values()]
                                         if self.environment else [])

    def observation(self, results: Sequence[str], room: int) -> list[int] | None:
        """The ids of a turn's results in the format's boundaries, each result cut in the middle to
        max_observation_tokens and all of them to `room` tokens (short results whole, the room left
        shared evenly by the longer ones); None when not even the boundaries fit."""
        room = min(room, self.forced_slots)
        fixed = len(self.opens) + len(self.closes) + (len(results) - 1) * len(self.between)
        if room < fixed:
            return None
        ids = [self.encode(self.format.escape(r)) for r in results]
        limits, left = [0] * len(ids), room - fixed
        for k, i in enumerate(sorted(range(len(ids)), key=lambda i: len(ids[i]))):
            limits[i] = min(len(ids[i]), self.budgets.max_observation_tokens, left // (len(ids) - k))
            left -= limits[i]
        return self.format.observation_ids(self.encode, [self._cut(r, n) for r, n in zip(ids, limits)])

    def _cut(self, ids: list[int], limit: int) -> list[int]:
        if len(ids) <= limit:
            return ids
        cut = self.cut(len(ids) - limit)
        if limit < len(cut) + 2:  # no room to say so: the head only
            return ids[:limit]
        head = (limit - len(cut)) // 2
        return ids[:head] + cut + ids[len(ids) - (limit - len(cut) - head):]


class _Episodes:
    """The host's record of each row: where its turn began, its calls out, what it was fed."""

    def __init__(self, runner: ToolRunner, n: int, T: int, eos_ids: Sequence[int], rows: Sequence[dict] | None,
                 mine: np.ndarray):
        self.r, self.T, self.eos, self.mine = runner, T, set(eos_ids), mine  # mine: [n] this host runs its calls
        self.turn_start = np.zeros(n, np.int64)
        self.turns, self.calls, self.errors, self.obs = (np.zeros(n, np.int64) for _ in range(4))
        self.answered = np.zeros(n, bool)  # ended with a final answer (else a budget ended it)
        self.void = np.zeros(n, bool)  # ...whose turn states no answer (runner.answers)
        self.expected: list[list[int]] = [[] for _ in range(n)]  # ids sampled and fed, in order
        self.pending: dict[int, tuple[list, concurrent.futures.Future | None]] = {}  # row -> (calls, results)
        self.trajectories: list[list[dict]] = [[] for _ in range(n)]
        self.tool_s = np.zeros(n)  # each episode's time in its calls
        self.envs: list[tools.Environment | None] = [None] * n
        self.broken = np.zeros(n, bool)  # an environment call timed out (it may still be running)
        if runner.environment is not None:
            if rows is None or not len(rows):
                raise ValueError("a tools.environment needs the episodes' dataset rows (multi_turn.sample(rows=...))")
            first = int(np.argmax(mine))  # this host's episodes, its rows in order (rows added for the mesh: the last)
            for i in np.flatnonzero(mine):
                self.envs[i] = runner.environment()
                self.envs[i].reset(dict(rows[min(i - first, len(rows) - 1)]))
            self.bound = [env.tools() if env is not None else None for env in self.envs]
        # Every tool, called or not (a metric that comes and goes draws no curve).
        names = list(runner.toolbox.tools) + (runner.environment.tool_names() if runner.environment else [])
        self.by_tool = {name: {"calls": 0, "errors": 0, "timeouts": 0, "seconds": 0.0} for name in names}

    def read_turn(self, row: int, ids: np.ndarray, length: int) -> bool:
        """A parked row's turn (its ids up to `length`): start its calls (False), or end the episode
        (True: a final answer, or no room or turn left for the results)."""
        turn = [int(t) for t in ids[self.turn_start[row]:length]]
        self.expected[row] += turn
        self.turns[row] += 1
        ended = bool(turn) and turn[-1] in self.eos
        text = self.r.tokenizer.decode(turn, skip_special_tokens=False)
        calls = self.r.format.calls(text)
        if not calls and ended:  # a final answer
            self.answered[row] = True
            self.void[row] = self.r.answers is not None and not self.r.answers(text)
            return True
        if length >= self.T or self.turns[row] >= self.r.budgets.max_turns:
            return True  # truncated: no room or no turn left for the results
        b = self.r.budgets
        # (call or None, why it is not run or None): malformed calls, calls past the turn's budget,
        # and every call once the episode's tool time is spent or its environment timed out.
        left = b.episode_tool_s - self.tool_s[row]
        refused = (f"the episode's {b.episode_tool_s:g} s of tool time are spent" if left <= 0 else
                   "the environment's state is unknown after a call timed out" if self.broken[row] else "")
        calls = calls or [f"error: no tool call before {self.r.format.call_end or 'the end of the turn'}"]
        entries = [(None, c) if isinstance(c, str) else (c, f"error: {c.name} not run: {refused}" if refused else None)
                   for c in calls[:b.max_calls_per_turn]]
        if len(calls) > b.max_calls_per_turn:  # one result says so (the observation has room for one more)
            entries.append((None, f"error: at most {b.max_calls_per_turn} calls a turn; the other "
                                  f"{len(calls) - b.max_calls_per_turn} were not run"))
        run = [(c.name, c.arguments) for c, why in entries if why is None]
        self.calls[row] += len(run)
        self.errors[row] += len(entries) - len(run)
        future = self.r.toolbox.submit_turn(run, min(b.call_timeout_s, left), self.bound[row] if self.envs[row] else None) \
            if run and self.mine[row] else None  # another host runs the calls of its own rows
        self.pending[row] = (entries, future)
        return False

    def answer(self, row: int, length: int) -> list[int] | None:
        """The observation ids of one of this host's rows whose calls were started (waiting for
        them); None: the episode ends (no room for the results). `fed` records them."""
        entries, future = self.pending.pop(row)
        ran = iter(future.result() if future is not None else [])
        texts = []
        for call, why in entries:
            result = next(ran) if why is None else None
            texts.append(why if result is None else result.text)
            self.trajectories[row].append({"name": call and call.name, "arguments": call and call.arguments,
                                           "result": texts[-1], "error": result is None or result.error})
            if result is not None:
                t = self.by_tool.setdefault(result.tool, {"calls": 0, "errors": 0, "timeouts": 0, "seconds": 0.0})
                t["calls"] += 1
                t["errors"] += result.error
                t["timeouts"] += result.timed_out
                t["seconds"] += result.seconds
                self.errors[row] += result.error
                self.tool_s[row] += result.seconds
                self.broken[row] |= result.timed_out and self.envs[row] is not None
        return self.r.observation(texts, self.T - length - 1)  # a token left to answer

    def fed(self, row: int, length: int, ids: list[int]) -> None:
        """Row `row` (any host's) takes the observation `ids` at `length`."""
        self.pending.pop(row, None)
        self.expected[row] += ids
        self.obs[row] += len(ids)
        self.turn_start[row] = length + len(ids)

    def states(self) -> list:
        return [env.state() if env is not None else None for env in self.envs]


_rows_of = jax.jit(lambda x, i: x[i])
# What the host reads after each run of decode steps: [n, 5] in one transfer (one gather on several hosts).
_flags = jax.jit(lambda s: jnp.stack([s.rows, s.paused, s.reported, s.done, s.lengths], axis=1).astype(jnp.int32))


def _on_rows(x: np.ndarray, like: Array) -> Array | np.ndarray:
    """A host array every host holds whole, as a device array laid out like `like`'s rows (on
    several hosts a jitted function takes global arrays only)."""
    if jax.process_count() == 1:
        return x
    return jax.make_array_from_callback(x.shape, like.sharding if x.ndim == 1 else
                                        jax.sharding.NamedSharding(like.sharding.mesh, jax.sharding.PartitionSpec(
                                            like.sharding.spec[0] if like.sharding.spec else None, None)),
                                        lambda idx: x[idx])


def _share(due: list[int], answers: dict[int, list[int] | None], width: int) -> dict[int, list[int] | None]:
    """Every host's observations of the rows due (each host answers its own rows): on one host the
    answers as they are; on several, one all-gather of [rows, 2 + width] (status, count, ids)."""
    if jax.process_count() == 1:
        return answers
    from jax.experimental import multihost_utils

    mine = np.zeros((len(due), 2 + width), np.int32)
    for k, row in enumerate(due):
        if row in answers:
            ids = answers[row]
            mine[k, :2] = (2, 0) if ids is None else (1, len(ids))
            mine[k, 2:2 + len(ids or [])] = ids or []
    everyone = np.asarray(multihost_utils.process_allgather(mine)).sum(0)  # zeros from the rows' other hosts
    return {row: None if everyone[k, 0] == 2 else everyone[k, 2:2 + everyone[k, 1]].tolist()
            for k, row in enumerate(due)}


def decode(params, cache: architecture.Cache, first_logits: Array, key: Array, runner: ToolRunner, *,
           cfg: architecture.ModelConfig, sampling: sampler.SamplingConfig, mesh: Mesh | None = None,
           slots: int, rows: Sequence[dict] | None = None, mine: np.ndarray | None = None,
           ) -> tuple[sampler.Decoded, Array, Stats]:
    """sampler.decode for episodes: `slots` is the cache's room past the prompt (decode steps,
    parked ones included: `steps_needed`); `rows`: this host's episodes' dataset rows (an
    environment's reset); `mine` [N]: the rows whose calls this host runs (default: all).

    On several hosts every host reads every row's turns (the decisions to end or resume a row
    follow from its tokens, so all hosts make them alike), runs the calls of its own rows, and the
    observations are shared with one all-gather when rows resume. Returns the decoded rows, their
    sampled-token mask [N, T] and the episodes' stats (valid for this host's rows)."""
    N, T = first_logits.shape[0], sampling.max_new_tokens
    mine = np.ones(N, bool) if mine is None else mine
    S = cache["mask"].shape[1]
    shards = sampler._row_shards(N, mesh)
    sizes = sampler.batch_sizes(N, sampling.shrink_factor, shards)
    state = episode_state(cache, first_logits, sampling, runner.forced_slots)
    eps = _Episodes(runner, N, T, sampling.eos_ids, rows, mine)
    out, step, live, row_steps, batches = None, 0, N, 0, []
    waiting: dict[int, int] = {}  # parked row -> the step it resumes at
    while live and step < slots:
        n = state.rows.shape[0]
        end = next(e for e in sampler.segment_ends(slots, sampling.first_segment) if e > step)
        stop = min(end, *waiting.values()) if waiting else end
        smaller = [s for s in sizes if s < n][:1] if not waiting else []  # parked rows keep the batch whole
        state, live, most = episode_steps(params, state, key, jnp.int32(stop), jnp.int32(smaller[0] // shards if smaller else 0),
                                          cfg=cfg, sampling=sampling, kv_len=S - slots + end, mesh=mesh,
                                          call_end=runner.call_end)
        flags = multihost.all_rows(_flags(state))
        rows_at, paused, reported, done, lengths = flags.T
        paused, reported, done = paused.astype(bool), reported.astype(bool), done.astype(bool)
        new_step, live, most = int(state.step), int(live), int(most)
        row_steps += n * (new_step - step)
        batches.append((n, S - slots + end, new_step - step))
        step = new_step
        position = {int(r): i for i, r in enumerate(rows_at)}
        seen, finish, feed = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        forced, forced_n = np.zeros((n, runner.forced_slots), np.int32), np.zeros(n, np.int32)
        new = np.flatnonzero(paused & ~reported)
        if len(new):  # turns just ended: start their calls, or end their episodes
            # Their rows only, gathered in a power-of-two count (a program per size, not per count).
            take = np.resize(new, 1 << (len(new) - 1).bit_length())
            ids = multihost.all_rows(_rows_of(state.tokens, take.astype(np.int32)))
            for j, i in enumerate(new):
                row = int(rows_at[i])
                seen[i] = True
                if eps.read_turn(row, ids[j], int(lengths[i])):
                    finish[i] = True
                else:
                    waiting[row] = step + runner.budgets.resume_after_steps
        # Rows due now get their observations (waiting for their calls if need be); when no row is
        # left to decode, the next ones due resume at once (decode steps would only idle).
        due = [r for r, at in waiting.items() if at <= step]
        if not due and waiting and not (~done & ~paused).any():
            first = min(waiting.values())
            due = [r for r, at in waiting.items() if at == first]
        answers = _share(due, {row: eps.answer(row, int(lengths[position[row]])) for row in due if mine[row]},
                         runner.forced_slots)
        for row in due:
            del waiting[row]
            i, ids = position[row], answers[row]
            if ids is None:
                eps.pending.pop(row, None)
                finish[i] = True
            else:
                eps.fed(row, int(lengths[i]), ids)
                feed[i], forced_n[i], forced[i, :len(ids)] = True, len(ids), ids
        if seen.any() or finish.any() or feed.any():
            host = [_on_rows(x, state.lengths) for x in (seen, finish, feed, forced, forced_n)]
            state = _resume(state, *host, cfg=cfg, mesh=mesh)
            live -= int(finish.sum())
            most = int((~(done | finish)).reshape(shards, -1).sum(axis=1).max())
        if smaller and 0 < most <= smaller[0] // shards and not waiting:  # (waiting: new pauses)
            size = min(s for s in sizes if s >= most * shards)
            state, out = sampler._shrink(state, out, cfg=cfg, size=size, mesh=mesh)
    if out is not None:
        out = sampler._store_jit(state, out, shards)
        state = dataclasses.replace(state, **out)
    truncated = ~eps.answered
    tokens = multihost.all_rows(state.tokens)
    # Every row's ids must be what the host read and fed, in order: the trainer reads these.
    violations = sum(list(tokens[r, :len(e)]) != e for r, e in enumerate(eps.expected))
    tool_seconds = sum(t["seconds"] for t in eps.by_tool.values())
    stats = Stats(eps.turns, eps.calls, eps.errors, eps.obs, truncated, eps.void, int(violations), eps.by_tool,
                  tool_seconds, step, int(eps.obs.sum()), eps.trajectories, eps.states())
    decoded = sampler.Decoded(state.tokens, state.logps, state.lengths, _on_rows(~truncated, state.lengths)
                              if jax.process_count() > 1 else ~jnp.asarray(truncated), row_steps, tuple(batches))
    return decoded, state.sampled, stats


def metrics(parts: Sequence[Stats]) -> dict[str, float]:
    """A step's episode metrics (every round of its rollouts): turns, calls, errors and timeouts
    by tool, the model's and the observations' tokens, time in tools against the rollouts' own."""
    if not parts:
        return {}
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts]).astype(np.float64)
    out = {"tools/turns_mean": cat("turns").mean(), "tools/calls_mean": cat("calls").mean(),
           "tools/errors": cat("errors").sum(), "tools/observation_tokens_mean": cat("observation_tokens").mean(),
           "tools/frac_truncated": cat("truncated").mean(), "tools/frac_void": cat("void").mean(),
           "tools/prefix_violations": float(sum(p.prefix_violations for p in parts)),
           "tools/seconds": sum(p.tool_seconds for p in parts), "tools/rollout_s": sum(p.seconds for p in parts)}
    for p in parts:
        for name, t in p.by_tool.items():
            for k in ("calls", "errors", "timeouts"):
                out[f"tools/{name}/{k}"] = out.get(f"tools/{name}/{k}", 0.0) + t[k]
    return out


def steps_needed(sampling: sampler.SamplingConfig, budgets: Budgets) -> int:
    """Decode steps an episode may take: its tokens, and resume_after_steps parked per turn."""
    return sampling.max_new_tokens + budgets.max_turns * budgets.resume_after_steps


def sample(params: architecture.Params, model_cfg: architecture.ModelConfig, prompts: Sequence[Sequence[int]],
           num_generations: int, cfg: sampler.SamplingConfig, key: Array, runner: ToolRunner,
           mesh: Mesh | None = None, gather_weights: bool = True,
           rows: Sequence[dict] | None = None) -> tuple[sampler.Rollout, Stats]:
    """sampler.sample with tools: `num_generations` episodes of each prompt (`rows`: the prompts'
    dataset rows, which an environment needs). The Rollout's `mask` covers every token of an
    episode (what attention reads), `sampled` the policy's own (what the loss reads); `truncated`
    marks episodes ended by a budget."""
    start = time.perf_counter()
    ids, mask, n = sampler.prompt_batch(prompts, num_generations, cfg, mesh)
    if gather_weights:
        params, model_cfg = sampler.inference_params(params, model_cfg, mesh)
    slots = steps_needed(cfg, runner.budgets)
    logits, cache = sampler.prefill(params, ids, mask, cfg=model_cfg, num_generations=num_generations,
                                    max_new_tokens=slots, mesh=mesh, gather_weights=False)
    episode_rows = None if rows is None else [r for r in rows for _ in range(num_generations)]
    # This host's episodes: its block of the rollout's rows (and the rows added for the mesh, on the last).
    hosts, host = jax.process_count(), jax.process_index()
    per_host = n // hosts
    mine = np.minimum(np.arange(ids.shape[0] * num_generations) // per_host, hosts - 1) == host
    out, sampled, stats = decode(params, cache, logits, key, runner, cfg=model_cfg, sampling=cfg, mesh=mesh,
                                 slots=slots, rows=episode_rows, mine=mine)
    stats.prefill_tokens += int(multihost.all_rows(mask).sum())
    T = cfg.max_new_tokens
    rollout = sampler.Rollout(
        prompt_ids=jnp.repeat(ids, num_generations, axis=0), prompt_mask=jnp.repeat(mask, num_generations, axis=0),
        tokens=out.tokens, mask=jnp.arange(T)[None, :] < out.lengths[:, None], logprobs=out.logps,
        lengths=out.lengths, truncated=~out.done, sampled=sampled)
    stats.seconds = time.perf_counter() - start
    stats = stats.take(host * per_host, (host + 1) * per_host)
    return (rollout if len(out.lengths) == n else jax.tree.map(lambda x: x[:n], rollout)), stats
