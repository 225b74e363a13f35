"""The GRPO objective as pure functions of arrays.

For a prompt q with G completions o_1..o_G and rewards r_1..r_G (DeepSeekMath, Shao et al. 2024):

    J(θ) = E[ agg_{i,t} ( min(ρ_{i,t} A_i, clip(ρ_{i,t}, 1-ε_low, 1+ε_high) A_i) - β KL_{i,t} ) ]
    ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_old(o_{i,t} | q, o_{i,<t})

and the loss is -J. Every variant is a named pure function in a registry selected by `LossConfig`:

    ADVANTAGES    grpo | dr_grpo | rloo              how rewards become advantages
    KL_ESTIMATORS k1 | k2 | k3                       per-token estimate of KL(π_θ || π_ref)
    AGGREGATIONS  seq-mean-token-mean | token-mean | seq-mean-token-sum-norm

Aggregations return a (sum, denominator) pair whose denominator depends only on the masks. The
loss of a batch is sum / denominator, and summing both over any split of the batch (micro-batches,
data-parallel shards) gives exactly the value of the whole batch. Metrics follow the same rule: they
come as sums, counts, minima and maxima (`Metrics`) and are finalised once, after every reduction.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from grpo_jax.rl import rollout_correction

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static settings of the GRPO loss (hashable: a static argument of jit).

    Attributes:
      advantage_estimator: "grpo" (r - mean) / std, "dr_grpo" r - mean, "rloo" r - mean of the others.
      scale_rewards: divide advantages by the std of the "group", of the whole "batch", or "none";
        None picks the estimator's own choice ("group" for grpo, "none" for dr_grpo and rloo).
      std_ddof: the std of the advantages' denominator: 0, the default, the population std
        sqrt(Σ (r - mean)² / G); 1 the sample std sqrt(Σ (r - mean)² / (G - 1)), which is what TRL
        (torch.std), verl (torch.std) and Tunix (ddof=1) use. With 0, advantages are sqrt(G / (G - 1))
        times theirs (1.07 at G = 8), a constant scale that Adam's step hardly depends on; set 1 to
        reproduce TRL's, verl's or Tunix's advantages exactly.
      adv_eps: ε in (r - mean) / (std + ε).
      clip_eps_low, clip_eps_high: PPO clip range [1 - ε_low, 1 + ε_high]; ε_high defaults to ε_low
        (DAPO's clip-higher sets it larger, e.g. 0.28).
      dual_clip: c > 1 caps the loss of negative-advantage tokens at -c·A (dual-clip PPO); None: off.
      beta: KL coefficient; 0 means no reference model at all.
      kl_estimator: "k1", "k2" or "k3" (Schulman's estimators; k3 is what DeepSeek uses).
      aggregation: "seq-mean-token-mean" (GRPO), "token-mean" (DAPO), "seq-mean-token-sum-norm"
        (Dr. GRPO; needs max_completion_length).
      max_completion_length: the fixed length L of seq-mean-token-sum-norm.
      importance_level: "token" ratios (GRPO/PPO) or "sequence" (GSPO: one ratio per completion,
        exp of the mean token log-ratio).
      mask_truncated: drop completions that hit the length limit without EOS from the loss (DAPO's
        overlong filtering).
      temperature: sampling temperature; log-probabilities are computed from logits / temperature.
      logprob_chunk: tokens per chunk when computing log-probabilities from hidden states, so
        [batch, length, vocab] float32 logits never exist at once.
      rollout_correction: None, or how the trainer/sampler mismatch is corrected: one of
        grpo_jax.rl.rollout_correction.MODES ("token_truncate": TIS; "sequence_mask": MIS; ...). Needs
        the sampler's log-probabilities (`sampler_logp`).
      rollout_correction_max, rollout_correction_min: the caps C_max and C_min of the weights
        (None: no cap on that side).
      router_aux_loss_coef: for mixture-of-experts policies, the weight of the routers' load-balancing
        loss (moe.router_balance_loss, averaged over micro-batches) added to the GRPO loss, as
        TRL's GRPOTrainer adds it; 0 leaves the routers to the policy gradient alone. Qwen3-MoE was
        pre-trained with 0.001.
    """

    advantage_estimator: str = "grpo"
    scale_rewards: str | None = None
    std_ddof: int = 0
    adv_eps: float = 1e-4
    clip_eps_low: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    beta: float = 0.04
    kl_estimator: str = "k3"
    aggregation: str = "seq-mean-token-mean"
    max_completion_length: int | None = None
    importance_level: str = "token"
    mask_truncated: bool = False
    temperature: float = 1.0
    logprob_chunk: int = 1024
    rollout_correction: str | None = None
    rollout_correction_max: float | None = 2.0
    rollout_correction_min: float | None = None
    router_aux_loss_coef: float = 0.0

    def __post_init__(self):
        def one_of(name, value, allowed):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; expected one of {sorted(allowed, key=str)}")

        one_of("advantage_estimator", self.advantage_estimator, ADVANTAGES)
        one_of("scale_rewards", self.scale_rewards, {None, "group", "batch", "none"})
        one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        one_of("aggregation", self.aggregation, AGGREGATIONS)
        one_of("importance_level", self.importance_level, {"token", "sequence"})
        one_of("std_ddof", self.std_ddof, {0, 1})
        if self.aggregation == "seq-mean-token-sum-norm" and not self.max_completion_length:
            raise ValueError("aggregation='seq-mean-token-sum-norm' needs max_completion_length > 0, "
                             f"got {self.max_completion_length!r}")
        if not 0 <= self.clip_eps_low < 1 or (self.clip_eps_high is not None and self.clip_eps_high < 0):
            raise ValueError(f"clip range needs 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got "
                             f"clip_eps_low={self.clip_eps_low}, clip_eps_high={self.clip_eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip={self.dual_clip} must be > 1 (or None to disable)")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta} must be >= 0")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        one_of("rollout_correction", self.rollout_correction, {None, *rollout_correction.MODES})
        lo, hi = self.rollout_correction_min, self.rollout_correction_max
        if (lo is not None and lo < 0) or (hi is not None and hi <= 0) or (None not in (lo, hi) and lo >= hi):
            raise ValueError(f"rollout_correction_min={lo}, rollout_correction_max={hi}: expected "
                             "0 <= min < max (either may be None: no cap on that side)")

    @property
    def eps_high(self) -> float:
        return self.clip_eps_low if self.clip_eps_high is None else self.clip_eps_high

    @property
    def reward_scaling(self) -> str:
        if self.scale_rewards is not None:
            return self.scale_rewards
        return "group" if self.advantage_estimator == "grpo" else "none"


