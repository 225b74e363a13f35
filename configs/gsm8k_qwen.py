"""GSM8K with Qwen2.5-0.5B-Instruct: the run to try first on a GPU (weights and data from the hub).

    python scripts/train.py --config=configs/gsm8k_qwen.py

R1 template (<think>/<answer>), reward = exact answer + 0.2 x lenient format; TRL's defaults
elsewhere (G=16, lr 1e-6, beta 0.04, 512 new tokens). Held-out: 512 prompts of GSM8K's test split.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/gsm8k_qwen"
    c.steps = 500
    c.model.source = "Qwen/Qwen2.5-0.5B-Instruct"
    c.model.tokenizer = "Qwen/Qwen2.5-0.5B-Instruct"
    c.model.dtype, c.model.param_dtype, c.model.remat = "bfloat16", "float32", "dots"
    c.data.source, c.data.config, c.data.split = "openai/gsm8k", "main", "train"
    c.data.eval_split, c.data.eval_size = "test", 512
    c.data.template = "r1"
    c.grpo.prompts_per_step, c.grpo.num_generations = 16, 16
    c.sampling.max_new_tokens = 512
    c.grpo.minibatches = 2
    c.sampling.eos_ids = (151645, 151643)  # <|im_end|>, <|endoftext|>
    c.rewards = {"math": 1.0, "format_lenient": 0.2}
    c.optimizer.learning_rate = 1e-6
    c.eval.every, c.eval.k, c.eval.batch_size = 50, 8, 256
    c.verifier.workers = 8
    return c
