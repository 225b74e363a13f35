"""The GRPO objective of a policy model, partitioned over a device mesh.

    loss, grads, metrics = loss_and_grad(params, batch, model_cfg, loss_cfg, mesh, num_microbatches=4)

The model forward runs under jit with the parameters and batch sharded by their NamedShardings (XLA
partitions it); the per-token loss math runs in a `shard_map` over the batch axes, each shard
computes its (sum, denominator) and metrics, and `psum` reduces them, so the normalisation is the
global one whatever the mesh. Gradient accumulation divides summed micro-batch gradients by the
denominator of the whole batch, so the result does not depend on the split either.

`batch` is a dict of arrays with a leading batch dimension [B, ...]:
    prompt_ids, prompt_mask            [B, P]  left-padded
    completion_ids, completion_mask    [B, C]  right-padded
    advantages                         [B]
    old_logp, ref_logp, sampler_logp   [B, C]  optional (see loss.grpo_loss_terms)
    truncated                          [B]     optional bool
    sampled_mask                       [B, C]  optional: multi-turn episodes' own tokens (observation
                                               tokens 0): the model reads every completion token, the
                                               loss only these (`loss_tokens`)
or a packed batch (grpo_jax.rl.packing): rows [R, T] that hold each group's prompt once, and the same
per-completion arrays in completion slots [R, S, ...], which the loss reads as [R * S, ...] rows
(`completions`; empty slots have completion_valid False and count for nothing).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import shard_map
from jax.sharding import Mesh, PartitionSpec as P

from grpo_jax.models import architecture
from grpo_jax.models import lora
from grpo_jax.parallel import partitioning
from grpo_jax.rl import logprobs
from grpo_jax.rl import loss

Batch = dict[str, jax.Array]
BATCH_AXES = partitioning.BATCH
_PER_TOKEN_INPUTS = ("old_logp", "ref_logp", "sampler_logp", "truncated", "completion_valid")
_PER_COMPLETION = ("advantages", "completion_mask", "sampled_mask", *_PER_TOKEN_INPUTS)


def is_packed(batch: Batch) -> bool:
    return "tokens" in batch


def completions(batch: Batch) -> Batch:
    """The per-completion arrays of a batch as [completions, ...] rows: a packed batch's slots
    [R, S, ...] flattened to [R * S, ...] (row r's slots stay together, so the rows' split over the
    mesh is the completions' split too); a padded batch as it is."""
    if not is_packed(batch):
        return batch
    return {k: batch[k].reshape(-1, *batch[k].shape[2:]) for k in _PER_COMPLETION if batch.get(k) is not None}


def loss_tokens(rows: Batch) -> jax.Array:
    """[B, C] the tokens every loss term, KL, correction, denominator and token metric counts: the
    completion's tokens, less a multi-turn episode's observation tokens (which the policy did not
    sample: no log-probability of theirs is trained, and none enters a normaliser)."""
    mask = rows["completion_mask"]
    return mask if rows.get("sampled_mask") is None else jnp.logical_and(mask, rows["sampled_mask"]).astype(mask.dtype)


def sharded_loss_terms(
    logp: jax.Array,
    entropy: jax.Array | None,
    batch: Batch,
    loss_cfg: loss.LossConfig,
    mesh: Mesh | None,
    batch_axes: tuple[str, ...] = BATCH_AXES,
) -> tuple[jax.Array, jax.Array, loss.Metrics]:
    """grpo_loss_terms over the batch shards of `mesh`, psum-reduced to global (sum, denom, metrics).
    logp, entropy: [B, C] as the rows of completions(batch)."""
    batch = completions(batch)
    inputs = {"logp": logp, "advantages": batch["advantages"], "completion_mask": loss_tokens(batch)}
    inputs.update({k: batch[k] for k in _PER_TOKEN_INPUTS if batch.get(k) is not None})
    if entropy is not None:
        inputs["entropy"] = entropy

    def local(x):
        s, d, m = loss.grpo_loss_terms(x.pop("logp"), x.pop("advantages"), x.pop("completion_mask"), loss_cfg, **x)
        if mesh is None:
            return s, d, m
        return jax.lax.psum(s, batch_axes), jax.lax.psum(d, batch_axes), m.psum(batch_axes)

    if mesh is None:
        return local(inputs)
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    return shard_map(local, mesh=mesh, in_specs=(P(axes),), out_specs=P())(inputs)


def policy_loss_terms(
    params: architecture.Params,
    batch: Batch,
    model_cfg: architecture.ModelConfig,
    loss_cfg: loss.LossConfig,
    mesh: Mesh | None = None,
    router_weight: jax.Array | float = 1.0,
) -> tuple[jax.Array, jax.Array, loss.Metrics]:
    """(loss_sum, denominator, metrics) of the policy `params` on `batch`.

    A mixture-of-experts policy with loss_cfg.router_aux_loss_coef > 0 adds router_weight x coef x
    its load-balancing loss to loss_sum (metric `router_balance_loss`): loss_and_grad sets
    router_weight = the batch's denominator / micro-batches, so that the final loss is the GRPO loss
    plus coef x the micro-batches' mean balance loss. Over a packed batch the balance loss counts
    each token once, a group's prompt once rather than G times (metric
    `router_balance_loss/prompt_once`)."""
    logp, entropy, balance = logprobs.batch_logprobs(params, model_cfg, batch, loss_cfg.temperature,
                                                     loss_cfg.logprob_chunk, with_entropy=True, mesh=mesh,
                                                     router_loss=True)
    if is_packed(batch):  # [R, S, C] slots -> [R * S, C] completions
        logp, entropy = logp.reshape(-1, logp.shape[-1]), entropy.reshape(-1, entropy.shape[-1])
    s, d, m = sharded_loss_terms(logp, entropy, batch, loss_cfg, mesh)
    if model_cfg.num_experts:
        s = s + router_weight * loss_cfg.router_aux_loss_coef * balance
        name = "router_balance_loss/prompt_once" if is_packed(batch) else "router_balance_loss"
        m = loss.Metrics({**m.sums, name: balance}, {**m.counts, name: jnp.ones((), jnp.float32)}, m.mins, m.maxs)
    return s, d, m


def split_microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B / n, ...], micro-batch k holding rows k, k + n, ... so that each one still
    spreads evenly over the data-parallel shards."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by num_microbatches={n}")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def merge_microbatches(x: jax.Array) -> jax.Array:
    """The inverse of split_microbatches for one array: [n, B / n, ...] -> [B, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def accumulate(fn, params: architecture.Params, batch: Batch, num_microbatches: int = 1):
    """The summed value, merged metrics and summed gradient of fn(params, micro-batch) -> (sum,
    loss.Metrics) over `num_microbatches` micro-batches of `batch` (one `lax.scan`; the gradient
    buffers are the only carry that grows with the model). Every loss here is a (sum, denominator)
    pair, so dividing the totals by the whole batch's denominator afterwards is exact. The buffers are
    float32 whatever the parameters are stored in: bfloat16 sums of many micro-batches lose the small
    ones.

    Returns ((total, metrics), grads)."""
    grad_fn = jax.value_and_grad(fn, has_aux=True)
    if num_microbatches == 1:
        return grad_fn(params, batch)
    micro = split_microbatches(batch, num_microbatches)
    (_, metrics_shape), _ = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
    carry = (jnp.zeros((), jnp.float32), loss.Metrics.identity_like(metrics_shape), zeros)

    def body(carry, mb):
        total, metrics, grads = carry
        (s, m), g = grad_fn(params, mb)
        return (total + s, metrics.merge(m), jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)), None

    (total, metrics, grads), _ = jax.lax.scan(body, carry, micro)
    return (total, metrics), grads


def loss_and_grad(
    params: architecture.Params,
    batch: Batch,
    model_cfg: architecture.ModelConfig,
    loss_cfg: loss.LossConfig,
    mesh: Mesh | None = None,
    num_microbatches: int = 1,
    frozen: architecture.Params | None = None,
) -> tuple[jax.Array, architecture.Params, dict[str, jax.Array]]:
    """Loss, gradient and finalised metrics of the whole batch, accumulated over micro-batches. With
    `frozen` (a LoRA run's base) `params` are the adapters and the gradient is theirs alone.

    Jit it with model_cfg, loss_cfg, mesh and num_microbatches static.
    """
    batch = {k: v for k, v in batch.items() if v is not None}
    rows = completions(batch)
    denom = loss.loss_denominator(loss_tokens(rows), rows.get("truncated"), loss_cfg, rows.get("completion_valid"))

    def partial_sum(p, mb):
        s, _, m = policy_loss_terms(lora.with_base(frozen, p), mb, model_cfg, loss_cfg, mesh, router_weight=denom / num_microbatches)
        return s, m

    (total, metrics), grads = accumulate(partial_sum, params, batch, num_microbatches)
    scale = 1.0 / jnp.maximum(denom, 1e-9)
    out = loss.finalize_metrics(metrics)
    out["loss"] = total * scale
    return total * scale, jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), out


def make_loss_and_grad(model_cfg: architecture.ModelConfig, loss_cfg: loss.LossConfig, mesh: Mesh | None = None,
                       num_microbatches: int = 1, **jit_kwargs: Any):
    """jax.jit(loss_and_grad) with the static settings bound: fn(params, batch)."""
    return jax.jit(functools.partial(loss_and_grad, model_cfg=model_cfg, loss_cfg=loss_cfg, mesh=mesh,
                                     num_microbatches=num_microbatches), **jit_kwargs)
