"""The GRPO formulas against a plain NumPy reference written from the formulas, and their behaviour."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.rl import loss

# --------------------------------------------------------------------------------------------------
# Independent reference: loops and NumPy, straight from the formulas in the issue / papers.


def ref_advantages(rewards, G, estimator, scale, ddof, eps):
    r = np.asarray(rewards, np.float64).reshape(-1, G)
    out = np.zeros_like(r)
    batch_std = np.std(np.asarray(rewards, np.float64), ddof=ddof)
    for g in range(r.shape[0]):
        row = r[g]
        for i in range(G):
            if estimator in ("grpo", "dr_grpo"):
                a = row[i] - row.mean()
            else:  # rloo: minus the mean of the other G-1 rewards
                a = row[i] - (row.sum() - row[i]) / (G - 1)
            if scale == "group":
                a /= np.std(row, ddof=ddof) + eps
            elif scale == "batch":
                a /= batch_std + eps
            out[g, i] = 0.0 if np.all(row == row[0]) else a
    return out.reshape(-1)


def ref_loss(logp, old, ref, adv, mask, truncated, *, eps_low, eps_high, dual_clip, beta, kl, agg, L_max,
             level, mask_truncated):
    B, C = logp.shape
    m = mask.astype(np.float64).copy()
    if mask_truncated:
        m[truncated] = 0.0
    per_tok = np.zeros((B, C))
    for i in range(B):
        n = m[i].sum()
        seq_log_ratio = sum((logp[i, t] - old[i, t]) for t in range(C) if m[i, t]) / max(n, 1)
        for t in range(C):
            if not m[i, t]:
                continue
            rho = np.exp(seq_log_ratio if level == "sequence" else logp[i, t] - old[i, t])
            A = adv[i]
            obj = min(rho * A, np.clip(rho, 1 - eps_low, 1 + eps_high) * A)
            if dual_clip is not None and A < 0:
                obj = max(obj, dual_clip * A)
            x = ref[i, t] - logp[i, t]
            k = {"k1": -x, "k2": x * x / 2, "k3": np.exp(x) - x - 1}[kl]
            per_tok[i, t] = -obj + beta * k
    if agg == "token-mean":
        return per_tok.sum() / m.sum()
    if agg == "seq-mean-token-mean":
        seqs = [per_tok[i].sum() / m[i].sum() for i in range(B) if m[i].sum() > 0]
        return sum(seqs) / len(seqs)
    return sum(per_tok[i].sum() / L_max for i in range(B)) / B


def random_batch(seed, B=6, C=9, spread=0.4):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 4.0, size=(B, C))
    old = logp + rng.normal(0, spread, size=(B, C))  # ratios on both sides of the clip range
    ref = logp + rng.normal(0, spread, size=(B, C))
    adv = rng.normal(size=B)
    lengths = rng.integers(1, C + 1, size=B)
    mask = np.arange(C)[None] < lengths[:, None]
    truncated = lengths == C
    truncated[0] = False  # keep at least one row in the loss when masking truncated rows
    return logp, old, ref, adv, mask, truncated


# --------------------------------------------------------------------------------------------------
# Formulas


@pytest.mark.parametrize("estimator,scale,ddof", list(itertools.product(
    ["grpo", "dr_grpo", "rloo"], [None, "group", "batch", "none"], [0, 1])))
def test_advantages_match_reference(estimator, scale, ddof):
    rng = np.random.default_rng(0)
    G = 4
    rewards = rng.choice([0.0, 0.5, 1.0], size=5 * G)
    rewards[:G] = 1.0  # one group with identical rewards
    cfg = loss.LossConfig(advantage_estimator=estimator, scale_rewards=scale, std_ddof=ddof, adv_eps=1e-4)
    adv, metrics = loss.compute_advantages(jnp.asarray(rewards), G, cfg)
    effective = scale or {"grpo": "group", "dr_grpo": "none", "rloo": "none"}[estimator]
    want = ref_advantages(rewards, G, estimator, effective, ddof, 1e-4)
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-6)
    zero_std_groups = np.mean([np.all(g == g[0]) for g in rewards.reshape(-1, G)])
    assert float(metrics["frac_reward_zero_std"]) == pytest.approx(zero_std_groups)
    assert np.all(np.asarray(adv[:G]) == 0.0)


def test_seed_example_advantages():
    """The seeds' example group [1.0, 0.0, 0.5, 0.8]: mean 0.575, population std 0.3767."""
    adv, _ = loss.compute_advantages(jnp.asarray([1.0, 0.0, 0.5, 0.8]), 4, loss.LossConfig(adv_eps=0.0))
    r = np.array([1.0, 0.0, 0.5, 0.8])
    np.testing.assert_allclose(np.asarray(adv), (r - r.mean()) / r.std(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adv), [1.1284, -1.5266, -0.1991, 0.5974], atol=1e-4)


