"""The sampler/trainer mismatch of log-probabilities: metrics, and a capped importance-sampling fix.

The sampler reports log π_samp(o_t) of each token it drew; the trainer's own forward gives
log π_old(o_t) of the same tokens before any update. In float32 they agree to ~1e-7. In bfloat16
they differ by rounding (one token at a time against a KV cache, against a teacher-forced pass of the
whole sequence), so the completions were drawn from π_samp, not from the π_old the PPO ratio
assumes. grpo_jax never uses π_samp as the old policy (grpo_jax.rl.grpo): it measures the gap and,
if asked, reweights by the truncated importance weight of the trainer against the sampler

    token:     w_t = π_old(o_t) / π_samp(o_t) = exp(log π_old - log π_samp)
    sequence:  w_i = Π_t w_t = exp(Σ_t (log π_old - log π_samp))     (one weight per completion)

MODES (the names and semantics of TRL's `vllm_importance_sampling_mode`; verl's rollout correction
calls the same weights rollout_is="token" / "sequence" and the masks rejection sampling):

    token_truncate     w_t <- clip(w_t, C_min, C_max)                       TIS (Yao et al. 2025,
                       "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training")
    token_mask         w_t <- w_t if C_min <= w_t <= C_max else 0
    sequence_truncate  w_i <- clip(w_i, C_min, C_max)
    sequence_mask      w_i <- w_i if C_min <= w_i <= C_max else 0             MIS: drops the sequence

The weight multiplies the policy-gradient term of each token (not the KL term), as in TRL, and is
a constant (no gradient flows through it). Masked tokens stay in the aggregation's denominator.

Metrics (`mismatch/...`), over the completion tokens:
    logp_abs_diff_mean / _max   mean and max |log π_old - log π_samp|
    token_mult_prob_error       mean exp(|log π_old - log π_samp|)  (NeMo-RL; 1 is exact, it warns at 1.05)
    frac_outside_clip           tokens whose π_old / π_samp lies outside [1 - ε_low, 1 + ε_high]: what
                                PPO would clip on numerical noise had π_samp been the old policy
    seq_log_ratio_abs_max       max_i |mean_t (log π_old - log π_samp)|: the GSPO ratio's noise
    is_weight_mean, frac_corrected   the weights used and the fraction of tokens truncated or masked
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_weights(old_logp: Array, sampler_logp: Array, mask: Array, mode: str, cap_max: float | None,
                       cap_min: float | None = None) -> tuple[Array, Array]:
    """The capped weights [B, C] of `mode` (see the module docstring) and a [B, C] float flag of the
    tokens whose weight the cap changed (truncated or masked). Inputs are stop-gradient'ed.

    old_logp, sampler_logp: [B, C] log-probabilities of the same tokens; mask: [B, C] float."""
    if mode not in MODES:
        raise ValueError(f"rollout correction mode={mode!r}; expected one of {list(MODES)}")
    diff = jnp.where(mask > 0, jax.lax.stop_gradient(old_logp) - jax.lax.stop_gradient(sampler_logp), 0.0)
    if mode.startswith("sequence"):
        # Clamped before exp: a long completion's summed difference may overflow float32.
        diff = jnp.broadcast_to(diff.sum(axis=1, keepdims=True), diff.shape)
    w = jnp.exp(jnp.clip(diff, -80.0, 80.0))
    lo = -jnp.inf if cap_min is None else cap_min
    hi = jnp.inf if cap_max is None else cap_max
    outside = (w < lo) | (w > hi)
    w = jnp.clip(w, lo, hi) if mode.endswith("truncate") else jnp.where(outside, 0.0, w)
    return w, outside.astype(jnp.float32) * mask


def metrics(old_logp: Array, sampler_logp: Array, mask: Array, clip_low: float,
            clip_high: float) -> tuple[dict[str, tuple[Array, Array]], dict[str, Array]]:
    """The mismatch metrics as ({name: (sum, count)}, {name: max}), so that they add up exactly over
    micro-batches and shards (grpo_jax.rl.loss.Metrics)."""
    d = jnp.where(mask > 0, jax.lax.stop_gradient(old_logp) - jax.lax.stop_gradient(sampler_logp), 0.0)
    a = jnp.abs(d)
    n = mask.sum().astype(jnp.float32)
    outside = (d < jnp.log1p(-clip_low)) | (d > jnp.log1p(clip_high))
    seq = jnp.abs(d.sum(axis=1)) / jnp.maximum(mask.sum(axis=1), 1.0)
    means = {
        "mismatch/logp_abs_diff_mean": ((a * mask).sum(), n),
        "mismatch/token_mult_prob_error": ((jnp.exp(a) * mask).sum(), n),
        "mismatch/frac_outside_clip": ((outside * mask).sum(), n),
    }
    maxs = {"mismatch/logp_abs_diff_max": jnp.where(mask > 0, a, 0.0).max(initial=0.0),
            "mismatch/seq_log_ratio_abs_max": seq.max(initial=0.0)}
    return means, maxs
