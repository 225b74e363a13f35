"""The DeepSeek-R1 recipe on the default task (`What is 47 + 8?`, char-level model, CPU, offline):

    cold_start     SFT on 256 demonstrations (`#### N`)
    grpo           reasoning RL: math verifier + DAPO overlong penalty (as configs/default.py)
    rejection_sft  16 samples per training problem from the GRPO policy, verified ones kept (one per
                   distinct text), SFT on them mixed with the demonstrations (R1's "general data")
    final_grpo     RL again, the verifier mixed with a preference of our own (`concise` below,
                   named through `reward_functions` like any user's reward function or reward model)

    python scripts/train.py --config=configs/r1_pipeline.py          # rerun to resume after a stop
    python scripts/test_time_scaling.py --config=configs/r1_pipeline.py --n=16

Every stage starts from the previous one's final checkpoint; see grpo_jax/run/pipeline.py.
"""

import re

from configs import default


def concise(prompts, completions, **columns):
    """A format preference: 1 for a bare `#### N` answer, 0 for anything around it."""
    return [1.0 if re.fullmatch(r"#### -?\d+", c.strip()) else 0.0 for c in completions]


def get_config():
    c = default.get_config()
    c.workdir = "runs/r1"
    c.cold_start.steps = 0  # the cold start is a stage of its own here
    c.stages = "cold_start,grpo,rejection_sft,final_grpo"
    c.stage = dict(
        cold_start=dict(
            trainer="sft", steps=600,
            sft=dict(data="demonstrations", examples=256, batch_size=64),
            optimizer=dict(learning_rate=1e-3, warmup_steps=1, schedule="constant"),
            eval=dict(every=600)),
        grpo=dict(trainer="grpo", steps=1200),
        rejection_sft=dict(
            trainer="sft", steps=150,
            sft=dict(data="rejection_samples,demonstrations", examples=256, batch_size=64),
            rejection=dict(n=16, keep=4, dedupe=True),
            optimizer=dict(learning_rate=1e-4, warmup_steps=1, schedule="constant"),
            eval=dict(every=150)),
        # R1's last stage starts from a sharp policy: a smaller step and a KL to it (the reference
        # is the stage's starting policy) keep the new preference from costing accuracy.
        final_grpo=dict(
            trainer="grpo", steps=600,
            grpo=dict(beta=0.04),
            optimizer=dict(learning_rate=1e-4),
            rewards={"math": 1.0, "overlong": 1.0, "concise": 0.2},
            reward_functions={"concise": "configs.r1_pipeline:concise"}),
    )
    return c
