"""What a GRPO run will hold on each device, known before any weight loads.

The run's own programs are compiled ahead of time on abstract inputs (`jax.ShapeDtypeStruct` with
the run's shardings: nothing is allocated), and XLA's buffer assignment gives each program's peak
per device (`grpo_jax.parallel.compiled.memory`):

  - update: the training state (parameters, AdamW's moments; a LoRA run's frozen base) and the GRPO
    update of one minibatch at the worst case the config allows (every completion at
    sampling.max_new_tokens, prompts at the largest bucket; packed rows as `grpo.packing` lays them
    out), gradients and activations included;
  - reference: the KL reference's weights (beta > 0, full fine-tune) and its log-probability pass;
  - rollout: the sampler's weight copy in the compute dtype (inference layout) and the prefill and
    decode programs with the KV cache at full length.

Each phase holds the resident state plus its program; the plan's peak is the largest phase. When the
device reports its memory (GPUs, TPUs) and the peak does not fit, the run stops before loading with
the table and the settings that shrink the phase that does not fit.

    python scripts/memory_plan.py --config=configs/qwen3_8b.py --devices=8   # simulated devices, any machine
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from grpo_jax.models import architecture
from grpo_jax.models import lora
from grpo_jax.models import placement
from grpo_jax.models import transformer
from grpo_jax.parallel import compiled
from grpo_jax.parallel import partitioning
from grpo_jax.rl import grpo
from grpo_jax.rl import packing
from grpo_jax.rl import train_state
from grpo_jax.rollout import sampler
from grpo_jax.run import config

GiB = 2**30


@dataclasses.dataclass
class Plan:
    """Bytes per device: what stays for the run (`resident`) and each phase's program (`programs`)."""

    resident: dict[str, int]  # parameters, optimizer state, frozen base, reference weights
    programs: dict[str, int]  # update, reference, rollout: each program's peak (its arguments included)
    phases: dict[str, int]  # each phase's total on the device: the resident state not in its arguments + its peak
    limit: int | None = None  # the device's memory, when it reports it

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def worst(self) -> str:
        return max(self.phases, key=self.phases.get)

    def table(self) -> str:
        rows = [f"| {k} (resident) | {_size(v)} |" for k, v in self.resident.items() if v]
        rows += [f"| {k} phase (its program's peak: {_size(self.programs[k])}) | **{_size(v)}** |"
                 for k, v in self.phases.items()]
        limit = _size(self.limit) if self.limit else "not reported by the device"
        return "\n".join(["| per device | bytes |", "|---|---|", *rows,
                          f"| peak ({self.worst} phase) / device memory | **{_size(self.peak)}** / {limit} |"])


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def per_device(tree) -> int:
    """Bytes of a tree of (abstract) arrays on one device."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract(shapes, shardings):
    """ShapeDtypeStructs of `shapes` with `shardings`."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def abstract_state(model_cfg: architecture.ModelConfig, mesh: Mesh, tx: optax.GradientTransformation) -> train_state.TrainState:
    """A train state of jax.ShapeDtypeStructs in the run's shardings: the parameters (a LoRA run's
    adapters, with its frozen base in the compute dtype), AdamW's moments laid out like them, the
    scalars replicated. Nothing is allocated."""
    replicated = NamedSharding(mesh, P())
    params = abstract(transformer.param_shapes(model_cfg), placement.param_shardings(model_cfg, mesh))
    frozen = None
    if model_cfg.lora_rank:
        frozen, params = lora.split(params)
        frozen = jax.tree.map(lambda x: x.update(dtype=jnp.dtype(model_cfg.dtype)), frozen)
    opt_state = optax.tree_map_params(tx, lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding),
                                      jax.eval_shape(tx.init, params), params,
                                      transform_non_params=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated))
    scalar = lambda dtype, shape=(): jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    return train_state.TrainState(step=scalar(jnp.int32), params=params, opt_state=opt_state, rng=scalar(jnp.uint32, (2,)),
                                  data={k: scalar(jnp.int32) for k in ("epoch", "position", "seed", "rewards_off")},
                                  frozen=frozen)


