"""Group rollouts: G sampled completions per prompt with a KV cache, and their log-probabilities.

    rollout = sample(params, model_cfg, prompts, num_generations=8, cfg=SamplingConfig(...), key=key)

One jitted prefill runs each prompt once and copies its cache rows to its G samples; `decode` then
generates until every row has stopped or `max_new_tokens` is reached, at a cost that follows the
tokens generated: its steps attend over the filled prefix of the cache only (segments of static
lengths), and finished rows leave the batch (the live ones move, with their cache rows, to a smaller
batch of a few static sizes), each row drawing from its own random stream so that its completion
does not depend on the batch it runs in. Prompts are left-padded to a bucket length so that varying
prompt lengths reuse a few compiled programs, and the prefill computes logits for the last position only
(float32 logits of every prompt position would be [B, P, vocab], 4 B P V bytes).

Sampling reads the weights once per token, so they should be local and in the compute dtype:
`inference_params` makes that copy (split over tensor only, whole on every data and fsdp device, cast
from float32 master weights to bfloat16) once per rollout. The training layout would all-gather every
layer's weights over fsdp at every decoded token (the whole model's bytes per token step).

Each sampled token's log-probability is log softmax(logits / temperature)[token]: the same quantity
`logprobs.completion_logprobs` computes in the trainer (top-k / top-p only restrict which tokens can be
drawn; they do not renormalise the reported log-probability), so the two can be compared token for
token to catch sampler/trainer mismatch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grpo_jax.models import architecture
from grpo_jax.models import layers
from grpo_jax.models import placement
from grpo_jax.models import transformer
from grpo_jax.parallel import partitioning

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample (hashable: a static argument of jit).

    Attributes:
      max_new_tokens: completion length limit.
      temperature: logits are divided by it (also for the reported log-probabilities).
      top_k: keep the k most likely tokens; 0 disables.
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p; 1 disables.
        With top_k, within the top-k tokens, renormalised (as transformers' and vLLM's samplers
        chain them); alone, within the `top_p_candidates` most likely tokens (a nucleus that needs
        more is cut there), so no step sorts the whole vocabulary.
      top_p_candidates: the candidate cap of top-p without top-k.
      first_segment: decode's first segment of steps (`segment_ends`: each next one is twice as long);
        its steps attend over prompt + first_segment cache slots. >= max_new_tokens: one segment,
        every step reads the whole cache.
      shrink_factor: finished rows leave the decode batch: once the live rows fit a batch about this
        many times smaller (`batch_sizes`), they move to it with their cache rows; 1 keeps the batch
        whole. Completions do not depend on it. Each batch size met compiles its own programs (once
        per run): 2 meets about half as many sizes as 1.5, at ~1.33 instead of ~1.15 computed
        row-steps per generated token under a long-tailed length distribution.
      greedy: take the argmax instead of sampling.
      eos_ids: token ids that end a completion (the EOS token is kept as its last token).
      pad_id: written after a completion has ended.
      prompt_buckets: prompt lengths are padded up to the smallest bucket that fits.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    top_p_candidates: int = 1024
    first_segment: int = 128
    shrink_factor: float = 1.5
    greedy: bool = False
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    prompt_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (use greedy=True for argmax)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.first_segment < 1:
            raise ValueError(f"first_segment={self.first_segment} must be >= 1")
        if not self.shrink_factor >= 1:
            raise ValueError(f"shrink_factor={self.shrink_factor} must be >= 1 (1 keeps the batch whole)")
        if self.top_p_candidates < 1:
            raise ValueError(f"top_p_candidates={self.top_p_candidates} must be >= 1")
        if not isinstance(self.pad_id, (int, np.integer)):
            raise ValueError(f"pad_id={self.pad_id!r} must be a token id (a tokenizer without a pad token "
                             "pads with an EOS id: config.sampling_config does that)")
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))
        object.__setattr__(self, "prompt_buckets", tuple(sorted(self.prompt_buckets)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rollout:
    """Completions of prompts * G rows; the G samples of a prompt are adjacent."""

    prompt_ids: Array  # [N, P] left-padded
    prompt_mask: Array  # [N, P] bool
    tokens: Array  # [N, max_new_tokens] int32, pad_id after the end
    mask: Array  # [N, max_new_tokens] bool, True on completion tokens (EOS included)
    logprobs: Array  # [N, max_new_tokens] float32, 0 after the end
    lengths: Array  # [N] int32
    truncated: Array  # [N] bool: no EOS within max_new_tokens
    # Multi-turn episodes (grpo_jax.rollout.multi_turn): [N, max_new_tokens] bool, True on the tokens
    # the policy drew, False on observation tokens (which `mask` covers: the model reads them).
    sampled: Array | None = None


# --------------------------------------------------------------------------------------------------
# Token choice


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Set logits outside the top-k / top-p (nucleus) set to -inf over the whole vocabulary
    (logits: [N, V] float32). The reference definition; the sampler draws from `_candidates`, which
    gives the same distribution without sorting the vocabulary."""
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep = before < top_p  # always keeps the first token
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _candidates(scaled: Array, cfg: SamplingConfig) -> tuple[Array, Array]:
    """The tokens top-k / top-p may draw: logits [N, K] (-inf where top-p drops one) and their ids
    [N, K], K = top_k (or top_p_candidates), from lax.top_k (sorted, most likely first).

    top-p keeps the tokens whose more likely predecessors hold less than top_p of the mass: of the
    top-k distribution renormalised when top_k is set, of the full one otherwise (the log-sum-exp of
    the whole vocabulary is one reduction, not a sort)."""
    V = scaled.shape[-1]
    k = min(cfg.top_k or cfg.top_p_candidates, V)
    vals, ids = jax.lax.top_k(scaled, k)
    if cfg.top_p < 1.0:
        total = jax.nn.logsumexp(vals if cfg.top_k else scaled, axis=-1, keepdims=True)
        probs = jnp.exp(vals - total)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely candidates
        vals = jnp.where(before < cfg.top_p, vals, -jnp.inf)  # the first always stays
    return vals, ids


