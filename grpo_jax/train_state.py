"""The train state: everything a run carries from one step to the next, as one pytree.

    state = train_state.create(params, tx, mesh, seed=0, data=iterator.state())
    state, metrics = update(state, batch)            # grpo.update / sft.update: jitted, donated
    checkpoint.Checkpoints(workdir).save(state)      # a checkpoint is exactly this state

Fields:
    step        [] int32    training steps done (a GRPO step may make several optimizer updates)
    params      the policy's parameters
    opt_state   the optimizer's state (optax)
    rng         [2] uint32  key data; the key of step s is fold_in(rng, s)
    data        {"epoch", "position", "seed"}: where the data iterator is (grpo_jax.data.PromptIterator)
    ref_params  the frozen reference policy of the KL term, or None when there is none (beta = 0)
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from grpo_jax import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    data: dict[str, jax.Array]
    ref_params: Any = None


def create(params, tx: optax.GradientTransformation, mesh: Mesh, *, seed: int, data: dict[str, int],
           ref_params=None) -> TrainState:
    """A fresh state at step 0. Everything not yet on the mesh is replicated there, so that a jitted
    update sees the same shardings on its first call as on later ones (no second compile)."""
    on_mesh = lambda tree: sharding.on_mesh(tree, mesh)
    return TrainState(step=on_mesh(np.int32(0)), params=params, opt_state=on_mesh(tx.init(params)),
                      rng=on_mesh(jax.random.key_data(jax.random.key(seed))), data=_data_on_mesh(data, mesh),
                      ref_params=ref_params)


def _data_on_mesh(data: dict[str, int], mesh: Mesh) -> dict[str, jax.Array]:
    return sharding.on_mesh({k: np.asarray(v, np.int32) for k, v in data.items()}, mesh)


def advance(state: TrainState, data: dict[str, int], mesh: Mesh) -> TrainState:
    """The state after a step: one more step, the data iterator at `data`."""
    return state.replace(step=state.step + 1, data=_data_on_mesh(data, mesh))


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the state's current step."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def to_items(state: TrainState) -> tuple[Any, dict[str, Any]]:
    """(params, the rest) as a checkpoint stores them (grpo_jax.checkpoint)."""
    rest = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng, "data": state.data}
    if state.ref_params is not None:
        rest["ref_params"] = state.ref_params
    return state.params, rest


def from_items(params, rest: dict[str, Any]) -> TrainState:
    return TrainState(step=rest["step"], params=params, opt_state=rest["opt_state"], rng=rest["rng"],
                      data=rest["data"], ref_params=rest.get("ref_params"))


# --------------------------------------------------------------------------------------------------
# The optimizer


def make_optimizer(opt: ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW after global-norm clipping, with a linear warm-up (`warmup_steps`, at most
    total_steps - 1; 0: none) then cosine decay to `final_lr_fraction` or a constant rate; and the
    learning-rate schedule."""
    peak = opt.learning_rate
    warmup = max(0, min(opt.warmup_steps, total_steps - 1))
    if opt.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1),
                                                end_value=peak * opt.final_lr_fraction)
    elif opt.schedule == "constant":
        lr = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                  [warmup]) if warmup else optax.constant_schedule(peak)
    else:
        raise ValueError(f"optimizer.schedule={opt.schedule!r}; expected 'cosine' or 'constant'")
    return optax.chain(optax.clip_by_global_norm(opt.max_grad_norm),
                       optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)), lr


def apply_gradients(state: TrainState, grads, loss: jax.Array,
                    tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the state's parameters; skipped (parameters and optimizer state
    unchanged) when the loss or the gradient is not finite, instead of corrupting the parameters."""
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    state = state.replace(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state))
    return state, {"grad_norm": gnorm, "update_skipped": (~ok).astype(jnp.float32)}
