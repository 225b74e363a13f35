"""A whole GRPO step compiled ahead of time for a named shape and mesh: memory and collective traffic
per device, next to the ZeRO-3 ideal. Nothing is allocated: every input is a jax.ShapeDtypeStruct
with its sharding, so a 7B step compiles on a laptop.

    python benchmarks/bench_layout.py --shape qwen2.5-7b --mesh 1,8,1 --prompts 16 --num_generations 16 \\
        --prompt_len 256 --new_tokens 1024 --dtype bfloat16 --param_dtype float32 --remat full \\
        --microbatches 8 --out bench_layout.json
    python benchmarks/bench_layout.py          # tiny shape, (1, 8, 1), seconds

With fewer accelerators than the mesh needs (or none) it compiles for simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count); XLA's CPU backend then prints each gradient
reduce-scatter as an all-reduce followed by a slice, which grpo_jax.parallel.compiled counts as the
reduce-scatter that GPU and TPU compilers make of it.

Printed per device, for each program of a step:
- update (grpo.update: loss, gradient, AdamW; the state donated): peak memory by XLA's buffer
  assignment, split into parameters, optimizer state, batch and temporaries (gradients live in the
  temporaries), next to the ideal: (parameters + optimizer state + gradients) / devices, plus the
  remat checkpoints of this device's micro-batch rows (layers x rows x tokens x d_model in the
  compute dtype), plus one layer's weights gathered in the compute dtype and their float32 gradient;
  and the bytes moved by collectives (ring wire bytes; loop trip counts applied), next to ZeRO-3's:
  per micro-batch, the parameters all-gathered for the forward and again for the backward (compute
  dtype) and the gradients reduce-scattered (their dtype), each x (n - 1) / n of the fsdp group,
  plus an all-reduce over `data` of the gradient shards when data > 1.
- the LM head's rows per device (tokens it computes logits for) against the batch's tokens.
- reference pass (beta > 0): its peak, beside the resident state (parameters, optimizer state, the
  reference weights).
- sampling: the inference copy of the weights, the KV cache, the prefill and decode peaks, the
  bytes collectives move inside the decode loop (weights: none), and the first shrink of the decode
  batch (finished rows leaving it): its peak and the bytes it moves (none: rows stay on their device).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny")
    p.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor[,expert]")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--num_generations", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--param_dtype", default="float32")
    p.add_argument("--remat", default="full")
    p.add_argument("--attention", default="einsum")
    p.add_argument("--moe_impl", default="ragged", help="model.moe_impl of MoE shapes (ragged: what GPUs and TPUs run)")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--logprob_chunk", type=int, default=1024)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lora_rank", type=int, default=0,
                   help="> 0: LoRA on every projection, a frozen base in --dtype (the reference), adapters in --param_dtype")
    p.add_argument("--lora_alpha", type=float, default=32.0)
    p.add_argument("--cpu_no_hoisting", action="store_true",
                   help="XLA:CPU: disable while-loop-invariant code motion, which hoists the float32 promotion of "
                        "bfloat16 weights (XLA:CPU has no bf16 dots) out of the layer scan as whole float32 copies of "
                        "every layer's weights; GPU and TPU dots read bf16 and make no such copy")
    p.add_argument("--skip", nargs="*", default=[], choices=["reference", "sampling"])
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


GiB = 2**30


def main(argv=None):
    args = parse_args(argv)
    mesh_shape = tuple(int(x) for x in args.mesh.split(","))
    n_dev = math.prod(mesh_shape)
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={n_dev}")
    if args.cpu_no_hoisting:
        os.environ["XLA_FLAGS"] += " --xla_disable_hlo_passes=while-loop-invariant-code-motion"

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from configs import base
    from grpo_jax.models import architecture
    from grpo_jax.models import lora
    from grpo_jax.models import placement
    from grpo_jax.parallel import compiled
    from grpo_jax.parallel import partitioning
    from grpo_jax.rl import grpo
    from grpo_jax.rl import loss
    from grpo_jax.rl import train_state
    from grpo_jax.rollout import sampler
    from grpo_jax.run import memory_plan

    devices = jax.devices()
    if len(devices) < n_dev:
        devices = jax.devices("cpu")
    if len(devices) < n_dev:
        raise SystemExit(f"mesh {mesh_shape} needs {n_dev} devices; have {len(devices)} "
                         f"(set XLA_FLAGS=--xla_force_host_platform_device_count={n_dev})")
    data, fsdp, tensor, expert = (mesh_shape + (1,))[:4]
    mesh = partitioning.make_mesh(data, fsdp, tensor, devices=devices[:n_dev], expert=expert)
    cfg = architecture.SHAPES[args.shape].replace(dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
                                           attention=args.attention, moe_impl=args.moe_impl, lora_rank=args.lora_rank,
                                           lora_alpha=args.lora_alpha)
    rows = args.prompts * args.num_generations
    P_len, C = args.prompt_len, args.new_tokens
    T = P_len + C
    dt, pdt = jnp.dtype(args.dtype).itemsize, jnp.dtype(args.param_dtype).itemsize

    per_device, abstract = memory_plan.per_device, memory_plan.abstract
    replicated = NamedSharding(mesh, P())
    c = base.get_config()
    tx, _ = train_state.make_optimizer(c.optimizer, 1000)
    state = memory_plan.abstract_state(cfg, mesh, tx)
    params, opt_state, frozen = state.params, state.opt_state, state.frozen
    row = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=partitioning.batch_sharding(mesh, len(shape)))
    batch = {"prompt_ids": row((rows, P_len), jnp.int32), "prompt_mask": row((rows, P_len), bool),
             "completion_ids": row((rows, C), jnp.int32), "completion_mask": row((rows, C), bool),
             "truncated": row((rows,), bool), "advantages": row((rows,), jnp.float32),
             "sampler_logp": row((rows, C), jnp.float32)}  # one update per rollout: no old_logp
    if args.beta > 0:
        batch["ref_logp"] = row((rows, C), jnp.float32)
    loss_cfg = loss.LossConfig(beta=args.beta, logprob_chunk=args.logprob_chunk, max_completion_length=C)
    out = {"shape": args.shape, "mesh": dict(zip(("data", "fsdp", "tensor", "expert"), (data, fsdp, tensor, expert))),
           "device": f"{devices[0].platform} ({devices[0].device_kind})", "host": platform.processor() or platform.machine(),
           "jax": jax.__version__, "rows": rows, "tokens": T, "dtype": args.dtype, "param_dtype": args.param_dtype,
           "remat": args.remat, "microbatches": args.microbatches, "lora_rank": args.lora_rank,
           "xla_flags": os.environ["XLA_FLAGS"]}

    # ---- the update ------------------------------------------------------------------------------
    t = time.perf_counter()
    update = jax.jit(functools.partial(grpo.update, model_cfg=cfg, loss_cfg=loss_cfg, mesh=mesh,
                                       num_microbatches=args.microbatches, tx=tx), donate_argnums=0)
    exe = update.lower(state, batch).compile()
    out["update_compile_s"] = round(time.perf_counter() - t, 1)
    mem = compiled.memory(exe)
    param_b, opt_b, batch_b = per_device(params), per_device(opt_state), per_device(batch)
    frozen_b = per_device(frozen) if frozen is not None else 0
    n_params = sum(math.prod(s.shape) for s in jax.tree.leaves(params))  # the trained ones
    # one layer as a device uses it: gathered over fsdp, still split over tensor (and experts over expert)
    layer_params = sum(math.prod(x.sharding.shard_shape(x.shape)[1:]) for x in jax.tree.leaves(params["layers"])) * fsdp
    micro_rows = rows // (data * fsdp * expert * args.microbatches)
    checkpoints = cfg.num_layers * micro_rows * T * cfg.hidden_size * dt
    # parameters, gradients and AdamW's two moments, each 1/n_dev; checkpoints; one gathered layer
    # (LoRA: plus the frozen base's shard and one of its layers gathered)
    ideal = 4 * n_params * pdt // n_dev + checkpoints + layer_params * (dt + pdt)
    if frozen is not None:
        ideal += frozen_b + sum(math.prod(x.sharding.shard_shape(x.shape)[1:])
                                for x in jax.tree.leaves(frozen["layers"])) * fsdp * dt
    out["update"] = {
        "peak_GiB": mem["peak"] / GiB, "ideal_GiB": ideal / GiB, "peak_over_ideal": mem["peak"] / ideal,
        "frozen_base_GiB": frozen_b / GiB,
        "parameters_GiB": param_b / GiB, "optimizer_state_GiB": opt_b / GiB, "gradients_GiB": n_params * pdt / n_dev / GiB,
        "batch_GiB": batch_b / GiB, "temporaries_GiB": mem["temporaries"] / GiB, "aliased_GiB": mem["aliased"] / GiB,
        "remat_checkpoints_GiB": checkpoints / GiB,
    }
    text = exe.as_text()
    ops = compiled.collectives(text)
    moved = compiled.collective_bytes(ops, logical=True)
    frac = (fsdp - 1) / fsdp
    zero3 = args.microbatches * 3 * n_params * dt * frac / tensor
    if data > 1:
        zero3 += args.microbatches * 2 * n_params * dt / (fsdp * tensor) * (data - 1) / data
    total = sum(moved.values())
    out["update"].update({
        "collective_GiB": {k: v / GiB for k, v in sorted(moved.items())}, "collective_total_GiB": total / GiB,
        "collective_as_compiled_GiB": sum(compiled.collective_bytes(ops).values()) / GiB,
        "zero3_ideal_GiB": zero3 / GiB, "collective_over_ideal": total / zero3 if zero3 else None,
    })
    # LM head: the largest [n, vocab] block a device computes per scan step, times the steps
    program = compiled.Program(text)
    head_rows = 0
    for loop in program.while_loops():
        body = program.computations.get(loop.body, [])
        shapes = [a.shape for ins in body for a in ins.result
                  if len(a.shape) == 2 and a.shape[1] in (cfg.vocab_size, cfg.vocab_size // tensor)
                  and a.shape[0] not in (cfg.hidden_size, cfg.hidden_size // fsdp)]
        if shapes and loop.trip_count:
            head_rows = max(head_rows, max(s[0] for s in shapes) * loop.trip_count * loop.count // max(1, args.microbatches))
    out["update"]["head_rows_per_device_per_microbatch"] = head_rows
    out["update"]["head_rows_of_microbatch"] = rows * C // args.microbatches
    print(json.dumps({"update": out["update"]}, indent=1), flush=True)

    resident = param_b + opt_b
    # ---- the reference pass ----------------------------------------------------------------------
    if args.beta > 0 and "reference" not in args.skip:
        ref = jax.jit(functools.partial(grpo.batch_logprobs, model_cfg=lora.base_config(cfg), loss_cfg=loss_cfg,
                                        mesh=mesh, num_microbatches=args.microbatches))
        seqs = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
        # The reference is stored in the compute dtype (grpo.GRPO.reference_params), in the policy's
        # layout; LoRA's is the frozen base itself (an argument of the pass, already resident).
        ref_params = frozen if frozen is not None else jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(args.dtype), sharding=x.sharding), params)
        rmem = compiled.memory(ref.lower(ref_params, seqs).compile())
        out["reference"] = {"peak_GiB": rmem["peak"] / GiB, "with_resident_state_GiB": (rmem["peak"] + resident) / GiB}
        if frozen is None:
            resident += per_device(ref_params)  # the reference weights stay for the run
        print(json.dumps({"reference": out["reference"]}, indent=1), flush=True)

    # ---- sampling --------------------------------------------------------------------------------
    if "sampling" not in args.skip:
        whole = params if frozen is None else lora.join(frozen, params)
        copy = jax.eval_shape(lambda p: sampler.inference_params(p, cfg, mesh)[0], whole)
        run_cfg = cfg.replace(param_dtype=cfg.dtype)
        copy = abstract(copy, placement.param_shardings(run_cfg, mesh, partitioning.INFERENCE_RULES))
        sc = sampler.SamplingConfig(max_new_tokens=C)
        ids = jax.ShapeDtypeStruct((args.prompts, P_len), jnp.int32, sharding=partitioning.batch_sharding(mesh)
                                   if args.prompts % partitioning.batch_shards(mesh) == 0 else replicated)
        statics = dict(cfg=run_cfg, num_generations=args.num_generations, max_new_tokens=C, mesh=mesh)
        pre = functools.partial(sampler.prefill, **statics)
        pmem = compiled.memory(sampler.prefill.lower(copy, ids, ids.update(dtype=bool), **statics).compile())
        logits, cache = jax.eval_shape(pre, copy, ids, ids.update(dtype=bool))
        specs = sampler._cache_specs(run_cfg, mesh, rows)
        cache = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, specs[k])) for k, v in cache.items()}
        logits = jax.ShapeDtypeStruct(logits.shape, logits.dtype, sharding=NamedSharding(mesh, P(partitioning.BATCH)))
        dexe = sampler.decode_program(copy, cache, logits, cfg=run_cfg, sampling=sc, mesh=mesh).compile()
        dmem = compiled.memory(dexe)
        # The first shrink of the decode batch (finished rows leave it): each row shard keeps its own rows.
        state = jax.eval_shape(lambda c, l: sampler.decode_state(c, l, sc), cache, logits)
        where = sampler._state_shardings(state, run_cfg, mesh)
        where.logits = NamedSharding(mesh, P(where.logits.spec[0]))
        state = abstract(state, where)
        size = sampler.batch_sizes(rows, sc.shrink_factor, sampler._row_shards(rows, mesh))[1:2] or (rows,)
        sexe = sampler._shrink.lower(state, None, cfg=run_cfg, size=size[0], mesh=mesh).compile()
        smem = compiled.memory(sexe)
        in_loop = [o for o in compiled.collectives(dexe.as_text()) if o.in_loop]
        # An MoE layer all-gathers its expert group's rows ([rows / (data x fsdp), ...]): tokens, not weights.
        group_rows = rows // (data * fsdp)
        weights_in_loop = [o for o in in_loop if o.op == "all-gather" and o.bytes >= 1 << 16
                           and not (cfg.num_experts and o.result[0].shape[:1] == (group_rows,))]
        # The programs' peaks include the weights they read; on one fsdp shard a LoRA run's frozen base
        # is read as it is (sampler.inference_params copies only the adapters), so it counts once.
        shared = frozen_b if frozen is not None and fsdp == 1 else 0
        resident_now = resident + frozen_b - shared
        out["sampling"] = {
            "inference_copy_GiB": (per_device(copy) - shared) / GiB, "kv_cache_GiB": per_device(cache) / GiB,
            "prefill_peak_GiB": pmem["peak"] / GiB, "decode_peak_GiB": dmem["peak"] / GiB,
            "with_resident_state_GiB": (max(pmem["peak"], dmem["peak"]) + resident_now) / GiB,
            "decode_loop_collective_bytes_per_token": sum(o.wire_bytes for o in in_loop),
            "decode_loop_weight_all_gathers": len(weights_in_loop),
            "first_shrink_rows": [rows, size[0]], "first_shrink_peak_GiB": smem["peak"] / GiB,
            "first_shrink_collective_bytes": sum(o.wire_bytes for o in compiled.collectives(sexe.as_text())),
        }
        print(json.dumps({"sampling": out["sampling"]}, indent=1), flush=True)

    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
