"""Tool-integrated RL in the style of ToRL (Li et al. 2025): Qwen2.5 writes Python, the sandbox runs
it, the output comes back as a <tool_response>, and GRPO rewards the final \\boxed{} answer only.
For accelerators; untested at scale (docs/tools.md: what was checked on a CPU).

    python scripts/train.py --config=configs/torl_qwen.py            # MATH (train 7.5k / held-out 500)
    python scripts/train.py --config=configs/torl_qwen.py:gsm8k
    python scripts/train.py --config=configs/torl_qwen.py --config.model.source=Qwen/Qwen3-1.7B \\
        --config.model.tokenizer=Qwen/Qwen3-1.7B --config.data.enable_thinking=False

ToRL's settings where it states them: no SFT cold start, a code interpreter with a per-call deadline,
at most 4 calls per episode (its C), the results cut, the loss on the model's tokens only. The
Qwen chat template shows the tool's schema (its `tools` slot); the model's calls are hermes JSON
(`tools.format="qwen"`). Weights and data come from the hub.
"""

from configs import base


def solution_accuracy(prompts, completions, solution=None, **columns):
    """`math_exact` against the \\boxed{} answer of a MATH solution (its gold has no answer column)."""
    from grpo_jax.rewards import scoring

    return scoring.math_exact_accuracy(prompts, completions, answer=solution)


def get_config(arg: str = "math"):
    if arg not in ("math", "gsm8k"):
        raise ValueError(f"configs/torl_qwen.py:{arg}: expected :math or :gsm8k")
    c = base.get_config()
    c.workdir = f"runs/torl_qwen_{arg}"
    c.model.source = c.model.tokenizer = "Qwen/Qwen2.5-1.5B-Instruct"
    c.model.dtype, c.model.param_dtype, c.model.remat = "bfloat16", "float32", "dots"
    c.data.template = "chat"
    c.data.instruction = ("Use the python tool to compute what you need, then put the final answer in "
                          "\\boxed{}.")
    if arg == "math":
        c.data.source, c.data.split = "DigitalLearningGmbH/MATH-lighteval", "train"
        c.data.eval_split, c.data.eval_size = "test", 500
        c.data.prompt_field, c.data.required_fields = "problem", ["problem", "solution"]
        c.reward_functions = {"solution": "configs.torl_qwen:solution_accuracy"}
        c.rewards = {"solution": 1.0}
        c.eval.reward = "solution"
    else:
        c.data.source, c.data.config, c.data.split = "openai/gsm8k", "main", "train"
        c.data.eval_split, c.data.eval_size = "test", 512
        c.rewards = {"math": 1.0}
    c.tools.names, c.tools.format = ("python",), "qwen"
    c.tools.max_turns, c.tools.max_calls_per_turn = 5, 1  # 4 calls and the answer (ToRL's C = 4)
    c.tools.max_observation_tokens, c.tools.call_timeout_s, c.tools.episode_tool_s = 512, 5.0, 30.0
    c.tools.resume_after_steps = 16  # a sandbox run against ~16 decode steps of a 1.5B model
    c.tools.workers = 32
    c.sampling.max_new_tokens = 3072  # the episode: the model's tokens and the tools' output
    c.sampling.eos_ids = (151645, 151643)  # <|im_end|>, <|endoftext|>
    c.sampling.prompt_buckets = (256, 512, 1024)
    c.steps = 300
    c.grpo.prompts_per_step, c.grpo.num_generations = 64, 8
    c.grpo.beta = 0.0
    c.grpo.minibatches = 4
    c.optimizer.learning_rate = 1e-6
    c.eval.every, c.eval.k, c.eval.batch_size = 50, 4, 256
    c.checkpoint.every = 50
    c.verifier.workers = 16
    return c
