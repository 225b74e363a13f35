"""Per-token log-probabilities and entropies of completions, without full-vocabulary logits in memory.

One function serves the policy (differentiable), the old policy and the frozen reference: all three
need log π(o_t | q, o_<t) under logits / temperature, the same distribution the sampler drew from.

The unembedding runs over chunks of `chunk` tokens inside a rematerialised scan, so the float32
logits that exist at any time are [chunk, vocab] (forward and backward), never
[batch, length, vocab] (4 B T V bytes, which for a 150k vocabulary outgrows the model itself).

On a mesh the scan runs inside a `shard_map` over the batch axes: each device takes its own rows
(chunk / (data x fsdp) tokens per step), so it runs the head on 1/(data x fsdp) of the batch and
accumulates its share of the head's gradient locally, reduced once after the scan. The head's vocab
axis stays split over tensor, with a vocab-parallel log-softmax (Megatron-LM, Shoeybi et al. 2019):
the max and the sum of exponentials are reduced over tensor, and each target's logit comes from the
device that holds it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import shard_map
from jax.sharding import Mesh, PartitionSpec as P

from grpo_jax.models import architecture
from grpo_jax.models import layers
from grpo_jax.models import transformer
from grpo_jax.parallel import partitioning

Array = jax.Array


def _log_softmax_at(logits: Array, targets: Array, with_entropy: bool, vocab_axis) -> tuple[Array, Array | None]:
    """log softmax(logits)[targets] and the entropy, for logits [n, V] or their vocab shard [n, V / tp]
    on the devices of `vocab_axis` (then the sums over the vocabulary span the shards)."""
    total = (lambda x: x) if vocab_axis is None else (lambda x: jax.lax.psum(x, vocab_axis))
    # The max only keeps exp() in range; lse does not depend on it, so no gradient flows through it.
    m = jax.lax.stop_gradient(logits).max(-1)
    if vocab_axis is not None:
        m = jax.lax.pmax(m, vocab_axis)
    e = jnp.exp(logits - m[:, None])
    z = total(e.sum(-1))
    lse = m + jnp.log(z)
    local, here = partitioning.shard_index(targets, vocab_axis, logits.shape[-1])
    picked = jnp.take_along_axis(logits, local[:, None], axis=-1)[:, 0]
    logp = total(jnp.where(here, picked, 0.0)) - lse
    if not with_entropy:
        return logp, None
    return logp, lse - total((e * logits).sum(-1)) / z


def _chunked(hidden: Array, head: Array, targets: Array, temperature: float, chunk: int, with_entropy: bool,
             vocab_axis=None, row_axes: tuple[str, ...] = (), gather_axis: str | None = None) -> tuple[Array, Array | None]:
    """token_logprobs on one device's rows: the tokens flattened and scanned `chunk` at a time.

    Inside the shard_map, the head's fsdp shards are all-gathered once (`gather_axis`; the transpose is
    a reduce-scatter of its gradient) and the head is cast to per-device ("varying") over the other
    row axes, so its gradient accumulates locally over the chunks and is reduced once, not per chunk."""
    if gather_axis:
        head = jax.lax.all_gather(head, gather_axis, axis=0, tiled=True)
    if row_axes:
        head = jax.lax.pcast(head, row_axes, to="varying")
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    n = h.shape[0]
    chunk = max(1, min(chunk, n))
    pad = -n % chunk
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk, h.shape[-1])
    t = jnp.pad(t, (0, pad)).reshape(-1, chunk)

    @jax.checkpoint  # backward recomputes each chunk's logits instead of storing them all
    def one_chunk(h_c, t_c):
        logits = layers.logits_from_hidden(head, h_c) / temperature  # [chunk, vocab (/ tp)] float32
        return _log_softmax_at(logits, t_c, with_entropy, vocab_axis)

    def body(_, xs):
        return None, one_chunk(*xs)

    _, (logp, ent) = jax.lax.scan(body, None, (h, t))
    logp = logp.reshape(-1)[:n].reshape(lead)
    ent = None if ent is None else ent.reshape(-1)[:n].reshape(lead)
    return logp, ent


def token_logprobs(
    hidden: Array,
    head: Array,
    targets: Array,
    temperature: float = 1.0,
    chunk: int = 1024,
    with_entropy: bool = False,
    mesh: Mesh | None = None,
) -> tuple[Array, Array | None]:
    """log softmax(hidden @ head / temperature)[targets], computed chunk by chunk.

    Args:
      hidden: [batch, ..., d] final hidden states (position t predicts targets[..., t]).
      head: [d, vocab] unembedding matrix.
      targets: [batch, ...] int token ids.
      temperature: the sampling temperature.
      chunk: tokens per scan step over the whole batch (each of the data x fsdp devices takes
        chunk / (data x fsdp) of its own rows' tokens).
      with_entropy: also return the entropy of each position's distribution.
      mesh: the (data, fsdp, expert, tensor) mesh (static under jit): rows stay split over the batch
        axes and the vocabulary over tensor.

    Returns:
      (logp [batch, ...] float32, entropy [batch, ...] float32 or None).
    """
    if mesh is None or mesh.size == 1:
        return _chunked(hidden, head, targets, temperature, chunk, with_entropy)
    rows = partitioning.row_axes(targets.shape[0], mesh)
    vocab = partitioning.to_mesh_spec(("activation_vocab",), head.shape[1:], mesh)[0]
    embed = partitioning.to_mesh_spec(("embed",), head.shape[:1], mesh)[0]
    row_axes = partitioning.mesh_axes(rows)
    if embed not in row_axes:  # gathered by shard_map instead (rows not split over fsdp)
        embed = None
    shards = math.prod(mesh.shape[a] for a in row_axes)
    local = functools.partial(_chunked, temperature=temperature, chunk=max(1, chunk // shards),
                              with_entropy=with_entropy, vocab_axis=vocab,
                              row_axes=tuple(a for a in row_axes if a != embed), gather_axis=embed)
    # The head enters in its stored layout and the compute dtype (each chunk casts it anyway): it is
    # all-gathered over fsdp in that dtype once per call, and its gradient accumulated in it.
    return shard_map(local, mesh=mesh, in_specs=(P(rows), P(embed, vocab), P(rows)),
                     out_specs=(P(rows), P(rows) if with_entropy else None))(hidden, head.astype(hidden.dtype), targets)


def completion_logprobs(
    params: architecture.Params,
    cfg: architecture.ModelConfig,
    prompt_ids: Array,
    prompt_mask: Array,
    completion_ids: Array,
    completion_mask: Array,
    temperature: float = 1.0,
    chunk: int = 1024,
    with_entropy: bool = False,
    mesh: Mesh | None = None,
    router_loss: bool = False,
) -> tuple[Array, Array | None] | tuple[Array, Array | None, Array]:
    """Log-probabilities [B, C] of completion tokens given their prompts, in one teacher-forced pass.

    Args:
      prompt_ids, prompt_mask: [B, P], left-padded prompts.
      completion_ids, completion_mask: [B, C], right-padded completions (mask 0 after EOS).
      temperature, chunk, with_entropy, mesh: as in token_logprobs (mesh: static under jit).
      router_loss: also return the MoE load-balancing loss of the pass (moe.router_balance_loss over
        prompt and completion tokens).

    Returns:
      (logp [B, C], entropy [B, C] or None), and the load-balancing loss [] when router_loss; values
      at padded positions are meaningless, mask them.
    """
    P = prompt_ids.shape[1]
    tokens = jnp.concatenate([prompt_ids, completion_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(bool)
    hidden, _, *balance = transformer.forward(params, cfg, tokens, mask, return_hidden=True, mesh=mesh,
                                        router_loss=router_loss)
    # The hidden state at position t predicts token t + 1.
    hidden = hidden[:, P - 1:-1]
    out = token_logprobs(hidden, transformer.output_head(params, cfg), completion_ids, temperature, chunk, with_entropy,
                         mesh)
    return (*out, *balance)


def packed_logprobs(
    params: architecture.Params,
    cfg: architecture.ModelConfig,
    batch: dict[str, Array],
    temperature: float = 1.0,
    chunk: int = 1024,
    with_entropy: bool = False,
    mesh: Mesh | None = None,
    router_loss: bool = False,
) -> tuple[Array, Array | None] | tuple[Array, Array | None, Array]:
    """completion_logprobs of a packed batch (grpo_jax.rl.packing): one pass over its rows [R, T],
    each group's prompt once, then the values read back into the completion slots [R, S, C].

    Each position's target is its own token and its hidden state is the one at `sources` (the
    token before it, or its prompt's last token), so the head runs once per row token; a slot's
    C values start at its `slot_start`. The MoE load-balancing loss (router_loss) counts every row
    token once: a group's prompt once, not G times as in the padded batch.

    Returns (logp [R, S, C], entropy [R, S, C] or None) and the balance loss when router_loss;
    values past a completion's length are meaningless, mask them."""
    tokens = batch["tokens"]
    hidden, _, *balance = transformer.forward(
        params, cfg, tokens, batch["pieces"] > 0, positions=batch["positions"], return_hidden=True, mesh=mesh,
        router_loss=router_loss, prefix_sharing=(batch["pieces"], batch["members"]))
    hidden = jnp.take_along_axis(hidden, batch["sources"][..., None], axis=1)
    logp, entropy = token_logprobs(hidden, transformer.output_head(params, cfg), tokens, temperature, chunk,
                                   with_entropy, mesh)
    R, S, C = batch["completion_mask"].shape
    where = jnp.minimum(batch["slot_start"][..., None] + jnp.arange(C), tokens.shape[1] - 1).reshape(R, S * C)
    slots = lambda x: jnp.take_along_axis(x, where, axis=1).reshape(R, S, C)  # noqa: E731
    return (slots(logp), None if entropy is None else slots(entropy), *balance)


def batch_logprobs(
    params: architecture.Params,
    cfg: architecture.ModelConfig,
    batch: dict[str, Array],
    temperature: float = 1.0,
    chunk: int = 1024,
    with_entropy: bool = False,
    mesh: Mesh | None = None,
    router_loss: bool = False,
):
    """The completions' log-probabilities of a padded batch ([B, C]: completion_logprobs) or of a
    packed one ([R, S, C]: packed_logprobs), whichever `batch` is."""
    if "tokens" in batch:
        return packed_logprobs(params, cfg, batch, temperature, chunk, with_entropy, mesh, router_loss)
    return completion_logprobs(params, cfg, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                               batch["completion_mask"], temperature, chunk, with_entropy, mesh, router_loss)
