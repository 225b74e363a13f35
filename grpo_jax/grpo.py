"""GRPO (DeepSeekMath, Shao et al. 2024): one step over a train state, top to bottom.

    rows -> rollout (G completions per prompt) -> scores (host verifiers) -> advantages -> update

    algo = GRPO.from_config(cfg, pol, scorer, task)
    state, metrics = algo.step(state)                       # one step, host and device
    state, metrics = update(state, batch, model_cfg=..., loss_cfg=..., mesh=..., num_microbatches=1, tx=tx)

`update` is the pure function the step jits and donates: the GRPO loss of `batch` (grpo_jax.objective,
grpo_jax.loss) and one optimizer step on the train state. The old policy of the clipped ratio is the
sampler's log-probabilities; the reference log-probabilities (beta > 0) come from `state.ref_params`,
the frozen policy the run started from, in micro-batches of the update's size (`reference_logprobs`).

Completions are trimmed to the bucket of the longest one before the reference pass and the update:
their cost follows the tokens sampled, not `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from grpo_jax import config
from grpo_jax import data
from grpo_jax import logprobs
from grpo_jax import loss
from grpo_jax import metrics
from grpo_jax import model
from grpo_jax import multihost
from grpo_jax import objective
from grpo_jax import policy
from grpo_jax import rewards
from grpo_jax import sampler
from grpo_jax import sharding
from grpo_jax import train_state

Batch = dict[str, jax.Array]
_SEQUENCES = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")


def update(state: train_state.TrainState, batch: Batch, *, model_cfg: model.ModelConfig, loss_cfg: loss.LossConfig,
           mesh, num_microbatches: int, tx) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
    """One optimizer step on the GRPO loss of `batch` (objective.loss_and_grad's batch layout); a
    non-finite loss or gradient leaves the state as it was (metrics["update_skipped"] = 1)."""
    loss_value, grads, out = objective.loss_and_grad(state.params, batch, model_cfg, loss_cfg, mesh, num_microbatches)
    state, opt_metrics = train_state.apply_gradients(state, grads, loss_value, tx)
    return state, {**out, **opt_metrics}


def reference_logprobs(ref_params: model.Params, batch: Batch, *, model_cfg: model.ModelConfig,
                       loss_cfg: loss.LossConfig, mesh, num_microbatches: int) -> jax.Array:
    """log π_ref(o_t | q, o_<t) [B, C] of the batch's completions, `num_microbatches` rows groups at a
    time (lax.map: one micro-batch's activations live at once, as in the update)."""
    def one(mb):
        return logprobs.completion_logprobs(ref_params, model_cfg, mb["prompt_ids"], mb["prompt_mask"],
                                            mb["completion_ids"], mb["completion_mask"], loss_cfg.temperature,
                                            loss_cfg.logprob_chunk, mesh=mesh)[0]

    if num_microbatches == 1:
        return one(batch)
    return objective.merge_microbatches(jax.lax.map(one, objective.split_microbatches(batch, num_microbatches)))


@dataclasses.dataclass
class GRPO:
    """The GRPO steps of a run: its prompts, reward functions and the jitted pieces of a step."""

    policy: policy.Policy  # tokenizer, mesh, prompt format and sampling; parameters come from the state
    scorer: rewards.Scorer
    specs: list[rewards.RewardSpec]
    prompts: data.PromptIterator
    loss_cfg: loss.LossConfig
    tx: Any
    schedule: Callable[[int], Any]
    num_generations: int
    num_iterations: int = 1
    minibatches: int = 1
    num_microbatches: int = 1
    seed: int = 0
    skipped_rows: int = 0
    samples_every: int = 0
    name = "GRPO"

    def __post_init__(self):
        statics = dict(model_cfg=self.policy.model_cfg, loss_cfg=self.loss_cfg, mesh=self.policy.mesh,
                       num_microbatches=self.num_microbatches, tx=self.tx)
        self.update_fn = jax.jit(functools.partial(update, **statics), donate_argnums=0)
        # The reference pass sees all of a step's rows at once: as many micro-batches as the
        # updates split them into, so that its activations are no larger than one update's.
        self.reference = jax.jit(functools.partial(
            reference_logprobs, model_cfg=self.policy.model_cfg, loss_cfg=self.loss_cfg, mesh=self.policy.mesh,
            num_microbatches=self.minibatches * self.num_microbatches))

    @classmethod
    def from_config(cls, cfg: ConfigDict, pol: policy.Policy, scorer: rewards.Scorer, task: data.Task) -> GRPO:
        g, hosts = cfg.grpo, jax.process_count()
        if g.prompts_per_step % hosts:
            raise ValueError(f"grpo.prompts_per_step={g.prompts_per_step} (global) does not split over {hosts} hosts")
        n, shards = g.prompts_per_step * g.num_generations, pol.mesh.shape["data"] * pol.mesh.shape["fsdp"]
        if n % (g.minibatches * g.microbatches * shards):
            raise ValueError(
                f"grpo.prompts_per_step x grpo.num_generations = {g.prompts_per_step} x {g.num_generations} = {n} "
                f"completions per step must split into grpo.minibatches={g.minibatches} x grpo.microbatches="
                f"{g.microbatches} parts of equal rows over the mesh's data x fsdp = {shards} devices (mesh.data, "
                f"mesh.fsdp); {n} is not a multiple of {g.minibatches * g.microbatches * shards}")
        tx, schedule = train_state.make_optimizer(cfg.optimizer, cfg.steps * g.num_iterations * g.minibatches)
        prompts = data.PromptIterator(task.train, g.prompts_per_step // hosts, seed=cfg.seed,
                                      host=jax.process_index(), num_hosts=hosts)
        return cls(pol, scorer, [rewards.RewardSpec(k, w) for k, w in cfg.rewards.items()], prompts,
                   config.loss_config(cfg), tx, schedule, g.num_generations, g.num_iterations, g.minibatches,
                   g.microbatches, cfg.seed, task.skipped, cfg.log.samples_every)

    @property
    def updates_per_step(self) -> int:
        return self.num_iterations * self.minibatches

    def initial_data(self) -> dict[str, int]:
        return self.prompts.state()

    def reference_params(self, params):
        """The frozen reference of the KL term: a copy of the starting policy, only when beta > 0."""
        return jax.tree.map(jnp.copy, params) if self.loss_cfg.beta > 0 else None

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
        rows, next_data = self.prompts.batch(state.data)
        rollout = self.policy.replace(params=state.params).rollout(rows, G, train_state.step_key(state))
        all_lengths = multihost.all_rows(rollout.lengths)
        C = self.trimmed_length(int(all_lengths.max()))
        batch = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
                 "completion_ids": rollout.tokens[:, :C], "completion_mask": rollout.mask[:, :C],
                 "truncated": rollout.truncated, "old_logp": rollout.logprobs[:, :C],
                 "sampler_logp": rollout.logprobs[:, :C]}
        if state.ref_params is not None:
            # Dispatched before the host scores: the device computes it while the verifiers run.
            batch["ref_logp"] = self.reference(state.ref_params, {k: batch[k] for k in _SEQUENCES})
        lengths = multihost.local_rows(rollout.lengths)  # this host's rows
        texts = self.policy.decode(multihost.local_rows(rollout.tokens), lengths)
        clock.lap("sampling")

        total, _, reward_metrics = self.scorer(self.specs, rows, G, texts, lengths)
        clock.lap("rewards")

        # The device runs in order: advantages computed there would wait for the reference pass.
        jax.block_until_ready(batch.get("ref_logp"))
        # Over every host's rewards: scale_rewards="batch" divides by the std of the global batch.
        advantages, adv_metrics = loss.compute_advantages(jnp.asarray(multihost.all_hosts(total)), G, self.loss_cfg)
        batch["advantages"] = multihost.place_rows(np.asarray(advantages), mesh)
        batch = sharding.shard_batch(batch, mesh)
        clock.lap("ref_logprobs")

        state, update_metrics = self._updates(state, batch, step)
        jax.block_until_ready(state.params)  # updates run asynchronously: time them, not their dispatch
        clock.lap("update")

        state = train_state.advance(state, next_data, mesh)
        out = self._metrics(update_metrics, adv_metrics, reward_metrics, total, all_lengths, rollout)
        out["completion_length/padded"] = float(C)
        out["learning_rate"] = float(self.schedule((step + 1) * self.updates_per_step))
        if self.samples_every and (step + 1) % self.samples_every == 0:
            out["samples"] = "\n\n".join(
                f"**prompt** {rows[i // G][self.policy.prompt.field]!r}\n**completion** {texts[i]!r}\n"
                f"**reward** {total[i]:.3f}" for i in range(min(4, len(texts))))
        return state, out

    def _updates(self, state, batch: Batch, step: int):
        """num_iterations passes over the batch, each in `minibatches` updates of a seeded shuffle."""
        n, mb = batch["completion_ids"].shape[0], self.minibatches  # all hosts' completions
        all_metrics = []
        for it in range(self.num_iterations):
            order = np.random.default_rng([self.seed, step, it]).permutation(n) if mb > 1 else np.arange(n)
            for m in range(mb):
                idx = jnp.asarray(np.sort(order[m * n // mb:(m + 1) * n // mb]))
                part = jax.tree.map(lambda x: x[idx], batch) if mb > 1 else batch
                state, out = self.update_fn(state, part)
                all_metrics.append(out)
        return state, {k: float(np.mean([float(m[k]) for m in all_metrics])) for k in all_metrics[0]}

    def trimmed_length(self, longest: int) -> int:
        """The completion length the update pads to: the smallest completion bucket (the prompt
        buckets below max_new_tokens, and max_new_tokens) that holds the longest completion."""
        s = self.policy.sampling
        return sampler.bucket_length(max(longest, 1), sampler.completion_buckets(s.prompt_buckets, s.max_new_tokens))

    def _metrics(self, update_metrics, adv_metrics, reward_metrics, total: np.ndarray, lengths: np.ndarray,
                 rollout) -> dict[str, float]:
        # Per-function reward metrics are this host's; the headline ones cover all hosts.
        total, lens = multihost.all_hosts(total), lengths.astype(np.float64)
        return {
            **update_metrics, **{k: float(v) for k, v in adv_metrics.items()}, **reward_metrics,
            "data/skipped_rows": float(self.skipped_rows),
            "reward": float(total.mean()), "reward_std": float(total.std()),
            "completion_length/mean": lens.mean(), "completion_length/min": lens.min(),
            "completion_length/max": lens.max(), "completion_tokens": lens.sum(),
            "frac_truncated": float(multihost.all_rows(rollout.truncated).mean()),
        }

    def summary(self, m: dict[str, float]) -> str:
        return f"reward {m['reward']:.3f} | kl {m.get('kl', 0):.4f} | len {m['completion_length/mean']:.1f}"
