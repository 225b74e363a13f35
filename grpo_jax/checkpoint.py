"""Checkpoints of a train state (orbax), in WORKDIR/checkpoints/STEP.

Each checkpoint has two items, so that evaluation, export and the next stage of a pipeline can read
the parameters alone:

    params   the policy's parameters
    state    {"step", "opt_state", "rng", "data", "ref_params" (when a reference is kept)}

This is the layout grpo_jax has written from the start, so older checkpoints restore unchanged.

    ckpt = Checkpoints(workdir, keep=3)
    ckpt.save(state); state = ckpt.restore(state)        # the target gives structure and shardings
    params, step = restore_params(other_workdir, abstract_params)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from grpo_jax import train_state


def directory(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def _target(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    """The checkpoints of one run (synchronous saves; the latest `keep` are kept)."""

    def __init__(self, workdir: str, keep: int = 3):
        self.manager = ocp.CheckpointManager(
            directory(workdir), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                     enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: train_state.TrainState) -> None:
        params, rest = train_state.to_items(state)
        self.manager.save(int(state.step), args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), state=ocp.args.StandardSave(rest)))
        self.manager.wait_until_finished()

    def restore(self, like: train_state.TrainState, step: int | None = None) -> train_state.TrainState | None:
        """The checkpoint at `step` (default: the latest) in the structure, dtypes and shardings of
        `like`; None when there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        params, rest = train_state.to_items(like)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_target(params)), state=ocp.args.StandardRestore(_target(rest))))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {step} in {self.manager.directory} does not match this run's train "
                             f"state (a different model, optimizer or reference setting, or a checkpoint from a "
                             f"grpo_jax before 2026-11-30, whose optimizer state had another layout: its parameters "
                             f"still start a new run with --config.init_from=RUN_WORKDIR): {str(e)[:800]}") from e
        return train_state.from_items(out["params"], out["state"])

    def close(self) -> None:
        self.manager.close()


def restore_params(workdir: str, like: Any, step: int | None = None) -> tuple[Any, int]:
    """The parameters of run `workdir`'s checkpoint at `step` (default: the latest), restored in the
    structure and shardings of `like` (arrays or ShapeDtypeStructs). Returns (params, step)."""
    path = directory(workdir)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint in {path} to take the parameters from")
    with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {path} to take the parameters from")
        out = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_target(like))))
    return out["params"], step