LOSS_CASES = [
    dict(agg=agg, kl=kl, level=level)
    for agg in loss.AGGREGATIONS for kl in loss.KL_ESTIMATORS for level in ("token", "sequence")
] + [
    dict(agg="token-mean", kl="k3", level="token", eps_high=0.28),  # DAPO clip-higher
    dict(agg="seq-mean-token-mean", kl="k3", level="token", dual_clip=3.0),
    dict(agg="token-mean", kl="k2", level="token", mask_truncated=True),
    dict(agg="seq-mean-token-sum-norm", kl="k1", level="token", beta=0.0, mask_truncated=True),
]


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_reference(case, seed):
    logp, old, ref, adv, mask, truncated = random_batch(seed)
    C = logp.shape[1]
    kw = dict(eps_low=0.2, eps_high=case.get("eps_high", 0.2), dual_clip=case.get("dual_clip"),
              beta=case.get("beta", 0.04), kl=case["kl"], agg=case["agg"], L_max=C + 3, level=case["level"],
              mask_truncated=case.get("mask_truncated", False))
    want = ref_loss(logp, old, ref, adv, mask, truncated, **kw)
    cfg = loss.LossConfig(clip_eps_low=0.2, clip_eps_high=case.get("eps_high"), dual_clip=kw["dual_clip"],
                       beta=kw["beta"], kl_estimator=kw["kl"], aggregation=kw["agg"], max_completion_length=C + 3,
                       importance_level=kw["level"], mask_truncated=kw["mask_truncated"])
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    # Garbage at padded positions must not leak into the loss.
    junk = np.where(mask, logp, 50.0)
    s, d, metrics = loss.grpo_loss_terms(f32(junk), f32(adv), jnp.asarray(mask), cfg, old_logp=f32(old),
                                      ref_logp=f32(ref), truncated=jnp.asarray(truncated))
    np.testing.assert_allclose(float(s / d), want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(d), float(loss.loss_denominator(jnp.asarray(mask), jnp.asarray(truncated), cfg)))


