"""The default run: a small char-level policy on synthetic one-digit arithmetic, on a laptop CPU.

Stage 1 (cold start): a short SFT teaches the `#### N` answer format and partial arithmetic;
stage 2: GRPO with the `math` verifier. No download, no GPU.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/default"
    c.steps = 300
    c.model.source = "shape:tiny"
    c.model.overrides = dict(hidden_size=128, intermediate_size=384, num_layers=3, num_heads=4,
                             num_kv_heads=2, head_dim=32)
    c.model.tokenizer = "char"
    c.data.source = "synthetic:arithmetic"
    c.data.digits = 1
    c.data.ops = "+-"
    c.data.eval_size = 128
    c.sft.steps = 120
    c.sft.batch_size = 64
    c.sft.learning_rate = 1e-3
    c.grpo.prompts_per_step = 16
    c.grpo.num_generations = 8
    c.grpo.max_new_tokens = 10
    c.grpo.beta = 0.0
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 5
    c.optimizer.schedule = "constant"
    c.eval.every = 50
    c.eval.batch_size = 128
    c.checkpoint.every = 100
    c.log.every = 10
    c.verifier.workers = 1
    return c
