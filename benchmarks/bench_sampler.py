"""Sampler throughput against the memory-bandwidth roofline.

    python benchmarks/bench_sampler.py --shape qwen2.5-0.5b --batch 64 256 --prompt_len 128 \\
        --new_tokens 256 --dtype bfloat16 --out bench_sampler.json      # on a GPU
    python benchmarks/bench_sampler.py                                     # tiny shape, CPU smoke run
    python benchmarks/bench_sampler.py --lengths lognormal:300:1.0 --batch 256 --new_tokens 4096 \
        --num_generations 8                                             # long-tailed rollout

Random weights of a model shape from grpo_jax.models.architecture.SHAPES, random-token prompts of exactly
--prompt_len tokens, EOS disabled so every row generates --new_tokens tokens. Prints and writes JSON:
completion tokens/s, seconds per decode step, compile time, and the fraction of the bandwidth roofline

    roofline tokens/s = batch / ((parameter bytes + KV-cache bytes read per step) / bandwidth)

where the KV bytes per step count the average context (prompt + new_tokens / 2) of every row and the
bandwidth is measured on the device by copying a large array (read + write), as in shared/anchors.

--lengths DIST forces each row's EOS at a length drawn (fixed seed) from DIST: lognormal:MEAN:SIGMA
(lengths capped at --new_tokens) or a file of lengths, one per line (drawn from with replacement). It
runs the rollout with the sampler as configured and as a static batch attending over the whole cache
(first_segment = new_tokens, shrink_factor = 1: the sampler before issue 20), alternated, and reports
tokens generated per second, computed row-steps per generated token (rows in the batch x steps, summed),
the speed-up, whether the tokens are identical, and the programs each compiled.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.models import architecture
from grpo_jax.models import lora
from grpo_jax.models import transformer
from grpo_jax.rollout import sampler


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Device memory bandwidth in bytes/s from an array copy (bytes read + bytes written)."""
    n = nbytes // 4
    x = jnp.ones((n,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    copy(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        copy(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best


def bench_one(params, cfg, batch, num_generations, prompt_len, new_tokens, repeats, seed=0):
    rng = np.random.default_rng(seed)
    n_prompts = batch // num_generations
    prompts = rng.integers(0, cfg.vocab_size, size=(n_prompts, prompt_len)).tolist()
    sc = sampler.SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, eos_ids=(), prompt_buckets=(prompt_len,))
    ids, mask = (jnp.asarray(a) for a in sampler.pad_prompts(prompts, sc.prompt_buckets))
    key = jax.random.key(seed)

    t0 = time.perf_counter()
    prefill = sampler.prefill.lower(params, ids, mask, cfg=cfg, num_generations=num_generations,
                                    max_new_tokens=new_tokens).compile()
    decode = functools.partial(sampler.decode, cfg=cfg, sampling=sc)
    logits, cache = prefill(params, ids, mask)
    decode(params, cache, logits, key).tokens.block_until_ready()  # compiles decode's programs
    first_s = time.perf_counter() - t0

    times, prefill_times = [], []
    for r in range(repeats):
        t = time.perf_counter()
        lg, c = prefill(params, ids, mask)
        jax.block_until_ready(lg)
        t_pre = time.perf_counter()
        out = decode(params, c, lg, jax.random.fold_in(key, r))
        out.tokens.block_until_ready()
        times.append(time.perf_counter() - t)
        prefill_times.append(t_pre - t)
    lengths = out.lengths
    assert int(jnp.min(lengths)) == new_tokens, "EOS is disabled: every row must generate the full length"
    total = float(np.median(times))
    pre = float(np.median(prefill_times))
    return {
        "batch": batch,
        "num_generations": num_generations,
        "new_tokens_total": batch * new_tokens,
        "seconds": total,
        "prefill_seconds": pre,
        "tokens_per_s": batch * new_tokens / total,
        "decode_tokens_per_s": batch * new_tokens / (total - pre),
        "s_per_decode_step": (total - pre) / new_tokens,
        "compile_s": first_s - float(np.median(times)),  # the first call less a warm one
    }


def draw_lengths(spec: str, n: int, cap: int, seed: int = 0) -> np.ndarray:
    """n completion lengths in [1, cap] from spec: lognormal:MEAN:SIGMA or a file of lengths."""
    rng = np.random.default_rng(seed)
    if spec.startswith("lognormal:"):
        mean, sigma = (float(x) for x in spec.split(":")[1:])
        lengths = rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, n)  # E = exp(mu + sigma^2 / 2) = mean
    else:
        lengths = rng.choice(np.loadtxt(spec, ndmin=1), n)
    return np.clip(np.ceil(lengths), 1, cap).astype(np.int32)


def bench_lengths(params, cfg, batch: int, num_generations: int, prompt_len: int, new_tokens: int,
                  spec: str, repeats: int, seed: int = 0, static: bool = True) -> dict:
    """A rollout with EOS forced at drawn lengths: the sampler as configured against a static batch
    that reads the whole cache (static=False: the sampler alone), alternated, same key."""
    rng = np.random.default_rng(seed)
    lengths = draw_lengths(spec, batch, new_tokens, seed)
    prompts = rng.integers(1, cfg.vocab_size, size=(batch // num_generations, prompt_len)).tolist()
    ids, mask = (jnp.asarray(a) for a in sampler.pad_prompts(prompts, (prompt_len,)))
    eos = cfg.vocab_size - 1
    modes = {"sampler": sampler.SamplingConfig(max_new_tokens=new_tokens, eos_ids=(eos,), prompt_buckets=(prompt_len,)),
             "static, whole cache": sampler.SamplingConfig(max_new_tokens=new_tokens, eos_ids=(eos,),
                                                           prompt_buckets=(prompt_len,), first_segment=new_tokens,
                                                           shrink_factor=1.0)}
    if not static:
        del modes["static, whole cache"]
    key = jax.random.key(seed)

    def run(sc):
        logits, cache = sampler.prefill(params, ids, mask, cfg=cfg, num_generations=num_generations, max_new_tokens=new_tokens)
        t = time.perf_counter()
        out = sampler.decode(params, cache, logits, key, cfg=cfg, sampling=sc, eos_at=lengths)
        out.tokens.block_until_ready()
        return out, time.perf_counter() - t

    result = {"lengths": spec, "batch": batch, "mean_length": float(lengths.mean()), "max_length": int(lengths.max()),
              "tokens": int(lengths.sum()),
              # a static batch runs every row until the longest ends
              "static_row_steps_per_token": batch * int(lengths.max()) / int(lengths.sum())}
    outs, times, programs = {}, {m: [] for m in modes}, {}
    for name, sc in modes.items():  # compile (and keep the compiled program count of each)
        before = sampler.compiled_programs()
        t = time.perf_counter()
        outs[name] = run(sc)[0]
        programs[name] = {k: v - before[k] for k, v in sampler.compiled_programs().items()}
        result[f"{name}: first run incl. compile s"] = time.perf_counter() - t
    for _ in range(repeats):
        for name, sc in modes.items():
            times[name].append(run(sc)[1])
    got = outs["sampler"]
    assert int(np.asarray(got.lengths).sum()) == result["tokens"], "every row stops at its drawn length"
    if static:
        ref = outs["static, whole cache"]
        result["identical_tokens"] = bool(np.array_equal(np.asarray(got.tokens), np.asarray(ref.tokens)))
    for name in modes:
        s = float(np.median(times[name]))
        result[name] = {"decode_s": s, "tokens_per_s": result["tokens"] / s,
                        "row_steps_per_token": outs[name].row_steps / result["tokens"],
                        "decode_calls": len(outs[name].batches), "compiled_programs": programs[name]}
    if static:
        result["speedup"] = result["static, whole cache"]["decode_s"] / result["sampler"]["decode_s"]
    return result


def step_cost(params, cfg, batch: int, prompt_len: int, max_new_tokens: int, position: int,
              repeats: int = 5, full_cache: bool = False) -> float:
    """Seconds of one decode step (transformer.forward of one token per row with the cache) at completion
    position `position` of a rollout with max_new_tokens: attending over the slots decode's segment
    reads there (sampler.segment_ends), or over the whole cache with full_cache (before issue 20)."""
    S = prompt_len + max_new_tokens
    end = next(e for e in sampler.segment_ends(max_new_tokens) if position < e)
    kv_len = None if full_cache else prompt_len + end
    cache = transformer.init_cache(cfg, batch, S)
    cache["mask"] = jnp.arange(S)[None].repeat(batch, 0) < prompt_len + position
    cache["index"] = jnp.asarray(prompt_len + position, jnp.int32)
    cache["pos"] = jnp.full((batch,), prompt_len + position, jnp.int32)
    # The cache is donated, as in decode's loop, where it is updated in place (an undonated cache
    # would be copied whole at every call: a cost that follows its size whatever the step reads).
    step = jax.jit(lambda p, c, t: transformer.forward(p, cfg, t, None, c, kv_len=kv_len), donate_argnums=1)
    tok = jnp.ones((batch, 1), jnp.int32)
    _, cache = step(params, cache, tok)
    best = float("inf")
    for _ in range(repeats):  # positions position + 1 ... position + repeats, inside the same segment
        t = time.perf_counter()
        logits, cache = step(params, cache, tok)
        logits.block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


def lora_cost(params, cfg, rank: int, batch: int, prompt_len: int, max_new_tokens: int, repeats: int = 5) -> dict:
    """Sampling a LoRA policy, unmerged against merged (grpo_jax.models.lora): one decode step at the middle
    of the rollout with the adapters applied at every projection (x W + (x A) B s) and with them
    folded into a rollout copy of the weights (the base model's cost), alternated; the seconds to
    make that merged copy once per rollout; and how far the merged copy's log-probabilities drift
    from the unmerged ones the trainer computes, on the same tokens (trained adapters: B random)."""
    lcfg = cfg.replace(lora_rank=rank, lora_alpha=2.0 * rank)
    keys = iter(jax.random.split(jax.random.key(1), 256))
    adapters = jax.tree_util.tree_map_with_path(  # B moved off zero, as after training
        lambda path, x: 0.02 * jax.random.normal(next(keys), x.shape, x.dtype) if path[-1].key == "b" else x,
        lora.split(jax.jit(transformer.init_params, static_argnums=0)(lcfg, jax.random.key(2)))[1])
    unmerged = lora.join(params, adapters)
    merge = jax.jit(lambda p: lora.merged(p, lcfg))
    merged = merge(unmerged)
    jax.block_until_ready(merged)
    base_cfg = lora.base_config(lcfg)
    position = max_new_tokens // 2
    times = {"unmerged": [], "merged": [], "merge": []}
    for _ in range(2):
        times["unmerged"].append(step_cost(unmerged, lcfg, batch, prompt_len, max_new_tokens, position, repeats))
        times["merged"].append(step_cost(merged, base_cfg, batch, prompt_len, max_new_tokens, position, repeats))
        t = time.perf_counter()
        jax.block_until_ready(merge(unmerged))
        times["merge"].append(time.perf_counter() - t)
    ids = jax.random.randint(jax.random.key(3), (min(batch, 8), prompt_len + 64), 1, cfg.vocab_size)
    logp = lambda p, c: jax.nn.log_softmax(transformer.forward(p, c, ids)[0].astype(jnp.float32))
    drift = jnp.abs(jax.jit(logp, static_argnums=1)(unmerged, lcfg) - jax.jit(logp, static_argnums=1)(merged, base_cfg))
    best = {k: min(v) for k, v in times.items()}
    return {"rank": rank, "batch": batch, "position": position, "step_ms_unmerged": best["unmerged"] * 1e3,
            "step_ms_merged": best["merged"] * 1e3, "unmerged_over_merged": best["unmerged"] / best["merged"],
            "merge_s": best["merge"], "merge_in_steps": best["merge"] / best["merged"],
            "merged_logp_drift_max": float(drift.max()), "merged_logp_drift_mean": float(drift.mean())}


def choose_cost(rows: int, vocab: int, settings: list[tuple[int, float]], repeats: int = 3) -> list[dict]:
    """Seconds per call of sampler.choose_tokens on random logits [rows, vocab] for each (top_k,
    top_p), alternated over the settings `repeats` times (the best of each is kept)."""
    logits = jax.random.normal(jax.random.key(0), (rows, vocab)) * 4
    fns = [jax.jit(lambda k, x, sc=sampler.SamplingConfig(top_k=tk, top_p=tp):
                   sampler.choose_tokens(jax.random.split(k, rows), x, sc)) for tk, tp in settings]  # a key per row
    # before issue 20: the filter over the whole (sorted) vocabulary, then a draw from all of it
    fns += [jax.jit(lambda k, x, tk=tk, tp=tp: jax.random.categorical(k, sampler.filter_logits(x, tk, tp)))
            for tk, tp in settings[1:]]
    best = [float("inf")] * len(fns)
    for r in range(repeats + 1):  # the first round compiles
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            jax.block_until_ready(fn(jax.random.key(r), logits))
            if r:
                best[i] = min(best[i], time.perf_counter() - t)
    labels = [(tk, tp, "candidates") for tk, tp in settings] + [(tk, tp, "whole vocabulary") for tk, tp in settings[1:]]
    return [{"top_k": tk, "top_p": tp, "filter": how, "ms": b * 1e3, "vs_plain": b / best[0]}
            for (tk, tp, how), b in zip(labels, best)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(architecture.SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[8], help="completions per call")
    ap.add_argument("--num_generations", type=int, default=1, help="G: completions share a prompt's prefill")
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32", help="compute and parameter dtype")
    ap.add_argument("--layers", type=int, default=None,
                    help="run only this many of the shape's layers (a 30B shape on a small host); tok/s then "
                         "is that of the truncated model")
    ap.add_argument("--moe_impl", default=None, choices=["auto", "ragged", "dense"], help="model.moe_impl")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--choose_cost", action="store_true",
                    help="time token choice alone (64 rows x the shape's vocabulary): plain, top_k=50, top_p=0.95, both")
    ap.add_argument("--step_cost", nargs="*", default=[], metavar="POSITION:MAX_NEW_TOKENS",
                    help="time one decode step at these positions of rollouts of these lengths (e.g. 256:4096 "
                         "256:512), as decode reads the cache and as it read the whole cache before")
    ap.add_argument("--lengths", default=None, metavar="DIST",
                    help="force EOS at lengths drawn from lognormal:MEAN:SIGMA or a file; compare with a static "
                         "whole-cache batch (instead of the fixed-length runs)")
    ap.add_argument("--no_static", action="store_true", help="with --lengths: run the sampler alone")
    ap.add_argument("--lora_rank", type=int, default=0,
                    help="> 0: only time a decode step of a LoRA policy unmerged and merged, the merge, and the "
                         "merged copy's log-probability drift (at the first --batch; the middle of --new_tokens)")
    ap.add_argument("--bandwidth_gbps", type=float, default=None, help="skip measuring; use this (GB/s)")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args(argv)

    cfg = architecture.SHAPES[args.shape].replace(dtype=args.dtype, param_dtype=args.dtype)
    if args.prompt_len + args.new_tokens > cfg.max_position_embeddings:  # random weights: any positions will do
        cfg = cfg.replace(max_position_embeddings=args.prompt_len + args.new_tokens)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers, layer_types=cfg.layer_types and cfg.layer_types[:args.layers])
    if args.moe_impl:
        cfg = cfg.replace(moe_impl=args.moe_impl)
    params = jax.jit(transformer.init_params, static_argnums=0)(cfg, jax.random.key(0))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    bw = args.bandwidth_gbps * 1e9 if args.bandwidth_gbps else measure_bandwidth(
        (1 << 30) if jax.default_backend() != "cpu" else (1 << 27))
    result = {
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "host": platform.node(), "jax": jax.__version__, "shape": args.shape, "dtype": args.dtype,
        "layers": cfg.num_layers, "moe_impl": cfg.moe_impl if cfg.num_experts else None,
        "params": cfg.num_params, "param_bytes": param_bytes, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "bandwidth_GBps": bw / 1e9, "runs": [],
    }
    kv_tok = transformer.kv_cache_bytes_per_token(cfg)
    if args.choose_cost:
        result["choose_cost"] = choose_cost(64, cfg.vocab_size, [(0, 1.0), (50, 1.0), (0, 0.95), (50, 0.95)])
        for row in result["choose_cost"]:
            print(f"choose_tokens top_k={row['top_k']} top_p={row['top_p']} ({row['filter']}): {row['ms']:.1f} ms "
                  f"({row['vs_plain']:.2f}x plain)", flush=True)
    if args.lora_rank:
        result["lora"] = lora_cost(params, cfg, args.lora_rank, args.batch[0], args.prompt_len, args.new_tokens,
                                   args.repeats)
        r = result["lora"]
        print(f"LoRA rank {r['rank']}, batch {r['batch']}: a decode step unmerged {r['step_ms_unmerged']:.2f} ms, merged "
              f"{r['step_ms_merged']:.2f} ms ({r['unmerged_over_merged']:.2f}x); merging {r['merge_s'] * 1e3:.1f} ms "
              f"(= {r['merge_in_steps']:.1f} merged steps); merged log-prob drift max {r['merged_logp_drift_max']:.2e}, "
              f"mean {r['merged_logp_drift_mean']:.2e}", flush=True)
        return _finish(result, args.out)  # the LoRA comparison alone
    result["step_cost"] = []
    for spec in args.step_cost:  # alternated: segment read, whole cache, per spec, twice
        pos, total = (int(x) for x in spec.split(":"))
        b = args.batch[0]
        runs = [(step_cost(params, cfg, b, args.prompt_len, total, pos), step_cost(params, cfg, b, args.prompt_len, total,
                 pos, full_cache=True)) for _ in range(2)]
        row = {"position": pos, "max_new_tokens": total, "batch": b, "ms": min(r[0] for r in runs) * 1e3,
               "ms_whole_cache": min(r[1] for r in runs) * 1e3}
        result["step_cost"].append(row)
        print(f"step at {pos} of {total}: {row['ms']:.2f} ms ({row['ms_whole_cache']:.2f} ms reading the whole cache)",
              flush=True)
    for b in args.batch if args.lengths else ():
        run = bench_lengths(params, cfg, b, args.num_generations, args.prompt_len, args.new_tokens, args.lengths,
                            args.repeats, static=not args.no_static)
        result["runs"].append(run)
        for name in ("sampler", "static, whole cache")[:1 if args.no_static else 2]:
            r = run[name]
            print(f"batch {b} {name}: {r['tokens_per_s']:,.0f} tok/s, {r['decode_s']:.2f} s, "
                  f"{r['row_steps_per_token']:.2f} row-steps per token, {r['decode_calls']} calls, "
                  f"programs {r['compiled_programs']}", flush=True)
        print(f"batch {b}: mean length {run['mean_length']:.0f}, max {run['max_length']}, a static batch would "
              f"compute {run['static_row_steps_per_token']:.2f} row-steps per token"
              + ("" if args.no_static else f"; {run['speedup']:.2f}x, identical tokens: {run['identical_tokens']}"),
              flush=True)
    for b in args.batch if not args.lengths else ():
        run = bench_one(params, cfg, b, args.num_generations, args.prompt_len, args.new_tokens, args.repeats)
        avg_ctx = args.prompt_len + args.new_tokens / 2
        step_bytes = param_bytes + b * avg_ctx * kv_tok
        run["roofline_tokens_per_s"] = b / (step_bytes / bw)
        run["roofline_fraction"] = run["decode_tokens_per_s"] / run["roofline_tokens_per_s"]
        result["runs"].append(run)
        print(f"batch {b:5d}: {run['tokens_per_s']:>10,.0f} tok/s end to end, {run['decode_tokens_per_s']:>10,.0f} "
              f"decode tok/s, {run['s_per_decode_step'] * 1e3:.2f} ms/step, compile {run['compile_s']:.1f} s, "
              f"roofline {run['roofline_tokens_per_s']:,.0f} tok/s ({100 * run['roofline_fraction']:.1f}%)", flush=True)
    # programs compiled by the rollouts above (bench_one lowers its own: count the jit caches of a sample())
    sampler.sample(params, cfg, [[1] * args.prompt_len], 1, sampler.SamplingConfig(
        max_new_tokens=args.new_tokens, eos_ids=(), prompt_buckets=(args.prompt_len,)), jax.random.key(0))
    result["compiled_programs"] = sampler.compiled_programs()
    print(f"compiled programs for one prompt bucket: {result['compiled_programs']}", flush=True)
    return _finish(result, args.out)


def _finish(result: dict, out: str | None) -> dict:
    if out:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