def _worst_batch(cfg: ConfigDict, model_cfg: architecture.ModelConfig, mesh: Mesh, prompt_len: int) -> dict:
    """The update's batch (one minibatch's rows) with every completion at max_new_tokens."""
    g, C = cfg.grpo, cfg.sampling.max_new_tokens
    N = g.prompts_per_step * g.num_generations
    row = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=partitioning.batch_sharding(mesh, len(shape)))
    extra = {"sampler_logp": jnp.float32, "advantages": jnp.float32}
    if g.num_iterations * g.minibatches > 1:
        extra["old_logp"] = jnp.float32
    if g.beta > 0:
        extra["ref_logp"] = jnp.float32
    if not g.packing:
        n = N // g.minibatches
        batch = {"prompt_ids": row((n, prompt_len), jnp.int32), "prompt_mask": row((n, prompt_len), bool),
                 "completion_ids": row((n, C), jnp.int32), "completion_mask": row((n, C), bool),
                 "truncated": row((n,), bool)}
        return {**batch, **{k: row((n,) if k == "advantages" else (n, C), dt) for k, dt in extra.items()}}
    multiple = partitioning.batch_shards(mesh) * g.microbatches * g.minibatches
    plan = packing.plan([prompt_len] * g.prompts_per_step, [C] * N, g.num_generations, row_multiple=multiple,
                        max_row_tokens=g.max_row_tokens, attention_cost=grpo.attention_cost(model_cfg),
                        shards=partitioning.batch_shards(mesh))
    R, T, S = plan.rows // g.minibatches, plan.row_tokens, plan.slots
    batch = {k: row((R, T), jnp.int32) for k in ("tokens", "positions", "pieces", "members", "sources")}
    batch.update(slot_start=row((R, S), jnp.int32), completion_mask=row((R, S, C), bool),
                 completion_valid=row((R, S), bool), truncated=row((R, S), bool))
    return {**batch, **{k: row((R, S) if k == "advantages" else (R, S, C), dt) for k, dt in extra.items()}}


def estimate(cfg: ConfigDict, model_cfg: architecture.ModelConfig, mesh: Mesh, prompt_len: int | None = None) -> Plan:
    """The memory plan of GRPO run `cfg` for `model_cfg` on `mesh`, from ahead-of-time compilation of
    its update, reference pass and rollout on abstract inputs (module docstring). `prompt_len`:
    the prompts' padded length (default: the largest prompt bucket)."""
    g, s = cfg.grpo, cfg.sampling
    prompt_len = prompt_len or max(s.prompt_buckets)
    C, N = s.max_new_tokens, g.prompts_per_step * g.num_generations
    replicated = NamedSharding(mesh, P())
    tx, _ = train_state.make_optimizer(cfg.optimizer, max(2, cfg.steps * g.num_iterations * g.minibatches))
    state = abstract_state(model_cfg, mesh, tx)
    params, opt_state, frozen = state.params, state.opt_state, state.frozen
    ref = None
    if g.beta > 0 and not model_cfg.lora_rank:  # grpo.GRPO.reference_params: a copy in the compute dtype
        ref = jax.tree.map(lambda x: x.update(dtype=jnp.dtype(model_cfg.dtype)), params)
    resident = {"parameters": per_device(params), "optimizer state": per_device(opt_state),
                "frozen base": per_device(frozen) if frozen is not None else 0,
                "reference weights": per_device(ref) if ref is not None else 0}
    everything = sum(resident.values())
    loss_cfg = grpo.loss_config(cfg)
    batch = _worst_batch(cfg, model_cfg, mesh, prompt_len)
    programs, phases = {}, {}

    exe = grpo.update_jit.lower(state, batch, model_cfg=model_cfg, loss_cfg=loss_cfg, mesh=mesh,
                                num_microbatches=g.microbatches, tx=tx).compile()
    programs["update"] = compiled.memory(exe)["peak"]
    phases["update"] = programs["update"] + everything - per_device(state)  # the state is its argument

    if ref is not None or (g.beta > 0 and frozen is not None):
        seqs = {k: batch[k] for k in (packing.SEQUENCE_KEYS if g.packing else grpo._SEQUENCES)}
        weights = ref if ref is not None else frozen
        exe = grpo.batch_logprobs_jit.lower(weights, seqs, model_cfg=lora.base_config(model_cfg), loss_cfg=loss_cfg,
                                            mesh=mesh, num_microbatches=g.microbatches).compile()
        programs["reference"] = compiled.memory(exe)["peak"]
        phases["reference"] = programs["reference"] + everything - per_device(weights)

    whole = params if frozen is None else lora.join(frozen, params)
    copy = jax.eval_shape(lambda p: sampler.inference_params(p, model_cfg, mesh)[0], whole)
    run_cfg = model_cfg.replace(param_dtype=model_cfg.dtype)
    copy = abstract(copy, placement.param_shardings(run_cfg, mesh, partitioning.INFERENCE_RULES))
    sc = sampler.SamplingConfig(max_new_tokens=C)
    shards = partitioning.batch_shards(mesh)
    ids = jax.ShapeDtypeStruct((g.prompts_per_step, prompt_len), jnp.int32,
                               sharding=partitioning.batch_sharding(mesh) if g.prompts_per_step % shards == 0 else replicated)
    statics = dict(cfg=run_cfg, num_generations=g.num_generations, max_new_tokens=C, mesh=mesh)
    prefill = compiled.memory(sampler.prefill.lower(copy, ids, ids.update(dtype=bool), **statics).compile())["peak"]
    logits, cache = jax.eval_shape(functools.partial(sampler.prefill, **statics), copy, ids, ids.update(dtype=bool))
    specs = sampler._cache_specs(run_cfg, mesh, N)
    cache = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, specs[k])) for k, v in cache.items()}
    logits = jax.ShapeDtypeStruct(logits.shape, logits.dtype, sharding=NamedSharding(mesh, P(partitioning.BATCH)))
    decode = compiled.memory(sampler.decode_program(copy, cache, logits, cfg=run_cfg, sampling=sc, mesh=mesh).compile())["peak"]
    # The copy is made once per rollout (none when the stored weights already are the compute dtype's
    # inference layout: then the programs read the parameters themselves).
    separate = 0 if run_cfg == model_cfg and mesh.shape["fsdp"] == 1 else per_device(copy)
    programs["rollout"] = max(prefill, decode)
    phases["rollout"] = everything + separate + programs["rollout"] - per_device(copy)
    return Plan(resident, programs, phases)