def test_metrics_match_reference():
    logp, old, ref, adv, mask, _ = random_batch(3, B=8, C=12, spread=0.5)
    cfg = loss.LossConfig(clip_eps_low=0.2, clip_eps_high=0.3)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    entropy = np.random.default_rng(0).uniform(0, 3, size=logp.shape)
    sampler = old + np.random.default_rng(1).normal(0, 0.15, size=logp.shape)
    _, _, m = loss.grpo_loss_terms(f32(logp), f32(adv), jnp.asarray(mask), cfg, old_logp=f32(old), ref_logp=f32(ref),
                                entropy=f32(entropy), sampler_logp=f32(sampler))
    m = {k: float(v) for k, v in loss.finalize_metrics(m).items()}
    rho = np.exp(logp - old)[mask]
    A = np.broadcast_to(adv[:, None], logp.shape)[mask]
    low, high = (rho < 0.8) & (A < 0), (rho > 1.3) & (A > 0)
    x = (ref - logp)[mask]
    want = {
        "clip_frac_low": low.mean(), "clip_frac_high": high.mean(), "clip_frac": (low | high).mean(),
        "ratio_mean": rho.mean(), "ratio_min": rho.min(), "ratio_max": rho.max(),
        "kl": (np.exp(x) - x - 1).mean(), "entropy": entropy[mask].mean(),
        # The mismatch is the trainer's old policy against the sampler (not the moving π_θ).
        "mismatch/logp_abs_diff_mean": np.abs(old - sampler)[mask].mean(),
        "sampler_logp_abs_diff": np.abs(old - sampler)[mask].mean(),  # its older name
        "mismatch/logp_abs_diff_max": np.abs(old - sampler)[mask].max(),
        "mismatch/token_mult_prob_error": np.exp(np.abs(old - sampler))[mask].mean(),
        "mismatch/frac_outside_clip": ((np.exp(old - sampler) < 0.8) | (np.exp(old - sampler) > 1.3))[mask].mean(),
        "mismatch/seq_log_ratio_abs_max": max(abs((old - sampler)[i][mask[i]].mean()) for i in range(8) if mask[i].any()),
        "advantage_mean": adv.mean(), "advantage_std": adv.std(), "completion_length": mask.sum(1).mean(),
    }
    assert low.any() and high.any() and 0 < want["mismatch/frac_outside_clip"] < 1
    for k, v in want.items():
        assert m[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


# --------------------------------------------------------------------------------------------------
# Behaviour


def _grad_logp(logp, adv, mask, cfg, **kw):
    f = lambda lp: (lambda s, d, _: s / d)(*loss.grpo_loss_terms(lp, adv, mask, cfg, **kw))
    return np.asarray(jax.grad(f)(logp))


def test_gradient_raises_good_and_lowers_bad_completions():
    logp = jnp.full((2, 3), -1.0)
    mask = jnp.ones((2, 3), bool)
    g = _grad_logp(logp, jnp.asarray([1.0, -1.0]), mask, loss.LossConfig(beta=0.0))
    assert np.all(g[0] < 0)  # descending the loss raises log p of the positive-advantage completion
    assert np.all(g[1] > 0)  # and lowers it for the negative one


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_clipped_side_has_zero_gradient(level):
    cfg = loss.LossConfig(beta=0.0, clip_eps_low=0.2, importance_level=level)
    logp = jnp.zeros((2, 2))
    mask = jnp.ones((2, 2), bool)
    # rho = e^0.5 > 1.2 with A > 0, and rho = e^-0.5 < 0.8 with A < 0: both clipped.
    old = jnp.asarray([[-0.5, -0.5], [0.5, 0.5]])
    g = _grad_logp(logp, jnp.asarray([1.0, -1.0]), mask, cfg, old_logp=old)
    np.testing.assert_array_equal(g, 0.0)
    # On the other side of the ratio the objective is not clipped: the gradient flows.
    g = _grad_logp(logp, jnp.asarray([-1.0, 1.0]), mask, cfg, old_logp=old)
    assert np.all(g != 0)


def test_dual_clip_caps_negative_advantage_loss():
    cfg = loss.LossConfig(beta=0.0, dual_clip=3.0)
    logp, old = jnp.asarray([[2.0]]), jnp.asarray([[0.0]])  # rho = e^2 = 7.4 > c = 3
    s, d, _ = loss.grpo_loss_terms(logp, jnp.asarray([-1.0]), jnp.ones((1, 1)), cfg, old_logp=old)
    assert float(s / d) == pytest.approx(3.0)  # -c * A
    assert np.all(_grad_logp(logp, jnp.asarray([-1.0]), jnp.ones((1, 1)), cfg, old_logp=old) == 0)


def test_identical_rewards_give_no_policy_gradient():
    adv, _ = loss.compute_advantages(jnp.asarray([0.7] * 4 + [1.0, 0.0, 1.0, 0.0]), 4, loss.LossConfig())
    assert np.all(np.asarray(adv[:4]) == 0.0)
    logp = jnp.asarray(np.random.default_rng(0).uniform(-3, -1, size=(8, 5)), jnp.float32)
    g = _grad_logp(logp, adv, jnp.ones((8, 5), bool), loss.LossConfig(beta=0.0))
    np.testing.assert_array_equal(g[:4], 0.0)
    assert np.all(g[4:] != 0)


@pytest.mark.parametrize("kl", sorted(loss.KL_ESTIMATORS))
def test_kl_is_zero_when_policy_equals_reference(kl):
    logp = jnp.asarray(np.random.default_rng(0).uniform(-3, -1, size=(3, 4)), jnp.float32)
    cfg = loss.LossConfig(beta=1.0, kl_estimator=kl)
    zero_adv, mask = jnp.zeros(3), jnp.ones((3, 4), bool)
    s, d, m = loss.grpo_loss_terms(logp, zero_adv, mask, cfg, ref_logp=logp)
    assert float(s) == 0.0 and float(loss.finalize_metrics(m)["kl"]) == 0.0
    if kl != "k1":  # k1's gradient is 1 everywhere; k2 and k3 have their minimum at policy == reference
        np.testing.assert_allclose(_grad_logp(logp, zero_adv, mask, cfg, ref_logp=logp), 0.0, atol=1e-7)


def test_k3_is_an_unbiased_nonnegative_kl_estimate():
    """E_{x~p}[k3] = KL(p || q), and k3 >= 0 per sample (Schulman 2020)."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6))
    q = rng.dirichlet(np.ones(6))
    log_ratio = np.log(q) - np.log(p)
    k3 = np.asarray(loss.KL_ESTIMATORS["k3"](jnp.asarray(log_ratio)))
    assert np.all(k3 >= 0)
    assert float((p * k3).sum()) == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-5)


def test_beta_positive_needs_reference():
    with pytest.raises(ValueError, match="beta=0.04 > 0 needs ref_logp"):
        loss.grpo_loss_terms(jnp.zeros((1, 1)), jnp.zeros(1), jnp.ones((1, 1)), loss.LossConfig())


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="aggregation='mean'"):
        loss.LossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="max_completion_length"):
        loss.LossConfig(aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="dual_clip=0.5"):
        loss.LossConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match="num_generations=3"):
        loss.compute_advantages(jnp.zeros(8), 3, loss.LossConfig())
    with pytest.raises(ValueError, match="at least 2 completions"):
        loss.compute_advantages(jnp.zeros(4), 1, loss.LossConfig(advantage_estimator="rloo"))


# --------------------------------------------------------------------------------------------------
# Sampler/trainer mismatch: capped importance weights (grpo_jax.rl.rollout_correction)

# log π_old - log π_samp per token; C_max = 2
_DIFF = np.log(np.array([[3.0, 0.5], [3.0, 1.0], [4.0, 0.25]]))
_WANT_WEIGHTS = {
    "token_truncate": [[2.0, 0.5], [2.0, 1.0], [2.0, 0.25]],  # clip(w_t, 0, 2)
    "token_mask": [[0.0, 0.5], [0.0, 1.0], [0.0, 0.25]],  # w_t > 2 -> 0
    "sequence_truncate": [[1.5, 1.5], [2.0, 2.0], [1.0, 1.0]],  # Π_t w_t = 1.5, 3, 1 -> clip
    "sequence_mask": [[1.5, 1.5], [0.0, 0.0], [1.0, 1.0]],  # sequence 1 (w = 3 > 2) dropped
}


@pytest.mark.parametrize("mode", sorted(_WANT_WEIGHTS))
def test_rollout_correction_weights_the_policy_gradient(mode):
    """On-policy (ratio 1), token-mean: loss = -Σ A_i w_it / N and d loss / d logp = -A_i w_it / N, with
    w the capped π_old / π_samp of the mode; the KL term is not reweighted."""
    logp = jnp.asarray([[-1.0, -2.0], [-0.5, -1.5], [-3.0, -0.2]])
    sampler = logp - _DIFF
    adv = jnp.asarray([1.0, -2.0, 0.5])
    mask = jnp.ones((3, 2), bool)
    cfg = loss.LossConfig(beta=0.0, aggregation="token-mean", rollout_correction=mode, rollout_correction_max=2.0)
    w = np.asarray(_WANT_WEIGHTS[mode])
    s, d, m = loss.grpo_loss_terms(logp, adv, mask, cfg, sampler_logp=sampler)
    np.testing.assert_allclose(float(s / d), -(np.asarray(adv)[:, None] * w).sum() / 6, rtol=1e-5)
    np.testing.assert_allclose(_grad_logp(logp, adv, mask, cfg, sampler_logp=sampler),
                               -np.asarray(adv)[:, None] * w / 6, rtol=1e-5, atol=1e-7)
    out = loss.finalize_metrics(m)
    changed = {"token_truncate": 3, "token_mask": 3, "sequence_truncate": 2, "sequence_mask": 2}[mode]
    assert float(out["mismatch/frac_corrected"]) == pytest.approx(changed / 6)
    assert float(out["mismatch/is_weight_mean"]) == pytest.approx(w.mean(), rel=1e-5)


def test_rollout_correction_lower_cap_and_kl_untouched():
    logp = jnp.asarray([[-1.0, -2.0]])
    sampler = logp - np.log(np.array([[0.1, 1.0]]))  # w = 0.1, 1
    ref = logp + 0.3
    kw = dict(aggregation="token-mean", beta=0.5, rollout_correction_max=None, rollout_correction_min=0.5)
    plain = loss.LossConfig(aggregation="token-mean", beta=0.5)
    s0, d0, _ = loss.grpo_loss_terms(logp, jnp.asarray([0.0]), jnp.ones((1, 2), bool), plain, ref_logp=ref)
    for mode, w0 in (("token_truncate", 0.5), ("token_mask", 0.0)):
        cfg = loss.LossConfig(rollout_correction=mode, **kw)
        # Zero advantage: only the KL term is left, and it is not reweighted.
        s, d, _ = loss.grpo_loss_terms(logp, jnp.asarray([0.0]), jnp.ones((1, 2), bool), cfg, ref_logp=ref,
                                       sampler_logp=sampler)
        assert float(s / d) == pytest.approx(float(s0 / d0))
        s, d, _ = loss.grpo_loss_terms(logp, jnp.asarray([1.0]), jnp.ones((1, 2), bool), cfg, ref_logp=ref,
                                       sampler_logp=sampler)
        kl = np.exp(0.3) - 0.3 - 1  # k3 at log π_ref - log π = 0.3
        assert float(s / d) == pytest.approx((-(w0 + 1.0) + 2 * 0.5 * kl) / 2, rel=1e-5)


def test_rollout_correction_settings_are_checked():
    with pytest.raises(ValueError, match="rollout_correction='tis'"):
        loss.LossConfig(rollout_correction="tis")
    with pytest.raises(ValueError, match="rollout_correction_min=3.0, rollout_correction_max=2.0"):
        loss.LossConfig(rollout_correction="token_mask", rollout_correction_min=3.0)
    with pytest.raises(ValueError, match="needs sampler_logp"):
        loss.grpo_loss_terms(jnp.zeros((1, 2)), jnp.ones(1), jnp.ones((1, 2), bool),
                             loss.LossConfig(beta=0.0, rollout_correction="token_truncate"))
