"""Shared defaults of every run; the other configs change a few fields of this one."""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.steps = 100
    c.workdir = "runs/default"
    c.resume = False

    c.model = ConfigDict(dict(
        source="shape:tiny",  # "shape:NAME" (random weights), "smollm2", an HF folder or hub id
        overrides={},  # ModelConfig fields for shape: sources (e.g. num_layers)
        tokenizer="char",  # "char", "qwen2", "smollm2", or an HF folder / hub id
        dtype="float32", param_dtype="float32", remat="none"))

    c.data = ConfigDict(dict(
        source="synthetic:arithmetic", config="", split="train",
        synthetic_size=2000, digits=2, digits_b=placeholder(int), ops="+-*",  # synthetic:arithmetic only
        template="plain",  # "plain", "chat" or "r1"
        prompt_field="question", instruction="",  # appended to every prompt, e.g. how to state the answer
        required_fields=["question", "answer"],
        eval_split="",  # "" holds eval_size prompts out of `split`; else a seeded sample of this split
        eval_size=64))

    c.grpo = ConfigDict(dict(
        prompts_per_step=8, num_generations=8, num_iterations=1, minibatches=1, microbatches=1,
        max_new_tokens=16, temperature=1.0,
        advantage_estimator="grpo", scale_rewards="", std_ddof=0,
        clip_eps_low=0.2, clip_eps_high=0.0, dual_clip=0.0,  # 0 means off / same as low
        beta=0.04, kl_estimator="k3", aggregation="seq-mean-token-mean", importance_level="token",
        mask_truncated=False, overlong_buffer=0, logprob_chunk=1024))

    c.sampling = ConfigDict(dict(top_k=0, top_p=1.0, eos_ids=[], prompt_buckets=[16, 32, 64, 128, 256, 512, 1024]))
    c.rewards = ConfigDict({"math": 1.0})  # reward function name -> weight
    c.verifier = ConfigDict(dict(workers=2, timeout_s=10.0))  # workers=-1: score in this process

    # Cold-start SFT before RL (stage 1 of DeepSeek-R1); 0 steps skips it.
    c.sft = ConfigDict(dict(steps=0, batch_size=32, learning_rate=1e-3, completion_format="#### {answer}",
                            examples=0))  # the first `examples` training rows (0: all of them)

    c.optimizer = ConfigDict(dict(
        learning_rate=1e-6, warmup_steps=10, schedule="cosine", final_lr_fraction=0.1,
        b1=0.9, b2=0.99, weight_decay=0.0, max_grad_norm=1.0))

    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ConfigDict(dict(every=50, keep=3))
    c.eval = ConfigDict(dict(every=25, k=4, batch_size=64, reward="math"))
    c.log = ConfigDict(dict(every=1, samples_every=10))
    return c
