"""Distillation (DeepSeek-R1's small models): SFT of a smaller student on a teacher's verified traces.

    python scripts/train.py --config=configs/r1_pipeline.py                  # the teacher
    python scripts/rejection_sample.py --config=configs/r1_pipeline.py --n=16 --keep=1 \\
        --output=runs/r1/teacher_traces.jsonl
    python scripts/train.py --config=configs/distill.py
    python scripts/train.py --config=configs/distill.py:rl                   # the comparison

The student (2 layers, d=64: 105k parameters, a sixth of the teacher's 604k) learns only from the traces; it
is evaluated on the same held-out problems, which the traces never contain. `:rl` trains the same
student the way the teacher was trained instead (configs/default.py: cold start on 256
demonstrations, then GRPO), R1's comparison of distillation with RL on a small model.
"""

from configs import default

STUDENT = dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def get_config(arg: str | None = None):
    c = default.get_config()
    c.model.overrides = STUDENT
    if arg == "rl":
        c.workdir = "runs/student_rl"
        return c
    if arg:
        raise ValueError(f"configs/distill.py takes no argument or `rl`, got {arg!r}")
    c.trainer = "sft"
    c.workdir = "runs/distill"
    c.steps = 1500
    c.cold_start.steps = 0
    c.sft.data = "runs/r1/teacher_traces.jsonl"  # prompt field `question`, completion `completion`
    c.sft.batch_size = 64
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 1
    c.optimizer.schedule = "constant"
    c.eval.every = 300
    c.checkpoint.every = 1500
    return c
