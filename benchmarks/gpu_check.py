"""Every figure the project needs from an accelerator, in one prepared run of at most 8 minutes.

    python benchmarks/gpu_check.py --out=$OUT                 # a GPU: ~8 min, compilation included
    python benchmarks/gpu_check.py --tiny --out=/tmp/gc       # CPU: the same stages on tiny shapes (~1 min)

On the H200 image (Python 3.12, its own jax 0.11.2 with the CUDA 13 plugin, flax, optax, orbax,
transformers): grpo_jax installed with `pip install -e . --no-deps`, plus the two packages the image
lacks (ml-collections, tensorboardX) carried as wheels; on a machine with a network,
`pip install -e ".[cuda]"` instead. The image's jax is used as it is.

Stages, in this order, each in its own process with its own time limit (a failure or a timeout is
recorded and the next stage runs; OUT/gpu_check.json is rewritten after every stage, the output of
all of them goes to OUT/gpu_check.log):

1. attention   cuDNN attention (model.attention="cudnn") against the einsum path, bf16, on the same
               batch: completion log-probabilities, GRPO loss and gradients, each against a float32
               einsum reference, next to the einsum path's own bf16 error (CPU: "xla" stands in).
   greedy      the sampler's greedy tokens for SmolLM2 against the CPU tokens committed in
               benchmarks/gpu_check_reference.json (float32 at "highest" matmul precision, and bf16).
               The real weights when their folder exists there; else the SmolLM2 shape with seeded
               random weights, whose reference tokens were made the same way.
   mismatch    sampler vs trainer log-probabilities in bf16 (benchmarks/bench_mismatch.py).
2. grpo_step   benchmarks/bench_grpo_step.py, Qwen2.5-0.5B shape, bf16 compute, 128-token prompts,
               256 new tokens, beta 0.04, EOS off: 64 and 256 completions (4 and 16 prompts x G=16).
   grpo_best   the same at 64 completions with cuDNN attention and remat "dots".
3. sampler     benchmarks/bench_sampler.py at batch 64 and 256 (roofline fraction).
   long_tail   the sampler on a long-tailed length distribution against a static batch.
4. qwen1.5b    a step of the Qwen2.5-1.5B shape with 256 completions of 256 tokens: runs? peak memory.
5. layout      benchmarks/bench_layout.py's per-device memory for the 0.5B step on the real device,
               next to XLA:CPU's estimate of the same program.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "benchmarks", "gpu_check_reference.json")


def stages(tiny: bool, out: str) -> list[tuple[str, int, list[list[str]]]]:
    """(name, time limit in seconds, commands) of each stage; a command's JSON goes to OUT/NAME_i.json."""
    py, me = sys.executable, os.path.abspath(__file__)
    shape, big = ("tiny", "tiny") if tiny else ("qwen2.5-0.5b", "qwen2.5-1.5b")
    prompt_len, new = (16, 16) if tiny else (128, 256)
    step = ["benchmarks/bench_grpo_step.py", "--shape", shape, "--dtype", "bfloat16", "--remat", "full",
            "--num_generations", "16", "--prompt_len", str(prompt_len), "--new_tokens", str(new), "--beta", "0.04",
            "--warmup", "1", "--steps", "1" if tiny else "3"]
    return [
        ("attention", 60, [[py, me, "--stage=attention"] + ["--tiny"] * tiny]),
        ("greedy", 60, [[py, me, "--stage=greedy"] + ["--tiny"] * tiny]),
        ("mismatch", 60, [[py, "benchmarks/bench_mismatch.py", "--config=configs/default.py", "--dtype=bfloat16",
                           f"--config.model.source=shape:{shape}", "--prompts=4" if tiny else "--prompts=16",
                           f"--new_tokens={new}"]]),
        ("grpo_step", 120, [[py, *step, "--prompts", "4", "16"]]),
        ("grpo_best", 60, [[py, *step, "--prompts", "4", "--remat", "dots", "--attention",
                            "xla" if tiny else "cudnn"]]),
        ("sampler", 45, [[py, "benchmarks/bench_sampler.py", "--shape", shape, "--batch", "64", "256", "--dtype",
                          "bfloat16", "--prompt_len", str(prompt_len), "--new_tokens", str(new),
                          "--repeats", "1" if tiny else "3"]]),
        ("long_tail", 45, [[py, "benchmarks/bench_sampler.py", "--shape", shape, "--batch", "256", "--dtype", "bfloat16",
                            "--num_generations", "8", "--prompt_len", str(prompt_len), "--new_tokens",
                            "64" if tiny else "2048", "--lengths", "lognormal:24:1.0" if tiny else "lognormal:300:1.0"]]),
        ("qwen1.5b", 75, [[py, *step, "--shape", big, "--prompts", "16", "--steps", "1"]]),
        ("layout", 45, [[py, "benchmarks/bench_layout.py", "--shape", shape, "--mesh", "1,1,1", "--prompts", "4",
                         "--num_generations", "16", "--prompt_len", str(prompt_len), "--new_tokens", str(new),
                         "--dtype", "bfloat16", "--remat", "full", "--skip", "sampling"],
                        # the same program's estimate by XLA:CPU, for the comparison
                        ["env", "JAX_PLATFORMS=cpu", py, "benchmarks/bench_layout.py", "--shape", shape, "--mesh",
                         "1,1,1", "--prompts", "4", "--num_generations", "16", "--prompt_len", str(prompt_len),
                         "--new_tokens", str(new), "--dtype", "bfloat16", "--remat", "full", "--skip", "sampling",
                         "--cpu_no_hoisting"]]),
    ]


