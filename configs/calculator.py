"""A character-level policy learns to use a calculator: 3-digit x 2-digit multiplication, which it
cannot do in its head at this size, with multi-turn rollouts (docs/tools.md).

Stage 1 (cold start, runs/calculator/cold_start): SFT on 256 demonstrations of a call, its result and
the answer, `<call>calculator(347*58)</call><result>20126</result>#### 20126` (the result is context,
not a target); stage 2 (runs/calculator/grpo): GRPO on episodes with the `math` verifier. No
download, no GPU. `--config=configs/calculator.py:no_tool` is the same budget without the tool
(demonstrations `#### 20126`), the comparison in docs/tools.md.
"""

from configs import default


def get_config(arg: str = ""):
    c = default.get_config()
    c.workdir = "runs/calculator"
    c.data.digits, c.data.digits_b, c.data.ops = 3, 2, "*"  # "What is 347 * 58?"
    c.tools.names, c.tools.format = ("calculator",), "plain"
    c.tools.max_turns, c.tools.max_observation_tokens = 2, 16
    c.tools.describe = False  # a character model cannot read a schema: the demonstrations teach the call
    c.sft.completion_format = "<call>calculator({expression})</call><result>{answer}</result>#### {answer}"
    c.sampling.max_new_tokens = 72  # the episode: call up to 31, result 22, answer 11 tokens
    c.grpo.overlong_buffer = 8  # DAPO's soft penalty past 64 tokens: without it GRPO drifts to longer answers
    c.rewards = {"math": 1.0, "overlong": 1.0}
    c.cold_start.steps = 300
    c.steps = 200
    c.eval.every = 50
    c.checkpoint.every = 100
    c.log.every = 25
    if arg == "no_tool":
        c.workdir = "runs/calculator_no_tool"
        c.tools.names = ()
        c.sft.completion_format = "#### {answer}"
        c.sampling.max_new_tokens, c.grpo.overlong_buffer = 12, 3  # the default run's
    elif arg:
        raise ValueError(f"configs/calculator.py:{arg}: expected no argument or 'no_tool'")
    return c
