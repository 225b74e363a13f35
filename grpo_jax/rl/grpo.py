"""GRPO (DeepSeekMath, Shao et al. 2024): one step over a train state, top to bottom.

    rows -> rollout (G completions per prompt) -> scores (host verifiers) -> advantages -> update

    algo = GRPO.from_config(cfg, pol, scorer, task)
    state, metrics = algo.step(state)                       # one step, host and device
    state, metrics = update(state, batch, model_cfg=..., loss_cfg=..., mesh=..., num_microbatches=1, tx=tx)

`update` is the pure function the step jits and donates: the GRPO loss of `batch` (grpo_jax.rl.objective,
grpo_jax.rl.loss) and one optimizer step on the train state; a batch in which no token carries a non-zero
advantage makes no step (its gradient is rounding noise, or the KL term alone, which Adam would
turn into a full-size step).

The old policy of the clipped ratio is the trainer's own, never the sampler's log-probabilities
(which differ in bfloat16; grpo_jax.rl.rollout_correction measures and can correct that): with one
update per rollout it is π_θ itself under stop_gradient, so the ratio is exactly 1; with several
(num_iterations > 1 or minibatches > 1) the trainer's forward computes it once, before the first
update. The reference log-probabilities (beta > 0) come from `state.ref_params`, the frozen policy
the run started from, stored in the compute dtype; a LoRA run's reference is its frozen base with
the adapters off (`state.frozen`, no second copy). Both passes run in micro-batches of the update's
size (`batch_logprobs`).

Dynamic sampling (DAPO, Yu et al. 2025): with `dynamic_sampling`, groups whose G values of the
`signal_reward` function (DAPO filters on accuracy: by default the eval verifier, `eval.reward`; None:
the weighted total) are all equal are dropped and more prompts are sampled until prompts_per_step
groups with signal fill the batch or `max_sampling_rounds` rounds are done (the rest is then filled
with groups without signal). A later round samples about as many prompts as are still missing,
rounded up to one of a few sizes (prompts_per_step / 2^k, so that few programs compile). Each round
reads the next prompts of the data iterator and its own key (fold_in(step key, round)), so a step
is deterministic and a resumed run repeats it exactly.

Failures: a weighted reward function that fails on every completion of `max_failing_steps`
consecutive steps stops the run (scoring.FailureStreaks); the reward functions a host disabled (a
log-only one that hangs) are disabled on every host at the end of the step and recorded in the
state's `data["rewards_off"]` (bit i: specs[i]), so that a resumed run scores what the uninterrupted
one would.

Completions are trimmed to the bucket of the longest one before the reference pass and the update:
their cost follows the tokens sampled, not `max_new_tokens`. With `packing` (the default) the
update, the reference pass and the old-policy pass run on packed rows (grpo_jax.rl.packing): each
group's prompt computed once, completions without padding, rows of at most `max_row_tokens`;
metric `update/tokens_per_unique` is the positions computed per unique token (each prompt once,
every completion token), in both layouts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from grpo_jax.common import data
from grpo_jax.common import metrics
from grpo_jax.models import architecture
from grpo_jax.models import lora
from grpo_jax.models import placement
from grpo_jax.parallel import multihost
from grpo_jax.parallel import partitioning
from grpo_jax.rewards import scoring
from grpo_jax.rl import logprobs
from grpo_jax.rl import loss
from grpo_jax.rl import objective
from grpo_jax.rl import packing
from grpo_jax.rl import train_state
from grpo_jax.rollout import policy
from grpo_jax.rollout import multi_turn
from grpo_jax.rollout import sampler

Batch = dict[str, jax.Array]
_SEQUENCES = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")


def loss_config(cfg: ConfigDict) -> loss.LossConfig:
    """The loss settings of a run config (`grpo.*` and the sampling fields the loss reads)."""
    g, s = cfg.grpo, cfg.sampling
    return loss.LossConfig(
        advantage_estimator=g.advantage_estimator, scale_rewards=g.scale_rewards, std_ddof=g.std_ddof,
        clip_eps_low=g.clip_eps_low, clip_eps_high=g.clip_eps_high, dual_clip=g.dual_clip,
        beta=g.beta, kl_estimator=g.kl_estimator, aggregation=g.aggregation,
        max_completion_length=s.max_new_tokens, importance_level=g.importance_level,
        mask_truncated=g.mask_truncated, temperature=s.temperature, logprob_chunk=g.logprob_chunk,
        rollout_correction=g.rollout_correction, rollout_correction_max=g.rollout_correction_max,
        rollout_correction_min=g.rollout_correction_min, router_aux_loss_coef=g.router_aux_loss_coef)


# The softmax's elementwise work (scale, mask, max, exp, sum, divide, casts; forward, backward and
# remat) is memory-bound: measured on the SmolLM2 shape (docs/benchmarks.md, the packed update),
# attention costs about 4x its matmul FLOPs relative to the rest of a position.
ATTENTION_OVERHEAD = 4.0


def attention_cost(cfg: architecture.ModelConfig) -> float:
    """The cost of one more key per position of a packed row, relative to the position's matmuls:
    QK^T and AV take 4 L H hd FLOPs per key, the matmuls 2 W per position (W: the weights a token
    multiplies: projections, MLP or its active experts, the head), so 2 L H hd / W, times
    ATTENTION_OVERHEAD. The einsum and "xla" attentions compute every key of a row, masked or not,
    so long rows of short sequences pay it: packing.plan weighs it against padding."""
    d, L, q, kv = cfg.hidden_size, cfg.num_layers, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    mlp = (cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size + d * cfg.num_experts if cfg.num_experts
           else 3 * d * cfg.intermediate_size)
    weights = L * (2 * d * q + 2 * d * kv + mlp) + d * cfg.vocab_size
    return ATTENTION_OVERHEAD * 2 * L * q / weights


def update(state: train_state.TrainState, batch: Batch, *, model_cfg: architecture.ModelConfig, loss_cfg: loss.LossConfig,
           mesh, num_microbatches: int, tx) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
    """One optimizer step on the GRPO loss of `batch` (objective.loss_and_grad's batch layout). The
    state is left as it was when the loss or gradient is not finite (metrics["update_nonfinite"]) or
    when no token carries advantage (metrics["update_no_signal"]); update_skipped counts both."""
    loss_value, grads, out = objective.loss_and_grad(state.params, batch, model_cfg, loss_cfg, mesh, num_microbatches,
                                                     frozen=state.frozen)
    rows = objective.completions(batch)
    signal = loss.has_signal(rows["advantages"], objective.loss_tokens(rows), rows.get("truncated"), loss_cfg)
    state, opt_metrics = train_state.apply_gradients(state, grads, loss_value, tx, skip=~signal)
    return state, {**out, **opt_metrics, "update_no_signal": (~signal).astype(jnp.float32)}


def batch_logprobs(params: architecture.Params, batch: Batch, *, model_cfg: architecture.ModelConfig, loss_cfg: loss.LossConfig,
                   mesh, num_microbatches: int) -> jax.Array:
    """log π(o_t | q, o_<t) of the batch's completions under `params` (the reference, or the policy
    before its first update): [B, C], or [R, S, C] slots of a packed batch; `num_microbatches` rows
    groups at a time (lax.map: one micro-batch's activations live at once, as in the update)."""
    def one(mb):
        return logprobs.batch_logprobs(params, model_cfg, mb, loss_cfg.temperature, loss_cfg.logprob_chunk,
                                       mesh=mesh)[0]

    if num_microbatches == 1:
        return one(batch)
    return objective.merge_microbatches(jax.lax.map(one, objective.split_microbatches(batch, num_microbatches)))


# Jitted once, with hashable static settings (the optimizer: train_state.make_optimizer's shared
# object), so that every trainer of the same model, loss, mesh and optimizer in a process runs the
# same compiled programs.
update_jit = jax.jit(update, static_argnames=("model_cfg", "loss_cfg", "mesh", "num_microbatches", "tx"),
                     donate_argnums=0)
batch_logprobs_jit = jax.jit(batch_logprobs, static_argnames=("model_cfg", "loss_cfg", "mesh", "num_microbatches"))


@dataclasses.dataclass
class Groups:
    """This host's completions of a step, the G of each prompt adjacent. What the host reads (texts,
    lengths, rewards) is numpy rows; the sequences that make the batch are the sampler's device
    arrays (`rollout`, every host's rows) when the groups are one round as sampled, so they never
    leave the devices, or this host's numpy rows when dynamic sampling selects and concatenates
    groups of several rounds."""

    rows: list[dict]  # the prompts' dataset rows
    texts: list[str]
    lengths: np.ndarray  # [N] tokens, EOS included
    truncated: np.ndarray  # [N] bool
    rollout: sampler.Rollout | None = None
    prompt_ids: np.ndarray | None = None  # [N, P] left-padded (without `rollout`)
    prompt_mask: np.ndarray | None = None
    tokens: np.ndarray | None = None  # [N, T] right-padded
    mask: np.ndarray | None = None
    logprobs: np.ndarray | None = None  # [N, T] the sampler's
    sampled_mask: np.ndarray | None = None  # [N, T] multi-turn: True on the policy's tokens (not observations)
    rewards: np.ndarray | None = None  # [N] weighted total
    per_fn: dict[str, np.ndarray] | None = None  # [N] per reward function (NaN: None)
    counts: dict[str, int] | None = None  # verifier timeouts, crashes, errors (in total and by function)
    columns: dict[str, list] | None = None  # [N] more reward columns (multi-turn: tool_calls, environment)

    @classmethod
    def sampled(cls, rows: list[dict], rollout: sampler.Rollout, decode, on_host: bool) -> Groups:
        """This host's groups of a rollout; `on_host`: with the sequences copied to the host."""
        names = ("prompt_ids", "prompt_mask", "tokens", "mask", "logprobs", "sampled") if on_host else ("tokens",)
        local = {k: multihost.local_rows(getattr(rollout, k)) for k in names if getattr(rollout, k) is not None}
        if "sampled" in local:
            local["sampled_mask"] = local.pop("sampled")
        lengths = multihost.local_rows(rollout.lengths)
        return cls(rows, decode(local["tokens"], lengths), lengths, multihost.local_rows(rollout.truncated),
                   rollout=None if on_host else rollout, **(local if on_host else {}))

    def batch(self, C: int, mesh) -> Batch:
        """The sequences as a global batch over the mesh, completions cut to C tokens."""
        src = self if self.rollout is None else self.rollout
        arrays = {"prompt_ids": src.prompt_ids, "prompt_mask": src.prompt_mask, "completion_ids": src.tokens[:, :C],
                  "completion_mask": src.mask[:, :C], "truncated": src.truncated, "sampler_logp": src.logprobs[:, :C]}
        sampled = src.sampled if self.rollout is not None else src.sampled_mask
        if sampled is not None:  # the loss reads the policy's tokens only
            arrays["sampled_mask"] = sampled[:, :C]
        return arrays if self.rollout is not None else multihost.global_batch(arrays, mesh)

    def signal(self, G: int, by: str | None = None) -> np.ndarray:
        """[prompts] bool: the groups whose rewards (or reward function `by`'s values, None as 0)
        are not all equal."""
        r = (self.rewards if by is None else np.nan_to_num(self.per_fn[by], nan=0.0)).reshape(-1, G)
        return r.max(axis=1) != r.min(axis=1)

    def select(self, groups: np.ndarray, G: int) -> Groups:
        """The completions of the prompts `groups` (indices into this Groups' prompts)."""
        idx = (np.asarray(groups, np.int64)[:, None] * G + np.arange(G)).reshape(-1)
        arrays = {f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        return dataclasses.replace(self, rows=[self.rows[i] for i in groups], texts=[self.texts[i] for i in idx],
                                   per_fn={k: v[idx] for k, v in self.per_fn.items()}, **arrays,
                                   columns=self.columns and {k: [v[i] for i in idx] for k, v in self.columns.items()})

    @staticmethod
    def concat(parts: Sequence[Groups], pad_id: int) -> Groups:
        """One Groups of several (prompts left-padded to the widest)."""
        if len(parts) == 1:
            return parts[0]
        P = max(p.prompt_ids.shape[1] for p in parts)
        left = lambda x, fill: np.pad(x, ((0, 0), (P - x.shape[1], 0)), constant_values=fill)
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])
        return Groups(
            rows=[r for p in parts for r in p.rows], texts=[t for p in parts for t in p.texts],
            lengths=cat("lengths"), truncated=cat("truncated"),
            prompt_ids=np.concatenate([left(p.prompt_ids, pad_id) for p in parts]),
            prompt_mask=np.concatenate([left(p.prompt_mask, False) for p in parts]),
            tokens=cat("tokens"), mask=cat("mask"), logprobs=cat("logprobs"), rewards=cat("rewards"),
            sampled_mask=cat("sampled_mask") if parts[0].sampled_mask is not None else None,
            per_fn={k: np.concatenate([p.per_fn[k] for p in parts]) for k in parts[0].per_fn},
            counts={k: sum(p.counts.get(k, 0) for p in parts) for k in set().union(*(p.counts for p in parts))},
            columns=parts[0].columns and {k: [x for p in parts for x in p.columns[k]] for k in parts[0].columns})