# --------------------------------------------------------------------------------------------------
# In-process stages (run as `gpu_check.py --stage=NAME`, in a process of their own)


def _relative(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_attention(tiny: bool) -> dict:
    """cuDNN (or, without a GPU, XLA's) attention against einsum in bf16, both measured against a
    float32 einsum reference: log-probs, loss, gradients."""
    import jax
    import numpy as np

    from grpo_jax.models import architecture
    from grpo_jax.models import transformer
    from grpo_jax.rl import logprobs
    from grpo_jax.rl import loss
    from grpo_jax.rl import objective

    other = "cudnn" if jax.default_backend() == "gpu" else "xla"
    base = architecture.SHAPES["tiny"] if tiny else architecture.SHAPES["qwen2.5-0.5b"].replace(num_layers=4)
    params = transformer.init_params(base, jax.random.key(0))
    B, P, C = (4, 16, 16) if tiny else (8, 128, 256)
    rng = np.random.default_rng(0)
    batch = {"prompt_ids": rng.integers(1, base.vocab_size, (B, P)),
             "prompt_mask": np.arange(P)[None] >= rng.integers(0, P // 4, (B, 1)),
             "completion_ids": rng.integers(1, base.vocab_size, (B, C)),
             "completion_mask": np.arange(C)[None] < rng.integers(C // 2, C + 1, (B, 1)),
             "advantages": rng.normal(size=B).astype(np.float32),
             "old_logp": -rng.uniform(5.5, 6.8, (B, C)).astype(np.float32),
             "ref_logp": -rng.uniform(5.5, 6.8, (B, C)).astype(np.float32)}
    lcfg = loss.LossConfig(beta=0.04, max_completion_length=C)
    out = {"other": other}
    runs = {}
    for name, cfg in (("f32", base.replace(dtype="float32")), ("einsum", base.replace(dtype="bfloat16")),
                      (other, base.replace(dtype="bfloat16", attention=other))):
        lp = jax.jit(lambda p, c=cfg: logprobs.completion_logprobs(p, c, batch["prompt_ids"], batch["prompt_mask"],
                                                                   batch["completion_ids"], batch["completion_mask"])[0])
        t0 = time.perf_counter()
        l, g, _ = objective.make_loss_and_grad(cfg, lcfg)(params, batch)
        runs[name] = (np.asarray(lp(params)), float(l), jax.tree.map(np.asarray, g))
        out[f"{name}_compile_and_run_s"] = round(time.perf_counter() - t0, 2)
    ref_lp, ref_l, ref_g = runs["f32"]
    mask = batch["completion_mask"]
    for name in ("einsum", other):
        lp, l, g = runs[name]
        out[name] = {"logp_abs_err_max": float(np.abs(lp - ref_lp)[mask].max()),
                     "logp_abs_err_mean": float(np.abs(lp - ref_lp)[mask].mean()),
                     "loss_abs_err": abs(l - ref_l),
                     "grad_rel_err_max": max(jax.tree.leaves(jax.tree.map(_relative, g, ref_g)))}
    e, o = out["einsum"], out[other]
    # bf16 rounding sets the scale: the other path may not be much worse than einsum's own bf16 error.
    out["ok"] = bool(o["logp_abs_err_max"] <= 2 * e["logp_abs_err_max"] + 1e-3
                     and o["grad_rel_err_max"] <= 2 * e["grad_rel_err_max"] + 1e-3)
    return out


def greedy_tokens(params, cfg, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import jax
    import numpy as np

    from grpo_jax.rollout import sampler

    s = sampler.SamplingConfig(max_new_tokens=new_tokens, greedy=True, eos_ids=(), pad_id=0)
    r = sampler.sample(params, cfg, prompts, 1, s, jax.random.key(0))
    return np.asarray(r.tokens).tolist()


def greedy_models(tiny: bool) -> list[str]:
    """The greedy check's models: the real SmolLM2 where its folder exists (set-up made it here; the
    device has none unless it is carried) and the SmolLM2 shape with seeded random weights."""
    from grpo_jax.models import pretrained

    if tiny:
        return ["tiny_random"]
    real = os.path.exists(os.path.join(pretrained.cache_dir(), pretrained.SMOLLM2_DIR, "model.safetensors"))
    return ["smollm2"] * real + ["smollm2_random"]


def greedy_setup(name: str):
    """(params, cfg, prompts) of one greedy-check model."""
    import jax
    import numpy as np
    import transformers

    from grpo_jax.models import architecture
    from grpo_jax.models import hf
    from grpo_jax.models import pretrained
    from grpo_jax.models import transformer

    rng = np.random.default_rng(0)
    if name == "smollm2":
        folder = os.path.join(pretrained.cache_dir(), pretrained.SMOLLM2_DIR)
        params, cfg = hf.load_hf(folder)
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"])
                   for q in ("What is 47 + 38?", "Write a haiku about rain.", "Name three prime numbers.")]
        return params, cfg, prompts
    cfg = architecture.SHAPES["tiny" if name == "tiny_random" else "smollm2-135m"]
    # Matrices x4: at the 0.02 init every position's argmax is the same token; x4 makes the greedy
    # path depend on the input (and so on the arithmetic being right).
    params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, transformer.init_params(cfg, jax.random.key(0)))
    return params, cfg, rng.integers(3, cfg.vocab_size, (3, 12)).tolist()


def check_greedy(tiny: bool, write: bool = False) -> dict:
    """Greedy tokens against the committed CPU reference: float32 at "highest" matmul precision
    (no TF32), and bf16 compute; per row, the position of the first difference."""
    import jax

    ref = json.load(open(REFERENCE)) if os.path.exists(REFERENCE) else {}
    new = 16 if tiny else 48
    out = {"backend": jax.default_backend(), "ok": True}

    def agreement(got, want):
        first = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(w)) for g, w in zip(got, want)]
        return {"identical_rows": sum(f == len(w) for f, w in zip(first, want)), "rows": len(want),
                "first_difference": first}

    for name in greedy_models(tiny) if not write else ["tiny_random", *greedy_models(False)]:
        params, cfg, prompts = greedy_setup(name)
        with jax.default_matmul_precision("highest"):
            f32 = greedy_tokens(params, cfg.replace(dtype="float32"), prompts, new if name != "tiny_random" else 16)
        bf16 = greedy_tokens(params, cfg.replace(dtype="bfloat16"), prompts, new if name != "tiny_random" else 16)
        if write:  # on the CPU: the reference an accelerator is compared with
            ref[name] = {"prompts": prompts, "float32": f32, "bfloat16": bf16}
            continue
        if name not in ref:
            out[name], out["ok"] = {"error": f"no reference tokens for {name} in {REFERENCE}"}, False
            continue
        out[name] = {"float32": agreement(f32, ref[name]["float32"]), "bfloat16": agreement(bf16, ref[name]["bfloat16"])}
        # float32 must agree token for token where the weights are real (random weights' near-ties may flip).
        if name != "smollm2_random":
            out["ok"] &= out[name]["float32"]["identical_rows"] == out[name]["float32"]["rows"]
    if write:
        with open(REFERENCE, "w") as f:
            json.dump(ref, f)
    return out


