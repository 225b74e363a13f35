"""Per-token log-probabilities and entropies of completions, without full-vocabulary logits in memory.

One function serves the policy (differentiable), the old policy and the frozen reference: all three
need log π(o_t | q, o_<t) under logits / temperature, the same distribution the sampler drew from.

The unembedding runs over chunks of `chunk` tokens inside a rematerialised scan, so the float32
logits that exist at any time are [chunk, vocab] (forward and backward), never
[batch, length, vocab]: for Qwen2.5's 152k vocabulary, 64 x 512 completion tokens would otherwise be
20 GB of logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grpo_jax import model

Array = jax.Array


def token_logprobs(
    hidden: Array,
    head: Array,
    targets: Array,
    temperature: float = 1.0,
    chunk: int = 1024,
    with_entropy: bool = False,
) -> tuple[Array, Array | None]:
    """log softmax(hidden @ head / temperature)[targets], computed chunk by chunk.

    Args:
      hidden: [..., d] final hidden states (position t predicts targets[t]).
      head: [d, vocab] unembedding matrix.
      targets: [...] int token ids.
      temperature: the sampling temperature.
      chunk: tokens per chunk.
      with_entropy: also return the entropy of each position's distribution.

    Returns:
      (logp [...] float32, entropy [...] float32 or None).
    """
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
        logits = model.logits_from_hidden(head, h_c) / temperature  # [chunk, vocab] float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0] - lse
        if not with_entropy:
            return logp, None
        probs = jax.nn.softmax(logits, axis=-1)
        return logp, lse - (probs * logits).sum(-1)

    def body(_, xs):
        return None, one_chunk(*xs)

    _, (logp, ent) = jax.lax.scan(body, None, (h, t))
    logp = logp.reshape(-1)[:n].reshape(lead)
    ent = None if ent is None else ent.reshape(-1)[:n].reshape(lead)
    return logp, ent


def completion_logprobs(
    params: model.Params,
    cfg: model.ModelConfig,
    prompt_ids: Array,
    prompt_mask: Array,
    completion_ids: Array,
    completion_mask: Array,
    temperature: float = 1.0,
    chunk: int = 1024,
    with_entropy: bool = False,
) -> tuple[Array, Array | None]:
    """Log-probabilities [B, C] of completion tokens given their prompts, in one teacher-forced pass.

    Args:
      prompt_ids, prompt_mask: [B, P], left-padded prompts.
      completion_ids, completion_mask: [B, C], right-padded completions (mask 0 after EOS).
      temperature, chunk, with_entropy: as in token_logprobs.

    Returns:
      (logp [B, C], entropy [B, C] or None); values at padded positions are meaningless, mask them.
    """
    P = prompt_ids.shape[1]
    tokens = jnp.concatenate([prompt_ids, completion_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(bool)
    hidden, _ = model.forward(params, cfg, tokens, mask, return_hidden=True)
    # The hidden state at position t predicts token t + 1.
    hidden = hidden[:, P - 1:-1]
    return token_logprobs(hidden, model.output_head(params, cfg), completion_ids, temperature, chunk, with_entropy)