def choose_tokens(keys: Array, logits: Array, cfg: SamplingConfig) -> tuple[Array, Array]:
    """Next tokens [N] and their log-probabilities [N] under softmax(logits / temperature), row i
    drawn with keys[i] (keys: [N])."""
    scaled = logits.astype(jnp.float32) / cfg.temperature
    draw = jax.vmap(jax.random.categorical)
    if cfg.greedy:
        tokens = jnp.argmax(scaled, axis=-1)
    elif cfg.top_k or cfg.top_p < 1.0:
        vals, ids = _candidates(scaled, cfg)
        tokens = jnp.take_along_axis(ids, draw(keys, vals)[:, None], axis=-1)[:, 0]
    else:
        tokens = draw(keys, scaled)
    logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), logp


# --------------------------------------------------------------------------------------------------
# Prompt padding


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"prompt of {n} tokens is longer than the largest prompt bucket {max(buckets)}; "
                     "add a bucket to SamplingConfig.prompt_buckets or shorten the prompt")


def completion_buckets(prompt_buckets: Sequence[int], max_tokens: int) -> tuple[int, ...]:
    """Completion lengths to pad (or trim) to: the prompt buckets below `max_tokens`, and `max_tokens`."""
    return tuple(sorted({b for b in prompt_buckets if b < max_tokens} | {max_tokens}))


