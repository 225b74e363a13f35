"""SmolLM2-135M-Instruct, LoRA against a full fine-tune on the same short R1 recipe (CPU, offline):
a 60-step full cold start on 256 `#### N` demonstrations of two-digit addition (chat template), then
40 GRPO steps of either kind; held-out greedy pass@1 on 64 problems: the LoRA table of docs/recipes.md.

    python scripts/train.py --config=configs/smollm2_lora_vs_full.py:full
    mkdir -p runs/smollm2_lora_vs_full/lora && cp -r runs/smollm2_lora_vs_full/full/cold_start \\
        runs/smollm2_lora_vs_full/lora/        # the same cold start (or let it run again)
    python scripts/train.py --config=configs/smollm2_lora_vs_full.py:lora
"""

from ml_collections import ConfigDict

from configs import base
from configs import smollm2


def get_config(arg: str = "full"):
    if arg not in ("full", "lora"):
        raise ValueError(f"configs/smollm2_lora_vs_full.py:{arg}; expected :full or :lora")
    c = smollm2.get_config()
    c.workdir = "runs/smollm2_lora_vs_full/full"
    c.data.digits, c.data.ops, c.data.eval_size = 2, "+", 64
    c.sft.examples, c.sft.batch_size = 256, 16
    c.cold_start.steps = 60
    c.cold_start.optimizer = ConfigDict(dict(learning_rate=2e-5, schedule="constant", warmup_steps=0, b2=0.999,
                                             weight_decay=0.0))
    c.model.remat = "none"  # as docs/recipes.md's table was measured (configs/smollm2.py remats: less memory, faster)
    c.steps, c.grpo.beta, c.grpo.std_ddof = 40, 0.0, 0
    c.rewards = {"math": 1.0}
    del c.cold_start["seed"]  # as measured: the cold start ran under the run's seed
    c.sampling.max_new_tokens = 16
    c.eval.every, c.eval.k, c.eval.batch_size = 20, 1, 64
    c.checkpoint.every = 40
    c.verifier.workers = 1
    c.optimizer.learning_rate = 1e-5
    if arg == "lora":
        c = base.lora(c, learning_rate=1e-4)
        c.workdir = "runs/smollm2_lora_vs_full/lora"
        c.cold_start.model = ConfigDict({"lora": {"rank": 0}})  # the cold start stays a full fine-tune
    return c