@dataclasses.dataclass
class GRPO:
    """The GRPO steps of a run: its prompts, reward functions and the jitted pieces of a step."""

    policy: policy.Policy  # tokenizer, mesh, prompt format and sampling; parameters come from the state
    scorer: scoring.Scorer
    specs: list[scoring.RewardSpec]
    prompts: data.PromptIterator
    loss_cfg: loss.LossConfig
    tx: Any
    num_generations: int
    num_iterations: int = 1
    minibatches: int = 1
    num_microbatches: int = 1
    seed: int = 0
    skipped_rows: int = 0
    samples_every: int = 0
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 1
    max_nonfinite_updates: int = 10
    packing: bool = True
    max_row_tokens: int = 8192
    signal_reward: str | None = None  # dynamic sampling's filter: this function's values (None: the total)
    max_failing_steps: int = 3
    name = "GRPO"

    def __post_init__(self):
        if self.max_sampling_rounds < 1:
            raise ValueError(f"grpo.max_sampling_rounds={self.max_sampling_rounds}; expected >= 1")
        if len(self.specs) > 31:
            raise ValueError(f"{len(self.specs)} reward functions; at most 31 (the state records disabled ones as bits)")
        if self.signal_reward is not None and self.signal_reward not in [s.name for s in self.specs]:
            self.specs = [*self.specs, scoring.RewardSpec(self.signal_reward, 0.0)]  # scored for the filter only
        self.failing = scoring.FailureStreaks(self.max_failing_steps)
        statics = dict(model_cfg=self.policy.model_cfg, loss_cfg=self.loss_cfg, mesh=self.policy.mesh)
        self.update_fn = functools.partial(update_jit, num_microbatches=self.num_microbatches, tx=self.tx, **statics)
        # The reference and old-policy passes see all of a step's rows at once: as many micro-batches
        # as the updates split them into, so that their activations are no larger than one update's.
        self.logprobs_fn = functools.partial(
            batch_logprobs_jit, num_microbatches=self.minibatches * self.num_microbatches, **statics)
        # A LoRA run's reference: the frozen base run without its adapters.
        self.base_logprobs_fn = functools.partial(
            batch_logprobs_jit, num_microbatches=self.minibatches * self.num_microbatches,
            **{**statics, "model_cfg": lora.base_config(self.policy.model_cfg)})
        self.nonfinite = train_state.NonFiniteStop(self.max_nonfinite_updates)

    @classmethod
    def from_config(cls, cfg: ConfigDict, pol: policy.Policy, scorer: scoring.Scorer, task: data.Task) -> GRPO:
        g, hosts = cfg.grpo, jax.process_count()
        if g.prompts_per_step % hosts:
            raise ValueError(f"grpo.prompts_per_step={g.prompts_per_step} (global) does not split over {hosts} hosts")
        n, shards = g.prompts_per_step * g.num_generations, partitioning.batch_shards(pol.mesh)
        if n % (g.minibatches * g.microbatches * shards):
            axes = ("data", "fsdp") + (("expert",) if pol.mesh.shape["expert"] > 1 else ())
            raise ValueError(
                f"grpo.prompts_per_step x grpo.num_generations = {g.prompts_per_step} x {g.num_generations} = {n} "
                f"completions per step must split into grpo.minibatches={g.minibatches} x grpo.microbatches="
                f"{g.microbatches} parts of equal rows over the mesh's {' x '.join(axes)} = {shards} devices "
                f"({', '.join('mesh.' + a for a in axes)}); {n} is not a multiple of {g.minibatches * g.microbatches * shards}")
        tx, _ = train_state.make_optimizer(cfg.optimizer, cfg.steps * g.num_iterations * g.minibatches)
        prompts = data.PromptIterator(task.train, g.prompts_per_step // hosts, seed=cfg.seed,
                                      host=jax.process_index(), num_hosts=hosts)
        signal = g.get("dynamic_sampling_reward")
        signal = cfg.eval.reward if signal is None else (None if signal == "total" else signal)
        return cls(pol, scorer, [scoring.RewardSpec(k, w) for k, w in cfg.rewards.items()], prompts,
                   loss_config(cfg), tx, g.num_generations, g.num_iterations, g.minibatches,
                   g.microbatches, cfg.seed, task.skipped, cfg.log.samples_every, g.dynamic_sampling,
                   g.max_sampling_rounds if g.dynamic_sampling else 1, cfg.optimizer.max_nonfinite_updates,
                   g.packing, g.max_row_tokens, signal if g.dynamic_sampling else None,
                   cfg.verifier.get("max_failing_steps", 3))

    @property
    def updates_per_step(self) -> int:
        return self.num_iterations * self.minibatches

    def initial_data(self) -> dict[str, int]:
        return {**self.prompts.state(), "rewards_off": 0}

    @property
    def reward_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def reference_params(self, params):
        """The frozen reference of the KL term, only when beta > 0: a copy of the starting policy in
        the compute dtype (it only runs forward, and the forward computes in that dtype anyway), in
        the policy's layout. None for LoRA: the reference is the frozen base the run keeps anyway."""
        if self.loss_cfg.beta <= 0 or self.policy.model_cfg.lora_rank:
            return None
        return placement.cast(params, self.policy.model_cfg.dtype, copy=True)

    def before_training(self, state: train_state.TrainState, say: Callable[[str], None]) -> None:
        pass

    # ---- one step --------------------------------------------------------------------------------

    def step(self, state: train_state.TrainState,
             clock: metrics.Stopwatch | None = None) -> tuple[train_state.TrainState, dict[str, Any]]:
        """One step: G completions of each of this host's prompts from the state's policy, their
        rewards r (host), group advantages A_i = (r_i - mean(r)) / std(r) (or the configured
        estimator), then num_iterations x minibatches updates of the clipped surrogate. Returns the
        next state and the step's metrics; `clock` gets a lap per phase."""
        clock = clock or metrics.Stopwatch()
        G, mesh, step = self.num_generations, self.policy.mesh, int(state.step)
        self.scorer.set_disabled(int(state.data.get("rewards_off", 0)), self.reward_names)  # a resumed run's record
        sampled, next_data, rounds = self._sample(state, clock)
        groups = self._batch_groups(sampled) if self.dynamic_sampling else sampled
        C = self.trimmed_length(multihost.host_max([int(groups.lengths.max(initial=0))])[0])
        if self.packing:
            batch, plan, layout_metrics = self._packed_batch(groups, C)
            seqs = {k: batch[k] for k in packing.SEQUENCE_KEYS}
        else:
            batch, plan, layout_metrics = groups.batch(C, mesh), None, self._padded_metrics(groups, C)
            seqs = {k: batch[k] for k in _SEQUENCES}
        # Dispatched before the host scores: the device computes them while the verifiers run.
        if self.updates_per_step > 1:  # else π_old = stop_gradient(π_θ) in the loss: the ratio is exactly 1
            batch["old_logp"] = self.logprobs_fn(train_state.policy_params(state), seqs)
        if state.ref_params is not None:
            batch["ref_logp"] = self.logprobs_fn(state.ref_params, seqs)
        elif self.loss_cfg.beta > 0 and state.frozen is not None:
            batch["ref_logp"] = self.base_logprobs_fn(state.frozen, seqs)
        if groups.rewards is None:
            self._score(groups)
            clock.lap("rewards")
        self._check_failures(sampled, step + 1)  # before an update on rewards that are all 0

        # The device runs in order: advantages computed there would wait for the reference pass.
        jax.block_until_ready((batch.get("old_logp"), batch.get("ref_logp")))
        # Over every host's rewards: scale_rewards="batch" divides by the std of the global batch.
        total = multihost.all_hosts(groups.rewards)
        advantages, adv_metrics = loss.compute_advantages(jnp.asarray(total), G, self.loss_cfg)
        if plan is None:
            batch["advantages"] = multihost.place_rows(np.asarray(advantages), mesh)
        else:  # this host's completions, in its rows' slots
            n = len(groups.texts)
            mine = np.asarray(advantages)[jax.process_index() * n:(jax.process_index() + 1) * n]
            batch["advantages"] = multihost.global_batch({"a": plan.to_slots(mine)}, mesh)["a"]
        batch = partitioning.shard_batch(batch, mesh)
        clock.lap("ref_logprobs")

        state, update_metrics = self._updates(state, batch, step)
        jax.block_until_ready(state.params)  # updates run asynchronously: time them, not their dispatch
        clock.lap("update")

        # Every host disables what any host disabled, from the next step on, and the state keeps it.
        off = multihost.host_bits(self.scorer.disabled_mask(self.reward_names))
        self.scorer.set_disabled(off, self.reward_names)
        state = train_state.advance(state, {**next_data, "rewards_off": off}, mesh)
        out = {**update_metrics, **{k: float(v) for k, v in adv_metrics.items()}, **self._sample_metrics(sampled),
               **layout_metrics, **multi_turn.metrics(self.tool_stats)}
        out["completion_length/padded"] = float(C)
        if self.dynamic_sampling:
            all_signal = multihost.all_hosts(sampled.signal(G, self.signal_reward))
            out.update({"dynamic_sampling/rounds": float(rounds),
                        "dynamic_sampling/prompts_sampled": float(all_signal.size),
                        "dynamic_sampling/kept_fraction": float(all_signal.mean()),
                        "dynamic_sampling/filled_without_signal": float(adv_metrics["frac_reward_zero_std"])})
        if self.samples_every and (step + 1) % self.samples_every == 0:
            out["samples"] = "\n\n".join(
                f"**prompt** {groups.rows[i // G][self.policy.prompt.field]!r}\n**completion** {groups.texts[i]!r}\n"
                f"**reward** {groups.rewards[i]:.3f}" for i in range(min(4, len(groups.texts))))
        return state, out

    def _packed_batch(self, groups: Groups, C: int) -> tuple[Batch, packing.Plan, dict[str, float]]:
        """This host's groups as packed rows (its share of the global rows: every host lays out the
        same shapes), completions cut to C tokens, and the layout's metrics."""
        mesh, hosts = self.policy.mesh, jax.process_count()
        multiple = partitioning.batch_shards(mesh) * self.num_microbatches * self.minibatches
        arrays = {"prompt_ids": groups.prompt_ids, "prompt_mask": groups.prompt_mask,
                  "completion_ids": groups.tokens[:, :C], "completion_mask": groups.mask[:, :C],
                  "truncated": groups.truncated, "sampler_logp": groups.logprobs[:, :C]}
        if groups.sampled_mask is not None:
            arrays["sampled_mask"] = groups.sampled_mask[:, :C]
        kw = dict(pad_id=self.policy.sampling.pad_id, max_row_tokens=self.max_row_tokens,
                  attention_cost=attention_cost(self.policy.model_cfg),
                  row_multiple=multiple // hosts if multiple % hosts == 0 else multiple,
                  shards=max(1, partitioning.batch_shards(mesh) // hosts))
        arrays_packed, plan = packing.from_padded(arrays, self.num_generations, **kw)
        if hosts > 1:
            shape = multihost.host_max([plan.rows, plan.row_tokens, plan.slots])
            if shape != (plan.rows, plan.row_tokens, plan.slots):
                arrays_packed, plan = packing.from_padded(arrays, self.num_generations, rows=shape[0],
                                                          row_tokens=shape[1], slots=shape[2], **kw)
        counts = multihost.host_sum({"unique": plan.unique_tokens, "computed": plan.computed_tokens})
        return multihost.global_batch(arrays_packed, mesh), plan, {
            "update/tokens_per_unique": counts["computed"] / max(counts["unique"], 1), "update/rows": float(plan.rows * hosts),
            "update/row_tokens": float(plan.row_tokens), "update/slots": float(plan.slots)}

    def _padded_metrics(self, groups: Groups, C: int) -> dict[str, float]:
        """Positions the padded batch computes per unique token (each prompt once, every completion token)."""
        G, lengths = self.num_generations, np.minimum(groups.lengths, C)
        src = groups if groups.rollout is None else groups.rollout
        P = src.prompt_ids.shape[1]
        prompts = multihost.local_rows(src.prompt_mask)[::G].sum() if groups.rollout is not None else \
            groups.prompt_mask[::G].sum()
        counts = multihost.host_sum({"u": int(prompts + lengths.sum()), "c": len(lengths) * (P + C)})
        return {"update/tokens_per_unique": counts["c"] / max(counts["u"], 1)}

    def _sample(self, state: train_state.TrainState, clock: metrics.Stopwatch) -> tuple[Groups, dict[str, int], int]:
        """This host's completions of the step (every round's, scored when dynamic sampling needs
        the rewards to decide), the data iterator's next position, and the number of rounds."""
        G = self.num_generations
        pol = self.policy.replace(params=train_state.policy_params(state)).for_sampling()  # one sampling copy for every round
        key, position, rounds = train_state.step_key(state), state.data, []
        self.tool_stats = []  # multi-turn rollouts' episode stats, per round
        size = self.prompts.batch_size
        while True:
            rows, position = self.prompts.batch(position, size)
            rollout = pol.rollout(rows, G, key if not rounds else jax.random.fold_in(key, len(rounds)))
            if pol.tools is not None and pol.tools.answers is not None:  # void episodes leave the loss
                keep = multihost.place_rows(multihost.all_hosts(~pol.tools.last.void), self.policy.mesh)
                rollout = dataclasses.replace(rollout, sampled=rollout.sampled & keep[:, None])
            part = Groups.sampled(rows, rollout, self.policy.decode, on_host=self.dynamic_sampling or self.packing)
            if pol.tools is not None:
                self.tool_stats.append(pol.tools.last)
                part.columns = pol.tools.last.columns()
            rounds.append(part)
            clock.lap("sampling")
            if not self.dynamic_sampling:
                return part, position, 1
            self._score(part)
            clock.lap("rewards")
            missing = self.prompts.batch_size - sum(int(p.signal(G, self.signal_reward).sum()) for p in rounds)
            # The sampler is one program over all hosts: every host samples in every round (as many
            # prompts as the host that misses most), until all have enough groups with signal.
            missing = multihost.host_max([max(missing, 0)])[0]
            if not missing or len(rounds) >= self.max_sampling_rounds:
                return Groups.concat(rounds, self.policy.sampling.pad_id), position, len(rounds)
            size = self.round_size(missing)

    def round_size(self, missing: int) -> int:
        """Prompts per host of a round that lacks `missing` groups: the smallest prompts_per_step / 2^k
        (per host) that holds them and still splits over the mesh's batch shards."""
        full, shards, hosts = self.prompts.batch_size, partitioning.batch_shards(self.policy.mesh), jax.process_count()
        sizes = [full // 2**k for k in range(full.bit_length()) if full % 2**k == 0]
        fits = [n for n in sizes if n >= missing and (n * hosts * self.num_generations) % shards == 0]
        return min(fits, default=full)

    def _check_failures(self, sampled: Groups, step: int) -> None:
        """Stop when a weighted reward function failed on every completion of max_failing_steps steps
        in a row (over every host, so that all hosts decide the same)."""
        live = [s.name for s in self.specs if s.weight and s.name not in self.scorer.disabled]
        counts = sampled.counts or {}
        failed = {name: sum(int(counts.get(f"{name}/{k}", 0)) for k in ("errors", "timeouts", "crashes"))
                  for name in live}
        totals = multihost.host_sum({**{f"fn{i}": failed[n] for i, n in enumerate(live)}, "items": len(sampled.texts)})
        self.failing.observe({n: totals[f"fn{i}"] for i, n in enumerate(live)}, totals["items"],
                             self.scorer.last_errors, step)

    def _batch_groups(self, sampled: Groups) -> Groups:
        """prompts_per_step // hosts groups of `sampled`: those with signal first, in sampling order,
        then (only when the rounds ran out) groups without signal, which carry no advantage."""
        signal = sampled.signal(self.num_generations, self.signal_reward)
        order = np.concatenate([np.flatnonzero(signal), np.flatnonzero(~signal)])
        return sampled.select(np.sort(order[:self.prompts.batch_size]), self.num_generations)

    def _score(self, groups: Groups) -> None:
        total, per_fn, m = self.scorer(self.specs, groups.rows, self.num_generations, groups.texts, groups.lengths,
                                       groups.columns)
        groups.rewards, groups.per_fn = total, per_fn
        # rewards/errors, ... and rewards/NAME/errors, ...: the verifier failures, in total and by function
        groups.counts = {k.removeprefix("rewards/"): m[k] for k in m if k.endswith(("/errors", "/timeouts", "/crashes"))}

    def _updates(self, state, batch: Batch, step: int):
        """num_iterations passes over the batch, each in `minibatches` updates of a seeded shuffle.
        Metrics: the mean over the updates (`*_max` / `*_min`: the max / min)."""
        # All hosts' completions, or packed rows: a minibatch is a seeded draw of whole rows then.
        n, mb = batch["tokens" if self.packing else "completion_ids"].shape[0], self.minibatches
        all_metrics = []
        for it in range(self.num_iterations):
            order = np.random.default_rng([self.seed, step, it]).permutation(n) if mb > 1 else np.arange(n)
            for m in range(mb):
                idx = jnp.asarray(np.sort(order[m * n // mb:(m + 1) * n // mb]))
                part = jax.tree.map(lambda x: x[idx], batch) if mb > 1 else batch
                state, out = self.update_fn(state, part)
                all_metrics.append(out)
        all_metrics = [{k: float(v) for k, v in m.items()} for m in all_metrics]
        for m in all_metrics:
            self.nonfinite.observe(m["update_nonfinite"], step + 1)
        reduce = lambda k: max if k.endswith("_max") else min if k.endswith("_min") else np.mean
        return state, {k: float(reduce(k)([m[k] for m in all_metrics])) for k in all_metrics[0]}

    def trimmed_length(self, longest: int) -> int:
        """The completion length the update pads to: the smallest completion bucket (the prompt
        buckets below max_new_tokens, and max_new_tokens) that holds the longest completion."""
        s = self.policy.sampling
        return sampler.bucket_length(max(longest, 1), sampler.completion_buckets(s.prompt_buckets, s.max_new_tokens))

    def _sample_metrics(self, sampled: Groups) -> dict[str, float]:
        """Rewards and lengths of every completion sampled this step (all rounds; per-function
        rewards and verifier failures: this host's)."""
        total, lens = multihost.all_hosts(sampled.rewards), multihost.all_hosts(sampled.lengths).astype(np.float64)
        return {
            **scoring.reward_metrics(sampled.per_fn, sampled.counts),
            "data/skipped_rows": float(self.skipped_rows),
            "reward": float(total.mean()), "reward_std": float(total.std()),
            "completion_length/mean": lens.mean(), "completion_length/min": lens.min(),
            "completion_length/max": lens.max(), "completion_tokens": lens.sum(),
            "frac_truncated": float(multihost.all_hosts(sampled.truncated).mean()),
        }

    def summary(self, m: dict[str, float]) -> str:
        return f"reward {m['reward']:.3f} | kl {m.get('kl', 0):.4f} | len {m['completion_length/mean']:.1f}"