# --------------------------------------------------------------------------------------------------
# Advantages


def _center_group_mean(r: Array) -> Array:
    """r - mean(r) per group; r is [groups, G]."""
    return r - r.mean(axis=1, keepdims=True)


def _center_leave_one_out(r: Array) -> Array:
    """RLOO (Ahmadian et al. 2024): r_i - mean of the other G-1 rewards = G/(G-1) (r_i - mean)."""
    G = r.shape[1]
    if G < 2:
        raise ValueError(f"rloo needs at least 2 completions per prompt, got num_generations={G}")
    return r - (r.sum(axis=1, keepdims=True) - r) / (G - 1)


ADVANTAGES: dict[str, Callable[[Array], Array]] = {
    "grpo": _center_group_mean,
    "dr_grpo": _center_group_mean,  # Dr. GRPO (Liu et al. 2025): same centering, no std division
    "rloo": _center_leave_one_out,
}


def compute_advantages(rewards: Array, num_generations: int, cfg: LossConfig) -> tuple[Array, dict[str, Array]]:
    """Group-relative advantages.

    Args:
      rewards: [prompts * G] float, the G completions of each prompt adjacent.
      num_generations: G.
      cfg: estimator, reward scaling, std_ddof and eps.

    Returns:
      advantages [prompts * G] float32 and metrics: reward mean/std, frac_reward_zero_std (groups
      whose rewards are all equal: their advantages are exactly zero).
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % num_generations:
        raise ValueError(f"rewards of shape {rewards.shape} do not split into groups of "
                         f"num_generations={num_generations}")
    r = rewards.reshape(-1, num_generations)  # [groups, G]
    adv = ADVANTAGES[cfg.advantage_estimator](r)
    group_std = jnp.std(r, axis=1, keepdims=True, ddof=cfg.std_ddof) if num_generations > 1 else jnp.zeros_like(r[:, :1])
    scaling = cfg.reward_scaling
    if scaling == "group":
        adv = adv / (group_std + cfg.adv_eps)
    elif scaling == "batch":
        adv = adv / (jnp.std(rewards, ddof=cfg.std_ddof) + cfg.adv_eps)
    zero_std = r.max(axis=1, keepdims=True) == r.min(axis=1, keepdims=True)
    adv = jnp.where(zero_std, 0.0, adv)  # exact zeros, not rounding noise from the mean
    metrics = {
        "reward_mean": rewards.mean(),
        "reward_std": jnp.std(rewards),
        "reward_group_std_mean": group_std.mean(),
        "frac_reward_zero_std": zero_std.mean(),
    }
    return adv.reshape(-1), metrics


# --------------------------------------------------------------------------------------------------
# KL estimators: log_ratio = ref_logp - logp, estimates of KL(π_θ || π_ref) on samples from π_θ.

KL_ESTIMATORS: dict[str, Callable[[Array], Array]] = {
    "k1": lambda log_ratio: -log_ratio,
    "k2": lambda log_ratio: 0.5 * log_ratio ** 2,
    "k3": lambda log_ratio: jnp.exp(log_ratio) - log_ratio - 1.0,
}


# --------------------------------------------------------------------------------------------------
# Aggregations: per-token values [B, C], mask [B, C] and rows [B] (1 where a row holds a completion:
# 0 on the empty completion slots of a packed batch) -> (sum, denominator).


def _seq_mean_token_mean(x: Array, mask: Array, rows: Array, cfg: LossConfig) -> tuple[Array, Array]:
    """GRPO: (1/G) Σ_i (1/|o_i|) Σ_t x_{i,t}. Completions with no tokens count for nothing."""
    n = mask.sum(axis=1)
    per_seq = (x * mask).sum(axis=1) / jnp.maximum(n, 1)
    return per_seq.sum(), (n > 0).sum().astype(jnp.float32)


def _token_mean(x: Array, mask: Array, rows: Array, cfg: LossConfig) -> tuple[Array, Array]:
    """DAPO: Σ_{i,t} x_{i,t} / Σ_i |o_i| over the whole batch."""
    return (x * mask).sum(), mask.sum().astype(jnp.float32)


def _seq_mean_token_sum_norm(x: Array, mask: Array, rows: Array, cfg: LossConfig) -> tuple[Array, Array]:
    """Dr. GRPO: (1/G) Σ_i (1/L) Σ_t x_{i,t} with a fixed L = max_completion_length; every completion
    counts, even one the loss masks out entirely (mask_truncated)."""
    return (x * mask).sum() / cfg.max_completion_length, rows.sum()


AGGREGATIONS: dict[str, Callable[[Array, Array, Array, LossConfig], tuple[Array, Array]]] = {
    "seq-mean-token-mean": _seq_mean_token_mean,
    "token-mean": _token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


# --------------------------------------------------------------------------------------------------
# Metrics that reduce exactly over any split of the batch.


@dataclasses.dataclass
class Metrics:
    """sums/counts (means), mins and maxes; combine with `merge` or `psum`, read with `finalize`."""

    sums: dict[str, Array]
    counts: dict[str, Array]
    mins: dict[str, Array]
    maxs: dict[str, Array]

    @staticmethod
    def identity_like(m: Metrics) -> Metrics:
        """Metrics that `merge` leaves unchanged, shaped like m (arrays or ShapeDtypeStructs)."""
        big = jnp.finfo(jnp.float32).max
        fill = lambda v: lambda x: jnp.full(x.shape, v, x.dtype)
        return Metrics(jax.tree.map(fill(0), m.sums), jax.tree.map(fill(0), m.counts),
                       jax.tree.map(fill(big), m.mins), jax.tree.map(fill(-big), m.maxs))

    def merge(self, other: Metrics) -> Metrics:
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return Metrics(add(self.sums, other.sums), add(self.counts, other.counts),
                       jax.tree.map(jnp.minimum, self.mins, other.mins),
                       jax.tree.map(jnp.maximum, self.maxs, other.maxs))

    def psum(self, axis_name) -> Metrics:
        return Metrics(jax.lax.psum(self.sums, axis_name), jax.lax.psum(self.counts, axis_name),
                       jax.lax.pmin(self.mins, axis_name), jax.lax.pmax(self.maxs, axis_name))

    def finalize(self) -> dict[str, Array]:
        out = {k: self.sums[k] / jnp.maximum(self.counts[k], 1) for k in self.sums}
        out.update({k: v for k, v in self.mins.items()})
        out.update({k: v for k, v in self.maxs.items()})
        return out


jax.tree_util.register_dataclass(Metrics, data_fields=["sums", "counts", "mins", "maxs"], meta_fields=[])


def _masked_mean_parts(x: Array, mask: Array) -> tuple[Array, Array]:
    return (x * mask).sum(), mask.sum().astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# The loss


def loss_mask(completion_mask: Array, truncated: Array | None, cfg: LossConfig) -> Array:
    """Float [B, C] mask of the tokens that enter the loss (padding out; truncated rows out if asked)."""
    mask = completion_mask.astype(jnp.float32)
    if cfg.mask_truncated and truncated is not None:
        mask = mask * (1.0 - truncated.astype(jnp.float32))[:, None]
    return mask


def has_signal(advantages: Array, completion_mask: Array, truncated: Array | None, cfg: LossConfig) -> Array:
    """[] bool: does any completion in the loss carry a non-zero advantage? Without one the
    policy-gradient term is zero and the gradient is rounding noise (or the KL term alone)."""
    in_loss = loss_mask(completion_mask, truncated, cfg).sum(axis=1) > 0
    return jnp.any(in_loss & (advantages != 0))


def _rows(completion_mask: Array, completion_valid: Array | None) -> Array:
    """[B] float32: 1 for each row that holds a completion (all of them, unless completion_valid)."""
    if completion_valid is None:
        return jnp.ones(completion_mask.shape[:1], jnp.float32)
    return completion_valid.astype(jnp.float32)


def loss_denominator(completion_mask: Array, truncated: Array | None, cfg: LossConfig,
                     completion_valid: Array | None = None) -> Array:
    """The aggregation's denominator; it depends only on masks, so it can be computed for the whole
    batch before splitting it into micro-batches."""
    mask = loss_mask(completion_mask, truncated, cfg)
    return AGGREGATIONS[cfg.aggregation](jnp.zeros_like(mask), mask, _rows(mask, completion_valid), cfg)[1]


def grpo_loss_terms(
    logp: Array,
    advantages: Array,
    completion_mask: Array,
    cfg: LossConfig,
    *,
    old_logp: Array | None = None,
    ref_logp: Array | None = None,
    truncated: Array | None = None,
    entropy: Array | None = None,
    sampler_logp: Array | None = None,
    completion_valid: Array | None = None,
) -> tuple[Array, Array, Metrics]:
    """Per-token GRPO loss aggregated to a (sum, denominator) pair, plus mergeable metrics.

    Args:
      logp: [B, C] log π_θ of the completion tokens (temperature-scaled), differentiable.
      advantages: [B] one advantage per completion.
      completion_mask: [B, C] 1 for completion tokens, 0 for padding.
      cfg: the loss settings.
      old_logp: [B, C] log π_old, the trainer's own log-probabilities before the step's first update
        (grpo_jax.rl.grpo recomputes them when a batch serves several updates); None means on-policy:
        π_old = stop_gradient(π_θ), and the ratio is exactly 1 whatever the precision.
      ref_logp: [B, C] log π_ref of the frozen reference; needed when cfg.beta > 0.
      truncated: [B] bool, completions cut at the length limit without EOS.
      entropy: [B, C] per-token entropy of π_θ, only for metrics.
      sampler_logp: [B, C] log-probabilities the sampler reported: the mismatch metrics against
        π_old (grpo_jax.rl.rollout_correction) and, with cfg.rollout_correction, the capped importance
        weight π_old / π_samp of each token's policy-gradient term.
      completion_valid: [B] bool, the rows that hold a completion (a packed batch's completion slots,
        grpo_jax.rl.packing: empty ones count for nothing, in Dr. GRPO's denominator and the mean
        completion length too); None: every row.

    Returns:
      (loss_sum, denominator, metrics). The loss is loss_sum / denominator.
    """
    mask = loss_mask(completion_mask, truncated, cfg)
    logp = logp.astype(jnp.float32)
    A = advantages.astype(jnp.float32)[:, None]  # [B, 1]
    old = jax.lax.stop_gradient(logp) if old_logp is None else old_logp.astype(jnp.float32)

    log_ratio = logp - old
    if cfg.importance_level == "sequence":
        # GSPO (Zheng et al. 2025): s_i = exp(mean_t log ρ_{i,t}), one ratio per completion.
        n = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        log_ratio = jnp.broadcast_to((log_ratio * mask).sum(axis=1, keepdims=True) / n, logp.shape)
    # Masked positions may hold garbage (padding): keep exp() finite there.
    ratio = jnp.exp(jnp.where(mask > 0, log_ratio, 0.0))
    clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.eps_high)
    surrogate = jnp.minimum(ratio * A, clipped * A)
    if cfg.dual_clip is not None:
        surrogate = jnp.where(A < 0, jnp.maximum(surrogate, cfg.dual_clip * A), surrogate)

    sums, counts, mins, maxs = {}, {}, {}, {}

    def mean_metric(name, x):
        sums[name], counts[name] = _masked_mean_parts(x, mask)

    if sampler_logp is not None:
        means, highs = rollout_correction.metrics(old, sampler_logp.astype(jnp.float32), mask, cfg.clip_eps_low,
                                                  cfg.eps_high)
        for name, (total, n) in means.items():
            sums[name], counts[name] = total, n
        # The metric's name before grpo_jax.rl.rollout_correction, kept for existing dashboards.
        sums["sampler_logp_abs_diff"], counts["sampler_logp_abs_diff"] = means["mismatch/logp_abs_diff_mean"]
        maxs.update(highs)
    if cfg.rollout_correction is not None:
        if sampler_logp is None:
            raise ValueError(f"rollout_correction={cfg.rollout_correction!r} needs sampler_logp (the sampler's "
                             "log-probabilities of the completion tokens)")
        weight, corrected = rollout_correction.importance_weights(
            old, sampler_logp.astype(jnp.float32), mask, cfg.rollout_correction, cfg.rollout_correction_max,
            cfg.rollout_correction_min)
        surrogate = surrogate * weight
        mean_metric("mismatch/is_weight_mean", weight)
        mean_metric("mismatch/frac_corrected", corrected)
    per_token = -surrogate

    if cfg.beta > 0:
        if ref_logp is None:
            raise ValueError(f"beta={cfg.beta} > 0 needs ref_logp (log-probabilities of the reference)")
        kl = KL_ESTIMATORS[cfg.kl_estimator](jnp.where(mask > 0, ref_logp.astype(jnp.float32) - logp, 0.0))
        per_token = per_token + cfg.beta * kl
        mean_metric("kl", jax.lax.stop_gradient(kl))

    rows = _rows(completion_mask, completion_valid)
    loss_sum, denom = AGGREGATIONS[cfg.aggregation](per_token, mask, rows, cfg)

    r = jax.lax.stop_gradient(ratio)
    low = ((r < 1.0 - cfg.clip_eps_low) & (A < 0)).astype(jnp.float32)
    high = ((r > 1.0 + cfg.eps_high) & (A > 0)).astype(jnp.float32)
    mean_metric("clip_frac_low", low)
    mean_metric("clip_frac_high", high)
    mean_metric("clip_frac", jnp.maximum(low, high))
    mean_metric("ratio_mean", r)
    big = jnp.finfo(jnp.float32).max
    mins["ratio_min"] = jnp.where(mask > 0, r, big).min()
    maxs["ratio_max"] = jnp.where(mask > 0, r, -big).max()
    if entropy is not None:
        mean_metric("entropy", jax.lax.stop_gradient(entropy.astype(jnp.float32)))
    seq = (mask.sum(axis=1) > 0).astype(jnp.float32)
    a = advantages.astype(jnp.float32)
    sums["advantage_mean"], counts["advantage_mean"] = (a * seq).sum(), seq.sum()
    sums["advantage_sq_mean"], counts["advantage_sq_mean"] = (a * a * seq).sum(), seq.sum()
    sums["completion_length"], counts["completion_length"] = completion_mask.sum().astype(jnp.float32), rows.sum()
    return loss_sum, denom, Metrics(sums, counts, mins, maxs)


def finalize_metrics(metrics: Metrics) -> dict[str, Array]:
    """Means, minima and maxima, plus advantage_std from the first two moments."""
    out = metrics.finalize()
    out["advantage_std"] = jnp.sqrt(jnp.maximum(out.pop("advantage_sq_mean") - out["advantage_mean"] ** 2, 0.0))
    return out
