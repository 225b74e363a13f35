"""grpo_jax against TRL's GRPOTrainer on the same GRPO problem: SmolLM2-135M-Instruct after the same
cold start, the same prompts, reward, G, completion length, learning rate and schedule, KL,
clipping and loss aggregation; each run with its own seed. Reward curves and held-out accuracy of
both on one figure, wall time and peak memory of each run.

    python benchmarks/compare_trl.py --set steps=50       # seeds 0 and 1 of each, alternating (~1.5 h on 2 cores)
    python benchmarks/compare_trl.py --smoke              # two steps each on a few problems (~3 min)

1. The cold start (the config's stage 1) runs once, in OUT/grpo_jax/seed<first>/cold_start, and is
   exported as an HF folder (OUT/cold_start_hf): both trainers start from it.
2. OUT/task.json: the training and held-out problems as chat messages with grpo_jax's prompt token
   ids (TRL's tokens are checked against them), and the GRPO settings mapped to GRPOConfig fields.
3. For each seed, grpo_jax's GRPO stage (scripts/train.py, the cold start copied in and reused)
   then TRL's (benchmarks/trl_grpo.py in its own environment): alternating, so that the machine's load
   falls on both alike. Wall time and peak RSS of each run's process tree (os.wait4).
   OUT/results.json keeps finished runs: run the command again to continue.
4. OUT/compare_trl.png and a table.

TRL lives in its own virtual environment, never in grpo_jax's: created on first use in
$GRPO_JAX_CACHE/trl-venv (trl 1.16.0, torch 2.13.0 CPU, transformers 5.23.0, math-verify for the shared grader; pip,
~2 min), or
--python=an interpreter that has TRL. What TRL is given cannot match exactly: where a step's
rewards are all equal grpo_jax skips the optimizer update (no gradient), TRL applies Adam's momentum
with a zero gradient; the data order and samples come from each library's own seeded streams.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TRL_PINS = ("trl==1.16.0", "torch==2.13.0", "transformers==5.23.0", "datasets==5.2.0", "accelerate==1.15.0",
            "math-verify==0.9.0", "sympy==1.14.0")  # the last two: grpo_jax's math grader, read by file path
SMOKE = {"steps": 2, "cold_start.steps": 2, "data.eval_size": 8, "grpo.prompts_per_step": 2,
         "grpo.num_generations": 4, "eval.every": 1, "eval.k": 1, "sft.examples": 32, "checkpoint.every": 2,
         "optimizer.warmup_steps": 1}
# grpo_jax's loss aggregation -> TRL's loss_type (one process: "dapo" and "bnpo" are the same token mean).
LOSS_TYPES = {"seq-mean-token-mean": "grpo", "token-mean": "dapo"}


def load_config(path: str, overrides: dict):
    from grpo_jax.run import config

    cfg = config.load_file(path)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.check(cfg)
    return cfg


def _parse(kv: str) -> tuple[str, object]:
    key, _, text = kv.partition("=")
    for cast in (int, float):
        try:
            return key, cast(text)
        except ValueError:
            pass
    return key, text


def trl_settings(g) -> dict:
    """The GRPO stage's config `g` as what benchmarks/trl_grpo.py passes to GRPOConfig; settings TRL
    would run differently are refused by name."""
    same = {"grpo.advantage_estimator": (g.grpo.advantage_estimator, "grpo"),
            "grpo.num_iterations": (g.grpo.num_iterations, 1), "grpo.std_ddof": (g.grpo.std_ddof, 1),
            "grpo.scale_rewards": (g.grpo.scale_rewards or "group", "group"),
            "grpo.clip_eps_high": (g.grpo.clip_eps_high or g.grpo.clip_eps_low, g.grpo.clip_eps_low),
            "grpo.importance_level": (g.grpo.importance_level, "token"), "grpo.kl_estimator": (g.grpo.kl_estimator, "k3"),
            "grpo.mask_truncated": (g.grpo.mask_truncated, False), "grpo.dynamic_sampling": (g.grpo.dynamic_sampling, False),
            "grpo.overlong_buffer": (g.grpo.overlong_buffer, 0), "sampling.temperature": (g.sampling.temperature, 1.0),
            "sampling.top_k": (g.sampling.top_k, 0), "sampling.top_p": (g.sampling.top_p, 1.0),
            "optimizer.schedule": (g.optimizer.schedule, "cosine"), "model.lora.rank": (g.model.lora.rank, 0),
            "model.dtype": (g.model.dtype, "float32"), "grpo.aggregation in " + str(list(LOSS_TYPES)):
                (g.grpo.aggregation in LOSS_TYPES, True),
            "rewards within {math, answer_format}": (set(g.rewards) <= {"math", "answer_format"}, True)}
    bad = {k: v for k, (v, want) in same.items() if v != want}
    if bad:
        raise SystemExit(f"compare_trl maps only settings TRL runs the same way; these differ: {bad}")
    o = g.optimizer
    return {"steps": g.steps, "prompts_per_step": g.grpo.prompts_per_step, "num_generations": g.grpo.num_generations,
            "max_new_tokens": g.sampling.max_new_tokens, "eos_ids": list(g.sampling.eos_ids), "beta": g.grpo.beta,
            "clip_eps": g.grpo.clip_eps_low, "loss_type": LOSS_TYPES[g.grpo.aggregation],
            "reward_weights": [float(g.rewards.get("math", 0.0)), float(g.rewards.get("answer_format", 0.0))],
            "eval_every": g.eval.every, "eval_k": g.eval.k,
            "optimizer": {k: o[k] for k in ("learning_rate", "warmup_steps", "final_lr_fraction", "b1", "b2",
                                            "weight_decay", "max_grad_norm")}}


def write_task(g, model_dir: str, path: str) -> None:
    from grpo_jax.common import data
    from grpo_jax.rollout import policy
    from grpo_jax.run import loading

    tok = loading.load_tokenizer(g.model)
    fmt = policy.PromptFormat(g.data.template, g.data.prompt_field, g.data.instruction, g.data.get("enable_thinking"))
    if fmt.template != "chat":
        raise SystemExit(f"data.template={fmt.template!r}: compare_trl gives TRL chat messages; use 'chat'")
    task = data.load_task(g.data, g.seed)

    def rows(rs):
        return [{"prompt": [{"role": "user", "content": str(r[fmt.field]) + (f" {fmt.instruction}" if fmt.instruction
                                                                              else "")}],
                 "answer": r["answer"], "prompt_ids": fmt.ids(r, tok)} for r in rs]

    with open(path, "w") as f:
        json.dump({"model": model_dir, "settings": trl_settings(g), "train": rows(task.train), "eval": rows(task.eval)}, f)


def trl_python(args) -> str:
    if args.python:
        return args.python
    venv = os.path.join(os.environ.get("GRPO_JAX_CACHE", os.path.expanduser("~/.cache/grpo_jax")), "trl-venv")
    py = os.path.join(venv, "bin", "python")
    if subprocess.run([py, "-c", "import trl, math_verify"], capture_output=True).returncode if os.path.exists(py) else True:
        print(f"== creating TRL's environment in {venv} ({' '.join(TRL_PINS)})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    return py


def timed(cmd: list[str], log: str) -> dict:
    """Run cmd (output to log); its wall time and the peak RSS of its process tree."""
    print("== " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{cmd[1]} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


def grpo_jax_curves(workdir: str) -> dict:
    from grpo_jax.common import metrics

    s = metrics.read_scalars(os.path.join(workdir, "grpo", "tb"))
    return {"reward": s.get("reward", []), "rewards/answer_format/mean": s.get("rewards/answer_format/mean", []),
            "eval/pass@1": s.get("eval/pass@1", []),
            "eval/sampled": next((v for k, v in s.items() if k.startswith("eval/mean@") and k.endswith("_sampled")), [])}


def trl_curves(out: str) -> dict:
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    pick = lambda key: [(r["step"], r[key]) for r in recs if key in r]  # noqa: E731
    return {"reward": pick("reward"), "rewards/answer_format/mean": pick("rewards/answer_format/mean"),
            "eval/pass@1": pick("eval/pass@1"),
            "eval/sampled": [(r["step"], v) for r in recs for k, v in r.items() if k.startswith("eval/mean@")]}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"grpo_jax": "tab:blue", "trl": "tab:orange"}
    for name, r in sorted(results.items()):
        lib, seed = name.rsplit("/seed", 1)
        style = dict(color=colors[lib], ls="-" if seed == "0" else "--", label=f"{lib} seed {seed}")
        c = r["curves"]
        steps, vals = zip(*c["reward"]) if c["reward"] else ((), ())
        w = 5  # trailing mean: a step's reward is 64 samples
        axes[0].plot(steps, [sum(vals[max(0, i - w + 1):i + 1]) / len(vals[max(0, i - w + 1):i + 1])
                             for i in range(len(vals))], **style)
        for ax, key in ((axes[1], "eval/pass@1"), (axes[2], "eval/sampled")):
            if c[key]:
                ax.plot(*zip(*c[key]), marker="o", **style)
    for ax, title in zip(axes, ("training reward (5-step mean)", "held-out pass@1, greedy",
                                "held-out accuracy, sampled at T=1")):
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("SmolLM2-135M-Instruct after the same cold start: grpo_jax vs TRL GRPOTrainer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "smollm2.py"))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default=None, help="default: runs/compare_trl (runs/compare_trl_smoke with --smoke)")
    ap.add_argument("--python", default=None, help="an interpreter with TRL (default: its own venv, made on first use)")
    ap.add_argument("--smoke", action="store_true", help="two steps each on a few problems")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="config fields for both sides, e.g. --set steps=50 (ints, floats and strings)")
    args = ap.parse_args()
    out = os.path.abspath(args.out or os.path.join(ROOT, "runs", "compare_trl_smoke" if args.smoke else "compare_trl"))
    os.makedirs(out, exist_ok=True)
    overrides = {**(SMOKE if args.smoke else {}), **dict(_parse(kv) for kv in args.set)}
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    seeds = [int(s) for s in args.seeds.split(",")]
    from grpo_jax.run import pipeline

    cfg = load_config(args.config, overrides)
    g = pipeline.stage_config(cfg, "grpo")  # the GRPO stage as it runs: its settings go to TRL
    python = trl_python(args)

    first = os.path.join(out, "grpo_jax", f"seed{seeds[0]}")
    cold = os.path.join(first, "cold_start")
    train = [sys.executable, "scripts/train.py", f"--config={args.config}", *flags]
    if not os.path.exists(os.path.join(cold, "stage.json")):
        timed(train + [f"--config.workdir={first}", f"--config.seed={seeds[0]}", "--until_stage=cold_start"],
              os.path.join(out, "cold_start.log"))
    model_dir = os.path.join(out, "cold_start_hf")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        timed([sys.executable, "scripts/export_hf.py", f"--config={args.config}", *flags, f"--config.workdir={first}",
               "--stage=cold_start", f"--out={model_dir}"], os.path.join(out, "export.log"))
    task = os.path.join(out, "task.json")
    write_task(g, model_dir, task)

    results_path = os.path.join(out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    for seed in seeds:
        for lib in ("grpo_jax", "trl"):
            name, wd = f"{lib}/seed{seed}", os.path.join(out, lib, f"seed{seed}")
            if name in results:
                continue
            if lib == "grpo_jax":
                if not os.path.exists(os.path.join(wd, "cold_start")):
                    shutil.copytree(cold, os.path.join(wd, "cold_start"))
                r = timed(train + [f"--config.workdir={wd}", f"--config.seed={seed}"], os.path.join(out, f"{lib}_seed{seed}.log"))
                r["curves"] = grpo_jax_curves(wd)
            else:
                r = timed([python, "benchmarks/trl_grpo.py", f"--task={task}", f"--seed={seed}", f"--out={wd}"],
                          os.path.join(out, f"{lib}_seed{seed}.log"))
                r["curves"] = trl_curves(wd)
            results[name] = r
            with open(results_path, "w") as f:
                json.dump(results, f)
    plot(results, os.path.join(out, "compare_trl.png"))
    print(f"\n| run | wall (GRPO stage) | peak RSS | reward, first 5 -> last 5 steps | held-out greedy, start -> end "
          f"| sampled, start -> end |\n|---|---|---|---|---|---|")
    for name, r in sorted(results.items()):
        c = r["curves"]
        rw = [v for _, v in c["reward"]]
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        ends = lambda key: f"{c[key][0][1]:.3f} -> {c[key][-1][1]:.3f}" if c[key] else "-"  # noqa: E731
        print(f"| {name} | {r['wall_s']:.0f} s | {r['peak_rss_gb']:.1f} GB | {mean(rw[:5]):.3f} -> {mean(rw[-5:]):.3f} "
              f"| {ends('eval/pass@1')} | {ends('eval/sampled')} |")
    print(f"\nwrote {os.path.join(out, 'compare_trl.png')} and {results_path}")


if __name__ == "__main__":
    main()
