"""Distillation (DeepSeek-R1's small models): SFT of a smaller student on a teacher's verified traces.

    python scripts/train.py --config=configs/r1_pipeline.py                  # the teacher
    python scripts/rejection_sample.py --config=configs/r1_pipeline.py --n=16 --keep=1 \\
        --output=runs/r1/teacher_traces.jsonl
    python scripts/train.py --config=configs/distill.py

The student (2 layers, d=64: a quarter of the teacher's parameters) learns only from the traces; it
is evaluated on the same held-out problems, which the traces never contain.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.trainer = "sft"
    c.workdir = "runs/distill"
    c.steps = 600
    c.model.overrides = dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16)
    c.sft.steps = 0
    c.sft.data = "runs/r1/teacher_traces.jsonl"  # prompt field `question`, completion `completion`
    c.sft.batch_size = 64
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 1
    c.optimizer.schedule = "constant"
    c.eval.every = 200
    c.checkpoint.every = 600
    return c