def pad_prompts(prompts: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int = 0,
                min_length: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to the smallest bucket that fits the longest (and `min_length`):
    ids, mask [B, P]."""
    if not len(prompts) or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = bucket_length(max(min_length, *(len(p) for p in prompts)), buckets)
    ids = np.full((len(prompts), P), pad_id, np.int32)
    mask = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = p
        mask[i, P - len(p):] = True
    return ids, mask


# --------------------------------------------------------------------------------------------------
# Jitted stages


def inference_params(params: architecture.Params, cfg: architecture.ModelConfig, mesh: Mesh | None) -> tuple[architecture.Params, architecture.ModelConfig]:
    """The weights as sampling wants them: in the compute dtype (float32 master weights, bfloat16
    compute: the cast the forward pass would do at every use, done once) and, on a mesh, in the
    inference layout (partitioning.INFERENCE_RULES: split over tensor only). Returns the copy and
    the config to run it with (param_dtype = dtype); the copy gives the same logits as `params`."""
    if mesh is None or mesh.shape["fsdp"] == 1:  # already the layout sampling reads
        # Only the leaves not yet in the compute dtype are copied (a LoRA run's frozen base already is).
        return placement.cast(params, cfg.dtype), cfg.replace(param_dtype=cfg.dtype)
    copy = jax.jit(_sampling_weights, static_argnums=(1, 2, 3))(params, cfg, mesh, True)
    return copy, cfg.replace(param_dtype=cfg.dtype)


def _sampling_weights(params: architecture.Params, cfg: architecture.ModelConfig, mesh: Mesh | None, gather: bool) -> architecture.Params:
    """The weights in the compute dtype and the inference layout (`inference_params`' copy, and
    prefill's weights when called on others; a no-op for that copy). `gather=False` keeps them as
    they are."""
    if not gather:
        return params
    params = placement.cast(params, cfg.dtype)
    if mesh is None or mesh.size == 1:
        return params
    return jax.lax.with_sharding_constraint(params, placement.param_shardings(cfg, mesh, partitioning.INFERENCE_RULES))


def _cache_specs(cfg: architecture.ModelConfig, mesh: Mesh | None, n: int) -> dict[str, P]:
    batch = partitioning.row_axes(n, mesh)
    heads = "tensor" if mesh is not None and cfg.num_kv_heads % mesh.shape["tensor"] == 0 else None
    return {"k": P(None, batch, None, heads, None), "v": P(None, batch, None, heads, None),
            "mask": P(batch, None), "pos": P(batch), "index": P()}


@functools.partial(jax.jit, static_argnames=("cfg", "num_generations", "max_new_tokens", "mesh", "gather_weights"))
def prefill(params, prompt_ids, prompt_mask, *, cfg: architecture.ModelConfig, num_generations: int,
            max_new_tokens: int, mesh: Mesh | None = None, gather_weights: bool = True) -> tuple[Array, architecture.Cache]:
    """Run each prompt once, then give each of its G samples a copy of its cache.

    Returns last-position logits [B * G, V] and a cache with room for max_new_tokens more tokens.
    """
    params = _sampling_weights(params, cfg, mesh, gather_weights)
    B, Pn = prompt_ids.shape
    small = transformer.init_cache(cfg, B, Pn)
    hidden, small = transformer.forward(params, cfg, prompt_ids, prompt_mask, small, return_hidden=True, mesh=mesh,
                                  pin_weights=False)
    # Prompts are left-padded: the last position is every row's last real token.
    last = layers.logits_from_hidden(transformer.output_head(params, cfg), hidden[:, -1])  # [B, V] float32
    rep = lambda x, axis: jnp.repeat(x, num_generations, axis=axis)
    N, S = B * num_generations, Pn + max_new_tokens
    specs = _cache_specs(cfg, mesh, N)
    cache = transformer.init_cache(cfg, N, S)
    cache = {
        "k": jax.lax.dynamic_update_slice(cache["k"], rep(small["k"], 1), (0, 0, 0, 0, 0)),
        "v": jax.lax.dynamic_update_slice(cache["v"], rep(small["v"], 1), (0, 0, 0, 0, 0)),
        "mask": jax.lax.dynamic_update_slice(cache["mask"], rep(small["mask"], 0), (0, 0)),
        "pos": rep(small["pos"], 0),
        "index": small["index"],
    }
    cache = {k: partitioning.constrain(v, specs[k], mesh) for k, v in cache.items()}
    return rep(last, 0), cache


def segment_ends(max_new_tokens: int, first: int = 128) -> tuple[int, ...]:
    """Where decode's segments end: first, 2 x first, 4 x first, ... and max_new_tokens. Steps before
    end e attend over the prompt and e completion slots, so a step reads at most twice the filled
    cache (and the first `first` steps read first slots)."""
    ends, e = [], first
    while e < max_new_tokens:
        ends.append(e)
        e *= 2
    return (*ends, max_new_tokens)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The rows being decoded: all N of the rollout at first, fewer once finished rows leave."""

    cache: architecture.Cache  # n rows
    logits: Array  # [n, V] float32: each row's next-token logits
    rows: Array  # [n] int32: each row's index in the rollout (its random stream and its output row)
    step: Array  # [] int32: tokens drawn so far (every row is at the same step)
    tokens: Array  # [n, T] int32
    logps: Array  # [n, T] float32
    lengths: Array  # [n] int32
    done: Array  # [n] bool
    eos_at: Array  # [n] int32: the completion length at which EOS is forced (T + 1: a drawn EOS ends the row)


def decode_state(cache: architecture.Cache, first_logits: Array, sampling: SamplingConfig,
                 eos_at: Array | None = None) -> DecodeState:
    """Every row of a prefilled cache, before the first draw."""
    N, T = first_logits.shape[0], sampling.max_new_tokens
    return DecodeState(
        cache=cache, logits=first_logits, rows=jnp.arange(N, dtype=jnp.int32), step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((N, T), sampling.pad_id, jnp.int32), logps=jnp.zeros((N, T), jnp.float32),
        lengths=jnp.zeros((N,), jnp.int32), done=jnp.zeros((N,), bool),
        eos_at=jnp.full((N,), T + 1, jnp.int32) if eos_at is None else jnp.asarray(eos_at, jnp.int32))


def _state_shardings(state: DecodeState, cfg: architecture.ModelConfig, mesh: Mesh) -> DecodeState:
    """Where a decode state lives: rows split as the rollout's (when they divide), the cache as prefill made it."""
    n = state.rows.shape[0]
    specs, batch = _cache_specs(cfg, mesh, n), partitioning.row_axes(n, mesh)
    put = lambda spec: NamedSharding(mesh, spec)
    rows = jax.tree.map(lambda x: put(P(batch, *(None,) * (x.ndim - 1))), dataclasses.replace(state, cache={}, step=None))
    # The logits keep the vocabulary split the output head gives them (gathering them would move
    # [rows, vocab] floats per step).
    return dataclasses.replace(rows, cache={k: put(specs[k]) for k in state.cache}, step=put(P()),
                               logits=put(P(batch, P.UNCONSTRAINED)))


def _constrain_state(state: DecodeState, cfg: architecture.ModelConfig, mesh: Mesh | None) -> DecodeState:
    return state if mesh is None else jax.lax.with_sharding_constraint(state, _state_shardings(state, cfg, mesh))


def decode_program(params, cache: architecture.Cache, first_logits: Array, *, cfg: architecture.ModelConfig,
                   sampling: SamplingConfig, mesh: Mesh | None = None, kv_len: int | None = None) -> jax.stages.Lowered:
    """decode_steps lowered for every row of a prefilled cache (arrays or jax.ShapeDtypeStruct),
    attending over kv_len slots (default: all): the decode loop as tests and benchmarks read it."""
    state = jax.eval_shape(lambda c, l: decode_state(c, l, sampling), cache, first_logits)
    if mesh is not None:
        where = _state_shardings(state, cfg, mesh)
        where.logits = NamedSharding(mesh, P(where.logits.spec[0]))
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, where)
    return decode_steps.lower(params, state, jax.random.key(0), jnp.int32(0), jnp.int32(0), cfg=cfg,
                              sampling=sampling, kv_len=kv_len or cache["mask"].shape[1], mesh=mesh)


def _row_keys(key: Array, rows: Array, step: Array) -> Array:
    """[n] keys: row r's draw at step s depends on (key, r, s) only, not on where r sits in the batch."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(rows)


def _draw(state: DecodeState, key: Array, sampling: SamplingConfig) -> tuple[DecodeState, Array, Array]:
    """Draw step `state.step`'s token for every live row; -> (state, the tokens [n], which rows were live [n])."""
    eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)
    step, done = state.step, state.done
    tok, lp = choose_tokens(_row_keys(key, state.rows, step), state.logits, sampling)
    forced = state.eos_at <= sampling.max_new_tokens  # these rows end at eos_at, not at a drawn EOS
    tok = jnp.where(step + 1 == state.eos_at, eos[0], tok)
    tok = jnp.where(done, sampling.pad_id, tok)
    lp = jnp.where(done, 0.0, lp)
    ends = jnp.where(forced, step + 1 == state.eos_at, jnp.isin(tok, eos))
    state = dataclasses.replace(
        state, step=step + 1,
        tokens=jax.lax.dynamic_update_slice(state.tokens, tok[:, None], (0, step)),
        logps=jax.lax.dynamic_update_slice(state.logps, lp[:, None], (0, step)),
        lengths=state.lengths + (~done).astype(jnp.int32), done=done | ends)
    return state, tok, ~done


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "kv_len", "mesh"), donate_argnames=("state",))
def decode_steps(params, state: DecodeState, key: Array, stop_step: Array, stop_live: Array, *,
                 cfg: architecture.ModelConfig, sampling: SamplingConfig, kv_len: int,
                 mesh: Mesh | None = None) -> tuple[DecodeState, Array, Array]:
    """Draw every row's token and run the model on it, step by step in one while_loop, while
    step < stop_step and some row shard (`_row_shards`: each device's block of rows) holds more than
    stop_live live rows; every step attends over the cache's first kv_len slots (which must hold
    prompt + stop_step tokens). A batch at step T - 1 gets its last draw, with no forward after it.
    The cache is donated and updated in place. Returns the state, its live rows and the most any
    shard holds (scalars: every host reads them)."""
    T = sampling.max_new_tokens
    shards = _row_shards(state.rows.shape[0], mesh)

    def body(state):
        state, tok, active = _draw(state, key, sampling)
        logits, cache = transformer.forward(params, cfg, tok[:, None], active[:, None], state.cache, mesh=mesh,
                                      pin_weights=False, kv_len=kv_len)
        return _constrain_state(dataclasses.replace(state, cache=cache, logits=logits[:, -1]), cfg, mesh)

    live = lambda s: jnp.sum(~s.done.reshape(shards, -1), axis=1, dtype=jnp.int32)  # [shards]
    state = jax.lax.while_loop(lambda s: (s.step < stop_step) & (jnp.max(live(s)) > stop_live), body, state)
    # The last draw touches none of the cache (the cond's operands stay small).
    cache = state.cache
    last = jax.lax.cond((state.step == T - 1) & (jnp.max(live(state)) > 0), lambda s: _draw(s, key, sampling)[0],
                        lambda s: s, dataclasses.replace(state, cache={}))
    state = dataclasses.replace(last, cache=cache)
    return state, jnp.sum(live(state)), jnp.max(live(state))


