"""The default run: a small char-level policy learns two-digit + one-digit addition on a laptop CPU.

Stage 1 (cold start, R1 recipe, in runs/default/cold_start): SFT on 256 demonstrations (`#### N`
answers) teaches the format and some arithmetic; stage 2 (runs/default/grpo): GRPO on all training
problems with the `math` verifier plus DAPO's soft overlong penalty (which keeps the policy ending its
answer with EOS). Held-out problems never appear in training. No download, no GPU.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/default"
    c.steps = 1200
    c.model.source = "shape:tiny"
    c.model.overrides = dict(hidden_size=128, intermediate_size=384, num_layers=3, num_heads=4,
                             num_kv_heads=2, head_dim=32)
    c.model.tokenizer = "char"
    c.data.source = "synthetic:arithmetic"
    c.data.digits, c.data.digits_b, c.data.ops = 2, 1, "+"  # "What is 47 + 8?"
    c.data.eval_size = 256
    c.sft.examples = 256  # R1's cold start is a small set of demonstrations
    c.cold_start.steps = 600  # 1e-3, constant: configs/base.py
    c.sft.batch_size = 64
    c.grpo.prompts_per_step = 16
    c.grpo.num_generations = 8
    c.sampling.max_new_tokens = 12
    c.grpo.overlong_buffer = 3  # "#### 108" + EOS is 9 tokens; 10-12 are penalised
    c.grpo.beta = 0.0
    c.rewards = {"math": 1.0, "overlong": 1.0}
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 5
    c.optimizer.schedule = "constant"
    c.eval.every = 200
    c.eval.batch_size = 128
    c.checkpoint.every = 400
    c.log.every = 50
    c.verifier.workers = 1
    return c
