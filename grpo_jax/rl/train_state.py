"""The train state: everything a run carries from one step to the next, as one pytree.

    state = train_state.create(params, tx, mesh, seed=0, data=iterator.state())
    state, metrics = update(state, batch)            # grpo.update / sft.update: jitted, donated
    checkpoint.Checkpoints(workdir).save(state)      # a checkpoint is this state, less what is rebuilt

Fields:
    step        [] int32    training steps done (a GRPO step may make several optimizer updates)
    params      the trained parameters: the policy's, or a LoRA run's adapters only
    opt_state   the optimizer's state (optax)
    rng         [2] uint32  key data; the key of step s is fold_in(rng, s)
    data        {"epoch", "position", "seed"}: where the data iterator is (grpo_jax.common.data.PromptIterator)
    ref_params  the frozen reference policy of the KL term, or None when there is none (beta = 0, or
                LoRA, whose reference is `frozen`); the starting policy, so not checkpointed (rebuilt
                from its source, and checked against the checkpoint's fingerprint of it)
    frozen      a LoRA run's frozen base (grpo_jax.models.lora.frozen_config: compute dtype), never updated
                and not checkpointed (rebuilt from its source); None for a full fine-tune

The policy is `policy_params(state)`: the adapters joined onto the base, or `params` itself.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from grpo_jax.models import lora
from grpo_jax.parallel import partitioning


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    data: dict[str, jax.Array]
    ref_params: Any = None
    frozen: Any = None


def create(params, tx: optax.GradientTransformation, mesh: Mesh, *, seed: int, data: dict[str, int],
           ref_params=None, frozen=None) -> TrainState:
    """A fresh state at step 0. Everything not yet on the mesh is replicated there, so that a jitted
    update sees the same shardings on its first call as on later ones (no second compile)."""
    on_mesh = lambda tree: partitioning.on_mesh(tree, mesh)
    return TrainState(step=on_mesh(np.int32(0)), params=params, opt_state=on_mesh(tx.init(params)),
                      rng=on_mesh(jax.random.key_data(jax.random.key(seed))), data=_data_on_mesh(data, mesh),
                      ref_params=ref_params, frozen=frozen)


def policy_params(state: TrainState):
    """The policy's whole parameter tree: a LoRA run's adapters on its frozen base (the same
    arrays, no copy), or the trained parameters themselves."""
    return lora.with_base(state.frozen, state.params)


def _data_on_mesh(data: dict[str, int], mesh: Mesh) -> dict[str, jax.Array]:
    return partitioning.on_mesh({k: np.asarray(v, np.int32) for k, v in data.items()}, mesh)


def advance(state: TrainState, data: dict[str, int], mesh: Mesh) -> TrainState:
    """The state after a step: one more step, the data iterator at `data`."""
    return state.replace(step=state.step + 1, data=_data_on_mesh(data, mesh))


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the state's current step."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def to_items(state: TrainState) -> tuple[Any, dict[str, Any]]:
    """(params, the rest) as a checkpoint stores them (grpo_jax.run.checkpoint): neither the reference
    nor a LoRA base, which every run rebuilds from their source."""
    return state.params, {"step": state.step, "opt_state": state.opt_state, "rng": state.rng, "data": state.data}


def from_items(params, rest: dict[str, Any], ref_params=None, frozen=None) -> TrainState:
    return TrainState(step=rest["step"], params=params, opt_state=rest["opt_state"], rng=rest["rng"],
                      data=rest["data"], ref_params=ref_params, frozen=frozen)


# --------------------------------------------------------------------------------------------------
# The optimizer


def make_optimizer(opt: ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW after global-norm clipping, with a linear warm-up (`warmup_steps`, at most
    total_steps - 1; 0: none) then cosine decay to `final_lr_fraction` or a constant rate; and the
    learning-rate schedule.

    The optimizer works in float32 whatever the parameters are stored in (`in_float32`): Adam's
    moments are float32, and an update is rounded to the storage dtype once, when it is applied. The
    rate of each update is in the optimizer state (optax.inject_hyperparams; read it with
    `learning_rate`), so that what is logged is what the update used.

    The same settings give the same (identical) objects: the optimizer is a static argument of the
    jitted updates, so runs with equal settings in one process share their compiled programs."""
    warmup = max(0, min(opt.warmup_steps, total_steps - 1))
    if warmup < opt.warmup_steps:  # a short run: said, not done silently
        warnings.warn(f"optimizer.warmup_steps={opt.warmup_steps} does not fit the run's {total_steps} optimizer "
                      f"updates: the warm-up is shortened to {warmup} (the last update runs at the full rate)",
                      stacklevel=2)
    settings = dict(opt.to_dict() if isinstance(opt, ConfigDict) else opt)
    settings["warmup_steps"] = warmup
    return _optimizer(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in settings.items())),
                      total_steps)