def _row_shards(n: int, mesh: Mesh | None) -> int:
    """How many blocks a batch of n rows is split into over the mesh (1 where its rows are replicated)."""
    shards = 1 if mesh is None else partitioning.batch_shards(mesh)
    return shards if n % shards == 0 else 1


def _take_rows(x: Array, keep: Array, axis: int) -> Array:
    """x's rows `keep` along `axis`: keep [shards, k] indexes each shard's own block of rows, so the
    gather is local to the device that holds the block (a batched gather over the shard dimension:
    no row crosses devices, and nothing is all-reduced)."""
    shards, n = keep.shape[0], x.shape[axis]
    blocks = x.reshape(*x.shape[:axis], shards, n // shards, *x.shape[axis + 1:])
    out = jax.vmap(lambda b, i: jnp.take(b, i, axis=axis), in_axes=(axis, 0), out_axes=axis)(blocks, keep)
    return out.reshape(*x.shape[:axis], shards * keep.shape[1], *x.shape[axis + 1:])


@functools.partial(jax.jit, static_argnames=("cfg", "size", "mesh"), donate_argnames=("out",))
def _shrink(state: DecodeState, out: dict[str, Array] | None, *, cfg: architecture.ModelConfig, size: int,
            mesh: Mesh | None = None) -> tuple[DecodeState, dict[str, Array]]:
    """Store the batch's results in the rollout's (`out`, [N, ...]; None while the batch is still
    the whole rollout in order: then they are the batch's), then keep `size` rows: in each row shard
    (a device's block, `_row_shards`) size / shards of its own rows, the live ones first, in their
    order, and finished ones to fill up (they stay finished), with their cache rows. Rows never move
    between devices: each shard must hold at most size / shards live rows (`decode` sees to it)."""
    shards = _row_shards(state.rows.shape[0], mesh)
    results = getattr(state, "RESULTS", _RESULTS)  # what a state type stores per row
    out = _store(state, out, shards) if out is not None else {k: getattr(state, k) for k in results}
    keep = jnp.argsort(state.done.reshape(shards, -1), axis=1, stable=True)[:, :size // shards]
    take = lambda x, axis=0: _take_rows(x, keep, axis)
    cache = {k: v if k == "index" else take(v, 1 if k in ("k", "v") else 0) for k, v in state.cache.items()}
    small = jax.tree.map(take, dataclasses.replace(state, cache={}, step=None))
    return _constrain_state(dataclasses.replace(small, cache=cache, step=state.step), cfg, mesh), out


_RESULTS = ("tokens", "logps", "lengths", "done")


def _store(state: DecodeState, out: dict[str, Array], shards: int = 1) -> dict[str, Array]:
    """Write the batch's rows into the rollout's results (out, [N, ...]). A row never leaves its
    shard's block (`_shrink`), so each shard writes its own block of `out`, on its own device."""
    N = out["tokens"].shape[0]
    local = state.rows.reshape(shards, -1) % (N // shards)  # [shards, n / shards]: rows within their block

    def put(o, v):
        blocks = jax.vmap(lambda a, i, x: a.at[i].set(x))(o.reshape(shards, N // shards, *o.shape[1:]), local,
                                                          v.reshape(shards, -1, *v.shape[1:]))
        return blocks.reshape(o.shape)

    return {k: put(out[k], getattr(state, k)) for k in out}


def batch_sizes(n: int, factor: float, unit: int = 1) -> tuple[int, ...]:
    """The batch sizes decode shrinks through: n, then each about `factor` times smaller, as
    multiples of `unit` (the mesh's row shards), down to unit. factor <= 1: n only."""
    sizes = [n]
    while factor > 1 and sizes[-1] > unit:
        sizes.append(max(unit, min(sizes[-1] - unit, math.ceil(sizes[-1] / factor / unit) * unit)))
    return tuple(sizes)


# A smaller batch costs a program (compiled once per size) and a copy of its cache rows: not worth it
# for the last few steps of a rollout.
_MIN_STEPS_AFTER_SHRINK = 32


@dataclasses.dataclass
class Decoded:
    """What decode generated for the N rows, and what it cost."""

    tokens: Array  # [N, T] int32, pad_id after the end
    logps: Array  # [N, T] float32, 0 after the end
    lengths: Array  # [N] int32
    done: Array  # [N] bool: ended with EOS
    row_steps: int  # rows in the batch x steps, summed over the calls: the token choices computed
    batches: tuple[tuple[int, int, int], ...]  # (rows, kv_len, steps) per decode_steps call


def decode(params, cache: architecture.Cache, first_logits: Array, key: Array, *, cfg: architecture.ModelConfig,
           sampling: SamplingConfig, mesh: Mesh | None = None, gather_weights: bool = True,
           eos_at: Array | None = None) -> Decoded:
    """Generate up to sampling.max_new_tokens tokens for each row of a prefilled cache.

    Cost follows the tokens generated, not the longest completion or the cache size:
    - Steps run in segments (`segment_ends`); a segment's steps attend over the cache's first
      prompt + segment-end slots, so a step reads at most about twice the filled cache.
    - Finished rows leave the batch: once the live rows fit the next of `batch_sizes` (each about
      sampling.shrink_factor smaller), they move there with their cache rows. Every row draws its
      tokens from fold_in(fold_in(key, row), step), so where it sits, and whether the batch shrank,
      does not change its completion.
    Each (batch size, segment) pair is one compiled decode_steps program, run in a while_loop; the
    host only reads the step and the live row counts between calls. On a mesh each device's block of
    rows shrinks on its own (`_shrink`: no row crosses devices), once every block's live rows fit.

    The weights are brought to the compute dtype and the inference layout once (`inference_params`;
    gather_weights=False uses them as they come, e.g. a model whose tensor shard does not fit).
    `eos_at` [N] (benchmarks, tests: the lengths of a real run, without its text): row i ends with an
    EOS forced as its token number eos_at[i] (EOS tokens it draws before are ordinary tokens).
    The cache is consumed (donated).
    """
    if gather_weights:
        params, cfg = inference_params(params, cfg, mesh)
    N, T = first_logits.shape[0], sampling.max_new_tokens
    if eos_at is not None and not sampling.eos_ids:
        raise ValueError("eos_at forces EOS tokens: sampling.eos_ids is empty")
    S = cache["mask"].shape[1]  # prompt bucket + T slots (prefill's cache)
    shards = _row_shards(N, mesh)
    sizes = batch_sizes(N, sampling.shrink_factor, shards)
    state = decode_state(cache, first_logits, sampling, eos_at)
    out, step, live, row_steps, batches = None, 0, N, 0, []
    while live and step < T:
        n = state.rows.shape[0]
        end = next(e for e in segment_ends(T, sampling.first_segment) if e > step)
        stop = min(end, T - 1)
        smaller = [s for s in sizes if s < n][:1] if step < T - _MIN_STEPS_AFTER_SHRINK else []
        if smaller:  # the loop may stop for a shrink only while enough steps remain
            stop = min(stop, T - _MIN_STEPS_AFTER_SHRINK)
        # A smaller batch keeps each shard's rows on its device: it waits until every shard's live
        # rows fit its part of the smaller batch.
        state, live, most = decode_steps(params, state, key, jnp.int32(stop),
                                         jnp.int32(smaller[0] // shards if smaller else 0),
                                         cfg=cfg, sampling=sampling, kv_len=S - T + end, mesh=mesh)
        new_step, live, most = (int(x) for x in jax.device_get((state.step, live, most)))
        row_steps += n * (new_step - step)
        batches.append((n, S - T + end, new_step - step))
        step = new_step
        if smaller and 0 < most <= smaller[0] // shards:
            size = min(s for s in sizes if s >= most * shards)
            state, out = _shrink(state, out, cfg=cfg, size=size, mesh=mesh)
    if out is not None:
        out = _store_jit(state, out, shards)
        state = dataclasses.replace(state, **out)
    return Decoded(state.tokens, state.logps, state.lengths, state.done, row_steps, tuple(batches))


_store_jit = jax.jit(_store, donate_argnums=1, static_argnums=2)


def compiled_programs() -> dict[str, int]:
    """How many programs prefill and decode have compiled in this process (jit cache sizes)."""
    return {"prefill": prefill._cache_size(), "decode_steps": decode_steps._cache_size(),
            "shrink": _shrink._cache_size()}


def gather_prompt_batch(prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Multi-host: every host's prompts, padded to one bucket and stacked in process order (this
    host's are its block of rows), so each host then holds the whole global prompt batch."""
    from jax.experimental import multihost_utils

    longest = int(np.max(multihost_utils.process_allgather(np.int32(max(len(p) for p in prompts)))))
    ids, mask = pad_prompts(prompts, cfg.prompt_buckets, cfg.pad_id, min_length=longest)
    ids, mask = multihost_utils.process_allgather(ids), multihost_utils.process_allgather(mask)
    return ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])


def prompt_batch(prompts: Sequence[Sequence[int]], num_generations: int, cfg: SamplingConfig,
                 mesh: Mesh | None = None) -> tuple[Array, Array, int]:
    """The prompts left-padded to a bucket (every host's on several hosts) and placed on the mesh:
    ids, mask [B, P], and the rollout's row count B * G before any rows added for the mesh."""
    if jax.process_count() > 1:
        if mesh is None:
            raise ValueError("sampling on several hosts needs the mesh")
        ids, mask = gather_prompt_batch(prompts, cfg)
    else:
        ids, mask = pad_prompts(prompts, cfg.prompt_buckets, cfg.pad_id)
    n = len(ids) * num_generations
    if mesh is None:
        return jnp.asarray(ids), jnp.asarray(mask), n
    # Rows that do not split over data x fsdp get copies of the last prompt appended (and dropped
    # from the result), so that the rollout and its cache are split, never replicated. Row i's
    # draws do not depend on the number of rows (partitionable threefry counts by index).
    shards = partitioning.batch_shards(mesh)
    extra = -len(ids) % (shards // math.gcd(shards, num_generations))
    ids, mask = (np.concatenate([x, np.repeat(x[-1:], extra, 0)]) for x in (ids, mask))
    row = NamedSharding(mesh, P(partitioning.row_axes(len(ids), mesh), None))
    return jax.device_put(ids, row), jax.device_put(mask, row), n


def sample(
    params: architecture.Params,
    model_cfg: architecture.ModelConfig,
    prompts: Sequence[Sequence[int]],
    num_generations: int,
    cfg: SamplingConfig,
    key: Array,
    mesh: Mesh | None = None,
    gather_weights: bool = True,
) -> Rollout:
    """Sample `num_generations` completions for each prompt (lists of token ids).

    Args:
      params: model parameters (sharded as configured when `mesh` is given).
      model_cfg: the model config.
      prompts: token id lists of any lengths (left-padded here to a bucket); on several hosts,
        this host's prompts, which become its block of the global batch.
      num_generations: G, completions per prompt.
      cfg: sampling settings.
      key: PRNG key; the same key gives the same rollout.
      mesh: optional (data, fsdp, expert, tensor) mesh; rows are split over data x fsdp x expert.
      gather_weights: read the weights in the compute dtype and the inference layout (split over
        tensor only), converted once per call (pass `inference_params`' copy to share it among
        calls); False reads them as they are.

    Returns:
      A Rollout of len(prompts) * G rows, the G samples of each prompt adjacent.
    """
    ids, mask, n = prompt_batch(prompts, num_generations, cfg, mesh)
    if gather_weights:  # once for prefill and decode
        params, model_cfg = inference_params(params, model_cfg, mesh)
    logits, cache = prefill(params, ids, mask, cfg=model_cfg, num_generations=num_generations,
                            max_new_tokens=cfg.max_new_tokens, mesh=mesh, gather_weights=False)
    out = decode(params, cache, logits, key, cfg=model_cfg, sampling=cfg, mesh=mesh, gather_weights=False)
    tokens, logps, lengths, done = out.tokens, out.logps, out.lengths, out.done
    completion_mask = jnp.arange(cfg.max_new_tokens)[None, :] < lengths[:, None]
    rollout = Rollout(
        prompt_ids=jnp.repeat(ids, num_generations, axis=0),
        prompt_mask=jnp.repeat(mask, num_generations, axis=0),
        tokens=tokens,
        mask=completion_mask,
        logprobs=logps,
        lengths=lengths,
        truncated=~done,
    )
    return rollout if len(lengths) == n else jax.tree.map(lambda x: x[:n], rollout)