def device_memory() -> int | None:
    """The memory of the first device in bytes, when the backend reports it (GPUs, TPUs), else None."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        return None
    return stats.get("bytes_limit") or None


def advice(cfg: ConfigDict, model_cfg: architecture.ModelConfig, plan: Plan) -> list[str]:
    """Settings that shrink the phase that does not fit, largest effect first."""
    g = cfg.grpo
    out = []
    if plan.worst in ("update", "reference"):
        out.append(f"grpo.microbatches={2 * g.microbatches} (the update's activations are per micro-batch)")
        if model_cfg.remat != "full":
            out.append("model.remat='full' (each layer's activations recomputed in the backward pass)")
    if plan.worst == "rollout":
        out.append(f"grpo.prompts_per_step={max(1, g.prompts_per_step // 2)} (the KV cache holds every row of a "
                   f"rollout at sampling.max_new_tokens={cfg.sampling.max_new_tokens})")
        out.append("mesh.tensor=2 or more (the sampler's weights and KV heads split over it)")
    if plan.resident["parameters"] + plan.resident["optimizer state"] > plan.peak / 3:
        out.append("a larger mesh.fsdp (parameters, gradients and AdamW's moments split over it)")
    if not model_cfg.lora_rank:
        out.append("model.lora.rank=16 (a frozen base in the compute dtype, adapters trained: no AdamW state of "
                   "the base, and the base is the KL reference)")
    return out


def check(cfg: ConfigDict, model_cfg: architecture.ModelConfig, plan: Plan) -> None:
    """Stop when the plan does not fit the device's memory (when it is known): the table and what to change."""
    if plan.limit and plan.peak > plan.limit:
        raise config.ConfigError(
            f"memory plan: the {plan.worst} phase needs {_size(plan.peak)} per device and the device has "
            f"{_size(plan.limit)} (before any weight was loaded):\n{plan.table()}\nTry: "
            + "; ".join(advice(cfg, model_cfg, plan)))


def wanted(cfg: ConfigDict) -> bool:
    """`cfg.memory_plan`: "auto" plans a GRPO run when the device reports its memory (GPUs, TPUs),
    "on" always, "off" never."""
    mode = cfg.get("memory_plan", "auto")
    return cfg.get("trainer", "grpo") == "grpo" and (mode == "on" or (mode == "auto" and device_memory() is not None))


def plan_run(cfg: ConfigDict, model_cfg: architecture.ModelConfig, mesh: Mesh,
             prompt_len: int | None = None) -> Plan:
    """The plan of a run (`wanted`), printed (host 0); a run that does not fit stops (`check`)."""
    plan = estimate(cfg, model_cfg, mesh, prompt_len)
    plan.limit = device_memory()
    if jax.process_index() == 0:
        print(f"memory plan ({mesh.devices.size} devices, mesh {dict(mesh.shape)}):\n{plan.table()}", flush=True)
    check(cfg, model_cfg, plan)
    return plan