@functools.lru_cache(maxsize=64)
def _optimizer(settings: tuple, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    opt = dict(settings)
    peak, warmup = opt["learning_rate"], opt["warmup_steps"]
    if opt["schedule"] == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1),
                                                end_value=peak * opt["final_lr_fraction"])
    elif opt["schedule"] == "constant":
        lr = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                  [warmup]) if warmup else optax.constant_schedule(peak)
    else:
        raise ValueError(f"optimizer.schedule={opt['schedule']!r}; expected 'cosine' or 'constant'")
    # Only the rate is injected (a float32 array in the state); the rest stay Python floats, so the
    # arithmetic is exactly optax.adamw's.
    static = ("b1", "b2", "eps", "eps_root", "weight_decay", "mu_dtype", "mask", "nesterov")
    adamw = optax.inject_hyperparams(optax.adamw, static_args=static)(lr, b1=opt["b1"], b2=opt["b2"],
                                                                      weight_decay=opt["weight_decay"])
    return in_float32(optax.chain(optax.clip_by_global_norm(opt["max_grad_norm"]), adamw)), lr


def in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on float32 copies of the gradients and parameters. With bfloat16 storage its state (Adam's
    moments, the injected hyperparameters) is float32 instead of bfloat16, and the update stays
    float32 until optax.apply_updates adds it and rounds the sum once. A no-op for float32 weights."""
    def f32(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def update(grads, state, params=None):
        return tx.update(f32(grads), state, None if params is None else f32(params))

    return optax.GradientTransformation(lambda params: tx.init(f32(params)), update)


def learning_rate(opt_state) -> jax.Array:
    """The learning rate of the latest update (make_optimizer's state)."""
    return optax.tree_utils.tree_get(opt_state, "learning_rate",
                                     filtering=lambda _, value: isinstance(value, jax.Array))


def check_precision(params, learning_rate: float) -> None:
    """Refuse weights stored in a dtype that cannot represent updates of size `learning_rate`.

    Adam moves each weight by about the learning rate per step, and a weight w stored in bfloat16
    (8 significant bits) changes only when the step is at least half its spacing, between |w| 2^-9
    and |w| 2^-8. With |w| ~ 1e-2, an lr of 1e-6 rounds away almost everywhere and training is a
    silent no-op. Stops when
    most parameters sit in leaves whose RMS weight cannot move by `learning_rate` even in the best
    case (|w| eps / 4). The fix: float32 master weights (model.param_dtype) with a bfloat16 compute
    copy (model.dtype), or a larger rate. A no-op for float32 weights.
    """
    low = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
           if jnp.issubdtype(leaf.dtype, jnp.floating) and jnp.finfo(leaf.dtype).bits < 32}
    if not low:
        return
    rms = jax.jit(lambda t: {k: jnp.sqrt(jnp.mean(jnp.square(v.astype(jnp.float32)))) for k, v in t.items()})(low)
    floor = {k: float(rms[k]) * float(jnp.finfo(v.dtype).eps) / 4 for k, v in low.items()}
    stuck = [k for k in low if learning_rate < floor[k]]
    total = sum(leaf.size for leaf in jax.tree.leaves(params))
    frozen = sum(low[k].size for k in stuck)
    if frozen > total / 2:
        worst = max(stuck, key=lambda k: low[k].size)
        dtype = jnp.dtype(low[worst].dtype).name
        raise ValueError(
            f"optimizer.learning_rate={learning_rate:g} is too small for weights stored in {dtype} "
            f"(model.param_dtype={dtype}): {frozen / total:.0%} of the parameters cannot change by that much "
            f"(e.g. {worst}: RMS {float(rms[worst]):.3g}, smallest representable step ~{floor[worst]:.2g}), so "
            f"the run would not train. Store the weights in float32 (model.param_dtype=float32) and compute in "
            f"{dtype} (model.dtype={dtype}), or raise the learning rate")


def apply_gradients(state: TrainState, grads, loss: jax.Array, tx: optax.GradientTransformation,
                    skip: jax.Array | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the state's parameters. Skipped (parameters and optimizer state
    unchanged, so Adam's moments and step count do not move either) when the loss or the gradient
    is not finite, instead of corrupting the parameters, or when `skip` (a batch without signal).

    Metrics: grad_norm, learning_rate (the rate this update used, or would have), update_skipped,
    update_nonfinite."""
    gnorm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    ok = finite if skip is None else finite & ~skip
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    state = state.replace(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state))
    return state, {"grad_norm": gnorm, "learning_rate": learning_rate(opt_state),
                   "update_skipped": (~ok).astype(jnp.float32), "update_nonfinite": (~finite).astype(jnp.float32)}


class NonFiniteStop:
    """Stops a run whose updates keep failing: a non-finite loss or gradient skips its update, and
    `limit` consecutive ones raise instead of skipping every update from then on."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"optimizer.max_nonfinite_updates={limit}; expected >= 1")
        self.limit, self.streak = limit, 0

    def observe(self, nonfinite: float, step: int) -> None:
        self.streak = self.streak + 1 if nonfinite else 0
        if self.streak >= self.limit:
            raise FloatingPointError(
                f"step {step}: {self.streak} consecutive updates had a non-finite loss or gradient and were skipped "
                f"(optimizer.max_nonfinite_updates={self.limit}); the run stops instead of skipping every update. "
                "Lower the learning rate or check the data and reward functions; resume from the last checkpoint")
