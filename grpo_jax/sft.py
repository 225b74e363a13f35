"""Supervised fine-tuning on prompt/completion pairs: the cold start, rejection-sampling SFT and
distillation from a teacher's traces (stages 1 and 3 of DeepSeek-R1, and its distilled models).

    trainer = SFTTrainer(cfg)      # cfg.trainer = "sft"; model, mesh, optimizer, checkpoints,
    trainer.run()                  # metrics and evaluation are TrainerBase's, as in GRPO

The loss is the negative log-likelihood of the completion tokens only (prompt tokens are context,
never targets), averaged over all completion tokens of the batch:

    L = - sum_{i,t} m_it log p(y_it | x_i, y_i<t) / sum_{i,t} m_it

kept as a (sum, token count) pair so that micro-batches add up to exactly the whole batch's loss.

`sft.data` lists comma-separated sources, mixed into one shuffled set:
    demonstrations      the first `sft.examples` training rows, completion = `sft.completion_format`
    rejection_samples   verified samples of the starting policy (grpo_jax.rejection), written once to
                        WORKDIR/rejection_samples.jsonl with its summary beside it
    FILE.jsonl|.json|.parquet or a hub dataset name: rows with the prompt field (`data.prompt_field`)
                        and `sft.completion_field` (e.g. a teacher's traces, for distillation)
Prompts get the run's template (`data.template`) exactly as in GRPO; completions end with EOS.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import data as D
from grpo_jax import model as M
from grpo_jax import sampler as S
from grpo_jax import sharding
from grpo_jax.logprobs import completion_logprobs
from grpo_jax.objective import split_microbatches
from grpo_jax.trainer import TrainerBase, apply_if_finite, global_rows

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


def make_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
               prompt_buckets: Sequence[int], completion_buckets: Sequence[int], min_prompt: int = 0,
               min_completion: int = 0) -> dict[str, np.ndarray]:
    """Left-padded prompts [B, P] and right-padded completions [B, C], each padded to the smallest
    bucket that fits the longest (and the `min_` lengths, which hosts agree on)."""
    ids, mask = S.pad_prompts(prompts, prompt_buckets, pad_id, min_length=min_prompt)
    C = S.bucket_length(max(min_completion, *(len(c) for c in completions)), completion_buckets)
    comp = np.full((len(completions), C), pad_id, np.int32)
    cmask = np.zeros((len(completions), C), bool)
    for i, c in enumerate(completions):
        comp[i, :len(c)], cmask[i, :len(c)] = c, True
    return {"prompt_ids": ids, "prompt_mask": mask, "completion_ids": comp, "completion_mask": cmask}


def completion_buckets(prompt_buckets: Sequence[int], max_tokens: int) -> tuple[int, ...]:
    """Completion lengths to pad to: the prompt buckets below `max_tokens`, and `max_tokens`."""
    return tuple(sorted({b for b in prompt_buckets if b < max_tokens} | {max_tokens}))


# --------------------------------------------------------------------------------------------------
# Loss and update (jitted)


def sft_loss_terms(params: M.Params, model_cfg: M.ModelConfig, batch: Batch, chunk: int = 1024) -> jax.Array:
    """Summed negative log-likelihood of the completion tokens of `batch` (the numerator of L)."""
    lp, _ = completion_logprobs(params, model_cfg, batch["prompt_ids"], batch["prompt_mask"],
                                batch["completion_ids"], batch["completion_mask"], 1.0, chunk)
    m = batch["completion_mask"].astype(jnp.float32)
    return -(lp * m).sum()


def sft_update(params, opt_state, batch: Batch, *, model_cfg: M.ModelConfig, tx, num_microbatches: int = 1,
               chunk: int = 1024):
    """One optimizer step on the mean completion-token NLL of `batch` (micro-batched: the summed
    gradients are divided by the whole batch's token count). A non-finite loss skips the update."""
    tokens = batch["completion_mask"].astype(jnp.float32).sum()
    denom = jnp.maximum(tokens, 1.0)
    if num_microbatches == 1:
        loss, grads = jax.value_and_grad(lambda p: sft_loss_terms(p, model_cfg, batch, chunk) / denom)(params)
    else:
        grad_fn = jax.value_and_grad(lambda p, mb: sft_loss_terms(p, model_cfg, mb, chunk))

        def body(carry, mb):
            total, grads = carry
            s, g = grad_fn(params, mb)
            return (total + s, jax.tree.map(jnp.add, grads, g)), None

        init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (total, grads), _ = jax.lax.scan(body, init, split_microbatches(batch, num_microbatches))
        loss, grads = total / denom, jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    params, opt_state, gnorm, ok = apply_if_finite(params, opt_state, grads, loss, tx)
    return params, opt_state, {"loss": loss, "grad_norm": gnorm, "tokens": tokens,
                               "update_skipped": (~ok).astype(jnp.float32)}


# --------------------------------------------------------------------------------------------------
# The trainer


@dataclasses.dataclass
class SFTTrainer(TrainerBase):
    """Supervised fine-tuning with the GRPO trainer's model, mesh, optimizer (`cfg.optimizer`,
    `cfg.steps`), checkpoints, metrics and evaluation; `sft.*` chooses the data."""

    name = "SFT"

    def __post_init__(self):
        super().__post_init__()
        c = self.cfg.sft
        if c.batch_size % jax.process_count():
            raise ValueError(f"sft.batch_size={c.batch_size} (global) does not split over {jax.process_count()} hosts")
        self.max_tokens = c.max_completion_tokens or self.cfg.grpo.max_new_tokens
        self.completion_buckets = completion_buckets(self.sampling.prompt_buckets, self.max_tokens)
        self._update = jax.jit(functools.partial(sft_update, model_cfg=self.model_cfg, tx=self.tx,
                                                 num_microbatches=c.microbatches,
                                                 chunk=self.cfg.grpo.logprob_chunk), donate_argnums=(0, 1))
        self._data = None
        self.sources: dict[str, int] = {}

    @property
    def data(self) -> D.PromptIterator:
        """The SFT rows, read on first use (`rejection_samples` samples the starting policy then)."""
        if self._data is None:
            rows = self.load_examples()
            hosts = jax.process_count()
            self._data = D.PromptIterator(rows, self.cfg.sft.batch_size // hosts, seed=self.cfg.seed + 11,
                                          host=jax.process_index(), num_hosts=hosts)
        return self._data

    def load_examples(self) -> list[dict]:
        """Every source of `sft.data`, as rows with the prompt field and `completion`."""
        c, field = self.cfg.sft, self.cfg.data.prompt_field
        rows = []
        for source in (s.strip() for s in c.data.split(",") if s.strip()):
            if source == "demonstrations":
                part = demonstrations(self.train_rows, c.completion_format, c.examples)
            elif source == "rejection_samples":
                from grpo_jax import rejection

                part = rejection.load_or_sample(self)
            else:
                part, skipped = D.load_rows(source, split=self.cfg.data.split, required=(field, c.completion_field))
                self.skipped_rows += skipped
                part = [{**r, "completion": r[c.completion_field]} for r in part]
            self.sources[source] = len(part)
            rows += part
        if not rows:
            raise ValueError(f"sft.data={c.data!r} gave no examples; expected 'demonstrations', "
                             "'rejection_samples' or a dataset with prompt and completion fields")
        return rows

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        rows = self.data.next()
        completions, cut = encode_completions(self.tokenizer, [r["completion"] for r in rows],
                                              self.sampling.eos_ids[0], self.max_tokens)
        prompts = self.prompt_ids(rows)
        lengths = (max(len(p) for p in prompts), max(len(c) for c in completions))
        if jax.process_count() > 1:  # every host pads to the same shapes, then rows form one global batch
            from jax.experimental import multihost_utils

            lengths = tuple(int(x) for x in np.max(multihost_utils.process_allgather(np.asarray(lengths)), 0))
        batch = make_batch(prompts, completions, self.sampling.pad_id, self.sampling.prompt_buckets,
                           self.completion_buckets, *lengths)
        rows_total = len(rows) * jax.process_count()
        if jax.process_count() > 1:
            batch = {k: global_rows(v, self.mesh) for k, v in batch.items()}
        elif rows_total % (self.mesh.shape["data"] * self.mesh.shape["fsdp"]) == 0:
            batch = jax.device_put(batch, {k: sharding.batch_sharding(self.mesh, v.ndim) for k, v in batch.items()})
        self.params, self.opt_state, metrics = self._update(self.params, self.opt_state, batch)
        out = {k: float(v) for k, v in metrics.items()}
        self.step += 1
        out.update({"learning_rate": float(self.lr_schedule(self.step)), "frac_cut": cut / len(rows),
                    "data/skipped_rows": float(self.skipped_rows), "time/update_s": time.perf_counter() - t0})
        return out

    def _before_training(self, say) -> None:
        rows = len(self.data.rows)  # reads (or samples) the data now, before the clock of step 1
        say(f"SFT on {rows} examples (" + ", ".join(f"{k}: {v}" for k, v in self.sources.items()) + ")")

    def _summary(self, m: dict[str, float]) -> str:
        return f"loss {m['loss']:.4f} | tokens {m['tokens']:.0f} | lr {m['learning_rate']:.2e}"

