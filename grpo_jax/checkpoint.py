"""Checkpoints of a train state (orbax), in WORKDIR/checkpoints/STEP.

Each checkpoint has two items, so that evaluation, export and the next stage of a pipeline can read
the parameters alone:

    params   the policy's parameters
    state    {"step", "opt_state", "rng", "data", "ref_params" (when a reference is kept)}

This is the layout grpo_jax has written from the start, so older checkpoints restore unchanged. A
LoRA run (grpo_jax.lora) stores its adapters as `params` and adds a third item,

    base     {"source", "fingerprint"}: the frozen base the adapters belong to (not stored itself)

and a restore onto another base (another fingerprint) stops with both named.

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


def _check_base(manager: ocp.CheckpointManager, step: int, fingerprint: str, source: str = "") -> None:
    """Stop unless checkpoint `step` records the base whose fingerprint is `fingerprint`."""
    recorded = None
    if os.path.isdir(os.path.join(str(manager.directory), str(step), "base")):  # orbax: an item per folder
        recorded = manager.restore(step, args=ocp.args.Composite(base=ocp.args.JsonRestore()))["base"]
    where = f"checkpoint {step} in {manager.directory}"
    if recorded is None:
        raise ValueError(f"{where} holds no LoRA adapters (it records no base model): it is a full fine-tune's; "
                         "set model.lora.rank=0 to read it, or start a LoRA run from it with init_from")
    if recorded["fingerprint"] != fingerprint:
        raise ValueError(f"{where} holds LoRA adapters of the base {recorded['source']!r} (fingerprint "
                         f"{recorded['fingerprint']}), but this run's base is {source or 'another'} (fingerprint "
                         f"{fingerprint}): adapters only mean something on the base they were trained on. Use that "
                         "base (model.source, init_from), or start a new workdir")


class Checkpoints:
    """The checkpoints of one run (synchronous saves; the latest `keep` are kept). `base`: a LoRA
    run's {"source", "fingerprint"} of its frozen base, recorded in every save and checked on restore."""

    def __init__(self, workdir: str, keep: int = 3, base: dict[str, str] | None = None):
        self.base = base
        self.manager = ocp.CheckpointManager(
            directory(workdir), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                     enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: train_state.TrainState) -> None:
        params, rest = train_state.to_items(state)
        items = dict(params=ocp.args.StandardSave(params), state=ocp.args.StandardSave(rest))
        if self.base is not None:
            items["base"] = ocp.args.JsonSave(self.base)
        self.manager.save(int(state.step), args=ocp.args.Composite(**items))
        self.manager.wait_until_finished()

    def restore(self, like: train_state.TrainState, step: int | None = None) -> train_state.TrainState | None:
        """The checkpoint at `step` (default: the latest) in the structure, dtypes and shardings of
        `like`; None when there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        params, rest = train_state.to_items(like)
        if self.base is not None:
            _check_base(self.manager, step, self.base["fingerprint"], self.base["source"])
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_target(params)), state=ocp.args.StandardRestore(_target(rest))))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {step} in {self.manager.directory} does not match this run's train "
                             f"state (a different model, optimizer or reference setting, or a checkpoint from a "
                             f"grpo_jax before 2026-11-30, whose optimizer state had another layout: its parameters "
                             f"still start a new run with --config.init_from=RUN_WORKDIR): {str(e)[:800]}") from e
        return train_state.from_items(out["params"], out["state"], frozen=like.frozen)

    def close(self) -> None:
        self.manager.close()


def restore_params(workdir: str, like: Any, step: int | None = None, base: str | None = None) -> tuple[Any, int]:
    """The parameters of run `workdir`'s checkpoint at `step` (default: the latest), restored in the
    structure and shardings of `like` (arrays or ShapeDtypeStructs); a LoRA run's adapters when
    `base`, the fingerprint of the base they must belong to, is given. Returns (params, step)."""
    path = directory(workdir)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint in {path} to take the parameters from")
    with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {path} to take the parameters from")
        if base is not None:
            _check_base(manager, step, base)
        out = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_target(like))))
    return out["params"], step
