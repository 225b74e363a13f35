"""Supervised fine-tuning on prompt/completion pairs: the cold start, rejection-sampling SFT and
distillation from a teacher's traces (stages 1 and 3 of DeepSeek-R1, and its distilled models).

    trainer = Trainer(cfg)                 # cfg.trainer = "sft": grpo_jax.run.trainer runs these steps,
    trainer.run()                          # with checkpoints, metrics and evaluation as for GRPO
    state, metrics = update(state, batch, model_cfg=..., tx=tx)   # the pure, jitted step

The loss is the negative log-likelihood of the completion tokens only (prompt tokens are context,
never targets), averaged over all completion tokens of the batch:

    L = - sum_{i,t} m_it log p(y_it | x_i, y_i<t) / sum_{i,t} m_it

kept as a (sum, token count) pair so that micro-batches add up to exactly the whole batch's loss.

`sft.data` lists comma-separated sources, mixed into one shuffled set:
    demonstrations      the first `sft.examples` training rows, completion = `sft.completion_format`
    rejection_samples   verified samples of the starting policy (grpo_jax.rl.rejection), written once to
                        WORKDIR/rejection_samples.jsonl with its summary beside it
    FILE.jsonl|.json|.parquet or a hub dataset name: rows with the prompt field (`data.prompt_field`)
                        and `sft.completion_field` (e.g. a teacher's traces, for distillation)
Prompts get the run's template (`data.template`) exactly as in GRPO; completions end with EOS.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from grpo_jax.common import data
from grpo_jax.common import metrics
from grpo_jax.models import architecture
from grpo_jax.models import lora
from grpo_jax.parallel import multihost
from grpo_jax.rewards import scoring
from grpo_jax.rl import logprobs
from grpo_jax.rl import loss
from grpo_jax.rl import objective
from grpo_jax.rl import rejection
from grpo_jax.rl import train_state
from grpo_jax.rollout import policy
from grpo_jax.rollout import sampler
from grpo_jax.rollout import tool_formats

Batch = dict[str, jax.Array]


# --------------------------------------------------------------------------------------------------
# Data


def demonstrations(rows: Sequence[dict], completion_format: str, examples: int = 0) -> list[dict]:
    """The first `examples` rows (0: all), each with `completion` = completion_format.format(**row)."""
    chosen = rows[:examples] if examples else rows
    return [{**r, "completion": completion_format.format(**r)} for r in chosen]


def encode_completions(tokenizer, texts: Sequence[str], eos_id: int, max_tokens: int) -> tuple[list[list[int]], int]:
    """Token ids of each completion followed by EOS, cut at `max_tokens`; and how many were cut
    (a cut completion keeps no EOS: it must not learn to stop where the trace did not)."""
    out, cut = [], 0
    for text in texts:
        ids = list(tokenizer.encode(text, add_special_tokens=False)) + [eos_id]
        cut += len(ids) > max_tokens
        out.append(ids[:max_tokens])
    return out, cut


def encode_episodes(tokenizer, texts: Sequence[str], eos_id: int, max_tokens: int,
                    tool_format: tool_formats.Format) -> tuple[list[list[int]], int, list[list[bool]]]:
    """`encode_completions` for tool-using demonstrations, and which tokens are targets: each
    observation (`tool_format.split`) is tokenised on its own, boundary and result apart, as the
    multi-turn sampler feeds it, and is context, not a target."""
    enc = lambda s: list(tokenizer.encode(s, add_special_tokens=False)) if s else []
    out, targets, cut = [], [], 0
    for text in texts:
        ids, target = [], []
        for piece, results in tool_format.split(text):
            # An observation: its boundaries and each result tokenised alone, as the sampler feeds them.
            part = enc(piece) if results is None else \
                tool_format.observation_ids(enc, [enc(tool_format.escape(r)) for r in results])
            ids += part
            target += [results is None] * len(part)
        ids, target = ids + [eos_id], target + [True]
        cut += len(ids) > max_tokens
        out.append(ids[:max_tokens])
        targets.append(target[:max_tokens])
    return out, cut, targets


def make_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
               prompt_buckets: Sequence[int], completion_buckets: Sequence[int], min_prompt: int = 0,
               min_completion: int = 0, targets: Sequence[Sequence[bool]] | None = None) -> dict[str, np.ndarray]:
    """Left-padded prompts [B, P] and right-padded completions [B, C], each padded to the smallest
    bucket that fits the longest (and the `min_` lengths, which hosts agree on); with `targets`,
    `sampled_mask` [B, C] marks the tokens the loss trains (a tool episode's observations are not)."""
    ids, mask = sampler.pad_prompts(prompts, prompt_buckets, pad_id, min_length=min_prompt)
    C = sampler.bucket_length(max(min_completion, *(len(c) for c in completions)), completion_buckets)
    comp = np.full((len(completions), C), pad_id, np.int32)
    cmask = np.zeros((len(completions), C), bool)
    for i, c in enumerate(completions):
        comp[i, :len(c)], cmask[i, :len(c)] = c, True
    out = {"prompt_ids": ids, "prompt_mask": mask, "completion_ids": comp, "completion_mask": cmask}
    if targets is not None:
        out["sampled_mask"] = np.zeros((len(completions), C), bool)
        for i, t in enumerate(targets):
            out["sampled_mask"][i, :len(t)] = t
    return out


# --------------------------------------------------------------------------------------------------
# Loss and update (jitted)


def sft_loss_terms(params: architecture.Params, model_cfg: architecture.ModelConfig, batch: Batch, chunk: int = 1024) -> jax.Array:
    """Summed negative log-likelihood of the completion tokens of `batch` (the numerator of L)."""
    lp, _ = logprobs.completion_logprobs(params, model_cfg, batch["prompt_ids"], batch["prompt_mask"],
                                         batch["completion_ids"], batch["completion_mask"], 1.0, chunk)
    return -(lp * objective.loss_tokens(batch).astype(jnp.float32)).sum()


def update(state: train_state.TrainState, batch: Batch, *, model_cfg: architecture.ModelConfig, tx,
           num_microbatches: int = 1, chunk: int = 1024) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
    """One optimizer step on the mean completion-token NLL of `batch`: each micro-batch's summed NLL
    over the whole batch's token count (grpo_jax.rl.objective.accumulate). A non-finite loss or
    gradient leaves the state as it was."""
    tokens = objective.loss_tokens(batch).astype(jnp.float32).sum()  # a tool episode's observations are context
    denom = jnp.maximum(tokens, 1.0)
    no_metrics = loss.Metrics({}, {}, {}, {})
    (loss_value, _), grads = objective.accumulate(
        lambda p, mb: (sft_loss_terms(lora.with_base(state.frozen, p), model_cfg, mb, chunk) / denom, no_metrics),
        state.params, batch, num_microbatches)
    state, opt_metrics = train_state.apply_gradients(state, grads, loss_value, tx)
    return state, {"loss": loss_value, "tokens": tokens, **opt_metrics}


# Jitted once: SFT runs with the same model, optimizer and sizes share the compiled update.
update_jit = jax.jit(update, static_argnames=("model_cfg", "tx", "num_microbatches", "chunk"), donate_argnums=0)


# --------------------------------------------------------------------------------------------------
# The SFT steps of a run


@dataclasses.dataclass
class SFT:
    """Supervised fine-tuning steps on `sft.data` (read when first needed: `rejection_samples`
    samples the starting policy then), with the run's optimizer (`cfg.optimizer`, `cfg.steps`)."""

    cfg: ConfigDict
    policy: policy.Policy  # tokenizer, mesh, prompt format; parameters come from the state
    scorer: scoring.Scorer
    task: data.Task
    workdir: str
    name = "SFT"
    updates_per_step = 1

    def __post_init__(self):
        c, hosts = self.cfg.sft, jax.process_count()
        if c.batch_size % hosts:
            raise ValueError(f"sft.batch_size={c.batch_size} (global) does not split over {hosts} hosts")
        self.tx, _ = train_state.make_optimizer(self.cfg.optimizer, self.cfg.steps)
        self.max_tokens = c.max_completion_tokens or self.policy.sampling.max_new_tokens
        self.completion_buckets = sampler.completion_buckets(self.policy.sampling.prompt_buckets, self.max_tokens)
        self.update_fn = functools.partial(update_jit, model_cfg=self.policy.model_cfg, tx=self.tx,
                                           num_microbatches=c.microbatches, chunk=self.cfg.grpo.logprob_chunk)
        self.skipped_rows = self.task.skipped
        self.nonfinite = train_state.NonFiniteStop(self.cfg.optimizer.max_nonfinite_updates)
        self.sources: dict[str, int] = {}
        self._examples: data.PromptIterator | None = None

    @classmethod
    def from_config(cls, cfg: ConfigDict, pol: policy.Policy, scorer: scoring.Scorer, task: data.Task) -> SFT:
        return cls(cfg, pol, scorer, task, cfg.workdir)

    def initial_data(self) -> dict[str, int]:
        return {"epoch": 0, "position": 0, "seed": self.cfg.seed + 11}

    def reference_params(self, params):
        return None

    def examples(self, state: train_state.TrainState) -> data.PromptIterator:
        """The SFT rows, read on first use (`rejection_samples` samples the state's policy then)."""
        if self._examples is None:
            rows = self.load_examples(self.policy.replace(params=train_state.policy_params(state)))
            hosts = jax.process_count()
            self._examples = data.PromptIterator(rows, self.cfg.sft.batch_size // hosts, seed=self.cfg.seed + 11,
                                                 host=jax.process_index(), num_hosts=hosts)
        return self._examples

    def load_examples(self, pol: policy.Policy) -> list[dict]:
        """Every source of `sft.data`, as rows with the prompt field and `completion`."""
        c, field = self.cfg.sft, self.cfg.data.prompt_field
        rows = []
        for source in (s.strip() for s in c.data.split(",") if s.strip()):
            if source == "demonstrations":
                part = demonstrations(self.task.train, c.completion_format, c.examples)
            elif source == "rejection_samples":
                part = rejection.load_or_sample(pol, self.scorer, self.cfg, self.task.train, self.workdir)
            else:
                part, skipped = data.load_rows(source, split=self.cfg.data.split, required=(field, c.completion_field))
                long = set(self.policy.too_long(part))
                part = [r for i, r in enumerate(part) if i not in long]
                self.skipped_rows += skipped + len(long)
                part = [{**r, "completion": r[c.completion_field]} for r in part]
            self.sources[source] = len(part)
            rows += part
        if not rows:
            raise ValueError(f"sft.data={c.data!r} gave no examples; expected 'demonstrations', "
                             "'rejection_samples' or a dataset with prompt and completion fields")
        return rows

    def before_training(self, state: train_state.TrainState, say) -> None:
        rows = len(self.examples(state).rows)  # reads (or samples) the data now, before step 1's clock
        say(f"SFT on {rows} examples (" + ", ".join(f"{k}: {v}" for k, v in self.sources.items()) + ")")

    def batch(self, rows: Sequence[dict]) -> tuple[dict[str, np.ndarray], int]:
        """This host's rows as a padded batch (every host pads to the same shapes), and how many
        completions were cut at the token limit."""
        texts, tools, targets = [r["completion"] for r in rows], self.policy.tools, None
        if tools is None:
            completions, cut = encode_completions(self.policy.tokenizer, texts, self.policy.sampling.eos_ids[0],
                                                  self.max_tokens)
        else:  # demonstrations of tool use: their observations are not targets
            completions, cut, targets = encode_episodes(self.policy.tokenizer, texts, self.policy.sampling.eos_ids[0],
                                                        self.max_tokens, tools.format)
        prompts = self.policy.prompt_ids(rows)
        lengths = multihost.host_max((max(len(p) for p in prompts), max(len(c) for c in completions)))
        return make_batch(prompts, completions, self.policy.sampling.pad_id, self.policy.sampling.prompt_buckets,
                          self.completion_buckets, *lengths, targets=targets), cut

    def step(self, state: train_state.TrainState,
             clock: metrics.Stopwatch | None = None) -> tuple[train_state.TrainState, dict[str, Any]]:
        """One step: the next batch of examples, one update on their completion-token NLL."""
        clock = clock or metrics.Stopwatch()
        rows, next_data = self.examples(state).batch(state.data)
        batch, cut = self.batch(rows)
        state, out = self.update_fn(state, multihost.global_batch(batch, self.policy.mesh))
        out = {k: float(v) for k, v in out.items()}
        clock.lap("update")
        state = train_state.advance(state, next_data, self.policy.mesh)
        self.nonfinite.observe(out["update_nonfinite"], int(state.step))
        out.update({"frac_cut": cut / len(rows), "data/skipped_rows": float(self.skipped_rows)})
        return state, out

    def summary(self, m: dict[str, float]) -> str:
        return f"loss {m['loss']:.4f} | tokens {m['tokens']:.0f} | lr {m['learning_rate']:.2e}"