# --------------------------------------------------------------------------------------------------
# The driver


def run_stage(name: str, limit: float, commands: list[list[str]], out: str, log) -> dict:
    rec = {"status": "ok", "limit_s": round(limit), "results": []}
    t0 = time.perf_counter()
    for i, cmd in enumerate(commands):
        path = os.path.join(out, f"{name}_{i}.json")
        cmd = cmd + [f"--out={path}"]
        left = limit - (time.perf_counter() - t0)
        log.write(f"\n===== {name} [{i}]: {' '.join(cmd)}\n")
        log.flush()
        try:
            p = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=max(left, 1),
                               env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])})
            if p.returncode:
                rec["status"] = f"failed (exit {p.returncode})"
        except subprocess.TimeoutExpired:
            rec["status"] = f"timeout after {limit:.0f} s"
        rec["results"].append(json.load(open(path)) if os.path.exists(path) else None)
        if rec["status"] != "ok":
            break
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.log and each stage's JSON")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: the CPU test of this script")
    ap.add_argument("--budget_s", type=float, default=480, help="the whole run, compilation included")
    ap.add_argument("--only", nargs="*", default=None, help="run these stages only")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # in-process stages, in a child process
    ap.add_argument("--write_reference", action="store_true",
                    help="CPU: (re)write the greedy stage's reference tokens (benchmarks/gpu_check_reference.json)")
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    if a.stage or a.write_reference:
        res = check_attention(a.tiny) if a.stage == "attention" else check_greedy(a.tiny, write=a.write_reference)
        print(json.dumps(res, indent=1))
        if a.stage:
            with open(a.out, "w") as f:
                json.dump(res, f)
        return
    os.makedirs(a.out, exist_ok=True)
    start = time.perf_counter()
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "tiny": a.tiny, "stages": {}}
    try:
        import jax

        results["device"] = str(jax.devices()[0].device_kind)
        results["jax"] = jax.__version__
    except Exception as e:  # noqa: BLE001 -- recorded; the stages say more
        results["device"] = f"jax failed: {e}"
    with open(os.path.join(a.out, "gpu_check.log"), "w") as log:
        # --tiny runs on a CPU, where compiling is the slow part: five times the limits (its test checks
        # that every stage works, not how fast).
        scale = 5 if a.tiny else 1
        for name, limit, commands in stages(a.tiny, a.out):
            if a.only and name not in a.only:
                continue
            limit *= scale
            left = a.budget_s * scale - (time.perf_counter() - start)
            if left < 15:
                results["stages"][name] = {"status": "skipped: out of time"}
            else:
                results["stages"][name] = run_stage(name, min(limit, left), commands, a.out, log)
            print(f"{name}: {results['stages'][name]['status']}", flush=True)
            results["seconds"] = round(time.perf_counter() - start, 1)
            with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
                json.dump(results, f, indent=1)
    print(f"wrote {os.path.join(a.out, 'gpu_check.json')} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
