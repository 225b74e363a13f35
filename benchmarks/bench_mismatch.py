"""How far the sampler's log-probabilities are from the trainer's, for a real model and precision.

    python benchmarks/bench_mismatch.py                                   # SmolLM2-135M, bf16 compute
    python benchmarks/bench_mismatch.py --dtype=float32
    python benchmarks/bench_mismatch.py --config.model.residual_dtype=float32   # bf16 compute, float32 residual stream
    python benchmarks/bench_mismatch.py --config=configs/default.py --prompts=16 --new_tokens=16

Samples --num_generations completions of --prompts training prompts of the config's task (its
model, tokenizer and template), then runs the trainer's own teacher-forced forward
(logprobs.completion_logprobs, as the update does) over the same tokens, and prints the metrics of
grpo_jax.rl.rollout_correction: mean / max |Δ log p|, NeMo-RL's token_mult_prob_error, the fraction of
tokens that PPO's clip would act on had the sampler's log-probabilities been the old policy, and
the GSPO sequence log-ratio. With --out, also writes them as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from grpo_jax.common import data
from grpo_jax.rl import logprobs
from grpo_jax.rl import rollout_correction
from grpo_jax.run import loading

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "smollm2.py"),
    "the run's ml-collections config file (its model, tokenizer, task and sampling)")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "compute dtype (model.dtype)")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "storage dtype of the weights (model.param_dtype)")
_PROMPTS = flags.DEFINE_integer("prompts", 4, "training prompts")
_G = flags.DEFINE_integer("num_generations", 4, "completions per prompt")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 48, "sampling.max_new_tokens")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_OUT = flags.DEFINE_string("out", None, "write the figures here as JSON")


def measure(cfg, prompts: int, num_generations: int, seed: int = 0) -> dict[str, float]:
    pol, _ = loading.load(cfg)
    rows = data.load_task(cfg.data, cfg.seed).train[:prompts]
    rollout = pol.rollout(rows, num_generations, jax.random.key(seed))
    trainer_logp = jax.jit(logprobs.completion_logprobs, static_argnames=("cfg", "temperature", "chunk", "mesh"))(
        pol.params, pol.model_cfg, rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.mask,
        temperature=cfg.sampling.temperature, chunk=cfg.grpo.logprob_chunk, mesh=pol.mesh)[0]
    mask = np.asarray(rollout.mask, np.float32)
    eps_high = cfg.grpo.clip_eps_high if cfg.grpo.clip_eps_high is not None else cfg.grpo.clip_eps_low
    means, maxs = rollout_correction.metrics(trainer_logp, rollout.logprobs, mask, cfg.grpo.clip_eps_low, eps_high)
    out = {k: float(s) / max(float(n), 1.0) for k, (s, n) in means.items()}
    out.update({k: float(v) for k, v in maxs.items()})
    out["tokens"] = float(mask.sum())
    return out


def main(argv):
    del argv
    cfg = _CONFIG.value
    cfg.model.dtype, cfg.model.param_dtype = _DTYPE.value, _PARAM_DTYPE.value
    cfg.sampling.max_new_tokens = _NEW_TOKENS.value
    result = {"dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype,
              "residual_dtype": cfg.model.residual_dtype or cfg.model.dtype, "model": cfg.model.source,
              "prompts": _PROMPTS.value, "num_generations": _G.value, "new_tokens": _NEW_TOKENS.value,
              "device": jax.devices()[0].device_kind, "host": platform.processor() or platform.machine(),
              **measure(cfg, _PROMPTS.value, _G.value, _SEED.value)}
    for k, v in result.items():
        print(f"{k:40s} {v:.6g}" if isinstance(v, float) else f"{k:40s} {v}")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
