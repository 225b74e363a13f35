"""SmolLM2-135M-Instruct learns to use a calculator for 3-digit x 3-digit products, which it cannot
compute in its head (docs/tools.md, "SmolLM2 with a calculator"). CPU, offline.

    python scripts/train.py --config=configs/smollm2_calculator.py            # with the tool
    python scripts/train.py --config=configs/smollm2_calculator.py:no_tool    # the same budget without

Stage 1 (cold start): SFT on 256 demonstrations, two passes, of a call, its result and the answer in
SmolLM2's chat template, `<call>calculator(347*581)</call><result>201607</result>#### 201607` (the
result is context fed by the sampler, not a target). Stage 2: GRPO on multi-turn episodes (8 prompts
x G=8, the `math` verifier). The tools are described in the user turn (SmolLM2's template has no
tool slot; the plain format). `:no_tool` trains on `#### 201607` demonstrations with the same steps,
batch and learning rates. Held out: 128 products never trained on.
"""

from configs import smollm2


def get_config(arg: str = ""):
    c = smollm2.get_config()
    c.workdir = "runs/smollm2_calculator"
    c.data.digits, c.data.digits_b, c.data.ops = 3, 3, "*"  # "What is 347 * 581?"
    c.data.instruction = "Use the calculator, then reply with the final answer, written as '#### <number>'."
    c.tools.names, c.tools.format = ("calculator",), "plain"
    c.tools.max_turns, c.tools.max_observation_tokens = 2, 16
    c.sft.completion_format = "<call>calculator({expression})</call><result>{answer}</result>#### {answer}"
    c.sampling.max_new_tokens = 48  # call ~12 tokens, result ~10, answer ~9, <|im_end|>
    c.cold_start.steps = 32  # two passes over the 256 demonstrations
    c.steps = 30
    c.eval.every, c.eval.k = 15, 1
    c.checkpoint.every = 15
    if arg == "no_tool":
        c.workdir = "runs/smollm2_calculator_no_tool"
        c.tools.names = ()
        c.data.instruction = "Reply with only the final answer, written as '#### <number>'."
        c.sft.completion_format = "#### {answer}"
        c.sampling.max_new_tokens = 16  # configs/smollm2.py's
    elif arg:
        raise ValueError(f"configs/smollm2_calculator.py:{arg}: expected no argument or 'no_tool'")
    return c
