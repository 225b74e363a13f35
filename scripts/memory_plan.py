"""The memory plan of a GRPO config on a mesh, on any machine (grpo_jax/run/memory_plan.py): each
program compiled ahead of time for simulated devices, nothing allocated, no weight read.

    python scripts/memory_plan.py --config=configs/qwen3_8b.py --devices=8 [--device_gib=80] [--prompt_len=512]

--devices sets the simulated CPU device count (before JAX starts); the config's mesh must fit it.
XLA:CPU's loop-invariant code motion is off, as bench_layout's --cpu_no_hoisting (it would hoist
float32 copies of bf16 weights out of the layer scan, which GPU and TPU programs never make).
--device_gib: the device memory to check the plan against (e.g. 80 for an H100, 95 for a v5p chip).
The model's config comes from `model.source` (a named shape, or an HF folder's config.json) and the
vocabulary from `model.tokenizer`.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"))
_DEVICES = flags.DEFINE_integer("devices", 8, "simulated CPU devices")
_DEVICE_GIB = flags.DEFINE_float("device_gib", 0.0, "device memory in GiB to check against (0: print only)")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 0, "prompt tokens (0: the largest prompt bucket)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # XLA:CPU has no bf16 dots: its loop-invariant code motion would hoist float32 copies of every
    # layer's bf16 weights out of the layer scan, a copy GPU and TPU programs never make.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_DEVICES.value}"
                               + " --xla_disable_hlo_passes=while-loop-invariant-code-motion").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from grpo_jax.parallel import partitioning
    from grpo_jax.run import config
    from grpo_jax.run import loading
    from grpo_jax.run import memory_plan
    from grpo_jax.run import pipeline

    cfg = pipeline.resolve(_CONFIG.value)  # a pipeline's last stage
    config.check(cfg)
    model_cfg = loading.model_config(cfg.model, len(loading.load_tokenizer(cfg.model)))
    m = cfg.mesh
    mesh = partitioning.make_mesh(m.data, m.fsdp, m.tensor, expert=m.expert)
    plan = memory_plan.estimate(cfg, model_cfg, mesh, _PROMPT_LEN.value or None)
    plan.limit = int(_DEVICE_GIB.value * 2**30) or None
    print(f"{cfg.model.source}, mesh {dict(mesh.shape)}, {cfg.grpo.prompts_per_step} x {cfg.grpo.num_generations} "
          f"completions of up to {cfg.sampling.max_new_tokens} tokens:\n{plan.table()}")
    try:
        memory_plan.check(cfg, model_cfg, plan)
    except config.ConfigError as e:
        sys.exit(str(e).split("\n", 1)[0] + "\nTry: " + str(e).rsplit("Try: ", 1)[1])


if __name__ == "__main__":
    app.run(main)
