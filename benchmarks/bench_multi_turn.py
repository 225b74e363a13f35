"""Multi-turn rollouts with tools: prefill work, decode overlapping the calls, and the sampler/trainer
log-probability mismatch next to single-turn's.

    python benchmarks/bench_multi_turn.py                                   # tiny shape
    python benchmarks/bench_multi_turn.py --shape smollm2-135m --dtype bfloat16 --repeats 3

A random model of the shape (character vocabulary) writes the episodes; a scripted format makes
every turn that ends at ")" a calculator call (so a random model calls often), and the calculator
either answers at once or after --sleep seconds. The two tools give the same episodes (draws depend
on the key, row and position only), so their rollouts are compared like for like, alternated.

Reports, per rollout: episodes, calls, observation tokens; prefill work per episode (tokens run
through the model that were not drawn: each prompt once per group and each observation once) against
prompt + observation tokens, and what re-prefilling the history at every turn would have cost
(what samplers that re-send the conversation do); wall time with the sleeping tool against the
instant tool's wall time plus the calls' summed time; and the mean |sampler - trainer| log-probability
of the drawn tokens, episodes and single-turn rollouts of the same prompts.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from grpo_jax.models import architecture
from grpo_jax.models import tokenizer
from grpo_jax.models import transformer
from grpo_jax.rl import logprobs
from grpo_jax.rollout import multi_turn
from grpo_jax.rollout import sampler
from grpo_jax.rollout import tool_formats
from grpo_jax.rollout import tools


class Scripted(tool_formats.Plain):
    """Every turn that ends at ")" is a calculator call."""

    name, call_end = "scripted", ")"

    def calls(self, turn):
        return [tool_formats.Call("calculator", "123*456")] if turn.endswith(")") else []


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(architecture.SHAPES))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--num_generations", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=96, help="the episode's budget (model + observation tokens)")
    ap.add_argument("--max_turns", type=int, default=4)
    ap.add_argument("--sleep", type=float, default=0.2, help="seconds the slow tool takes per call")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    tok = tokenizer.CharTokenizer()
    cfg = architecture.SHAPES[args.shape].replace(vocab_size=tok.vocab_size, dtype=args.dtype)
    params = transformer.init_params(cfg, jax.random.key(0))
    sampling = sampler.SamplingConfig(max_new_tokens=args.new_tokens, eos_ids=(2,), prompt_buckets=(32,), first_segment=32)
    prompts = [tok.encode(f"What is {100 + 37 * i} * {200 + 11 * i}?") for i in range(args.prompts)]

    def calculator_taking(seconds: float):
        def calculator(expression: str) -> str:  # one name for both: the same episodes
            time.sleep(seconds)
            return tools.calculator(expression)
        return calculator

    budgets = multi_turn.Budgets(max_turns=args.max_turns, max_observation_tokens=16)
    runners = {name: multi_turn.ToolRunner(tools.ToolBox([calculator_taking(s)], workers=64), Scripted(), tok, budgets)
               for name, s in (("instant", 0.0), ("sleeping", args.sleep))}
    key = jax.random.key(1)
    G = args.num_generations
    multi_turn.sample(params, cfg, prompts, G, sampling, key, runners["instant"])  # compile
    walls = {k: [] for k in runners}
    for _ in range(args.repeats):
        for name, r in runners.items():
            start = time.perf_counter()
            rollout, stats = multi_turn.sample(params, cfg, prompts, G, sampling, key, r)
            jax.block_until_ready(rollout.tokens)
            walls[name].append((time.perf_counter() - start, stats.tool_seconds))
    lengths = np.asarray(rollout.lengths)
    prompt_tokens = np.asarray(rollout.prompt_mask).sum(axis=1)  # per episode
    obs = stats.observation_tokens
    # What a sampler that re-sends the conversation prefills: the prompt and the history before
    # each turn (the first turn's is the prompt alone).
    sampled, turn_starts = np.asarray(rollout.sampled), []
    for i in range(len(lengths)):
        starts = [t for t in range(1, lengths[i]) if sampled[i, t] and not sampled[i, t - 1]]
        turn_starts.append(starts)
    reprefill = sum(prompt_tokens[i] * (1 + len(s)) + sum(s) for i, s in enumerate(turn_starts))
    ours = stats.prefill_tokens
    baseline = int(prompt_tokens.sum() + obs.sum())

    lp, _ = logprobs.completion_logprobs(params, cfg, rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.mask)
    episode_diff = float(np.abs(np.asarray(lp) - np.asarray(rollout.logprobs))[sampled].mean())
    single = sampler.sample(params, cfg, prompts, G, sampling, key)
    lp1, _ = logprobs.completion_logprobs(params, cfg, single.prompt_ids, single.prompt_mask, single.tokens, single.mask)
    single_diff = float(np.abs(np.asarray(lp1) - np.asarray(single.logprobs))[np.asarray(single.mask)].mean())

    med = {k: statistics.median(w for w, _ in v) for k, v in walls.items()}
    tool_s = statistics.median(t for _, t in walls["sleeping"])
    out = {"episodes": len(lengths), "calls": int(stats.calls.sum()), "observation_tokens": int(obs.sum()),
           "prefill_per_unique": ours / baseline, "reprefill_per_unique": reprefill / baseline,
           "wall_instant_s": med["instant"], "wall_sleeping_s": med["sleeping"], "tool_s": tool_s,
           "logp_diff_episodes": episode_diff, "logp_diff_single_turn": single_diff}
    print(f"{args.shape} ({args.dtype}), {args.prompts} prompts x G={G}, {args.new_tokens} tokens per episode, "
          f"up to {args.max_turns} turns; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"median of {args.repeats}")
    print(f"episodes {out['episodes']}, calls {out['calls']}, observation tokens {out['observation_tokens']}, "
          f"prefix violations {stats.prefix_violations}")
    print(f"prefill work / (prompt + observation tokens): {out['prefill_per_unique']:.3f} "
          f"(re-prefilling the history every turn: {out['reprefill_per_unique']:.2f})")
    print(f"wall with a {args.sleep:g} s tool: {med['sleeping']:.2f} s; instant tool {med['instant']:.2f} s + the "
          f"calls' {tool_s:.2f} s = {med['instant'] + tool_s:.2f} s")
    print(f"mean |sampler - trainer| log-prob of drawn tokens: episodes {episode_diff:.2e}, single-turn {single_diff:.2e}")
    return out


if __name__ == "__main__":
    main()
