"""Rejection sampling: n completions per training problem from a checkpoint, the verified ones kept,
written as an SFT dataset (JSONL) with a summary beside it.

    python scripts/rejection_sample.py --output=data/rs.jsonl                      # the default run's policy
    python scripts/rejection_sample.py --config=configs/r1_pipeline.py --stage=grpo --n=32 --keep=4 --output=rs.jsonl
    python scripts/rejection_sample.py --hf=exports/teacher --output=traces.jsonl  # a teacher, for distillation

The dataset feeds SFT (`--config.sft.data=rs.jsonl` with trainer="sft"). Sampling uses the run's
settings (sampling.*); --config.rejection.* sets what is kept
(min_reward, rewards, dedupe, max_problems). See grpo_jax/rl/rejection.py.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from grpo_jax.common import data
from grpo_jax.rewards import scoring
from grpo_jax.rl import rejection
from grpo_jax.run import config
from grpo_jax.run import pipeline

config.check_argv(sys.argv)  # an old field name: say the new one (flag parsing would not)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.py"),
    "the run's ml-collections config file", lock_config=True)
_STAGE = flags.DEFINE_string("stage", None, "pipeline configs: the stage (default: the last)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_HF = flags.DEFINE_string("hf", None, "sample a Hugging Face folder or hub id instead of a checkpoint")
_N = flags.DEFINE_integer("n", None, "samples per problem (default: config rejection.n)")
_KEEP = flags.DEFINE_integer("keep", None, "keep at most this many per problem, best first (0: all verified)")
_OUTPUT = flags.DEFINE_string("output", None, "the JSONL dataset to write", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging

    import jax


    logging.set_verbosity(logging.WARNING)
    pol, cfg, source = pipeline.load_policy(_CONFIG.value, _STAGE.value, _STEP.value, _HF.value)
    task = data.load_task(cfg.data, cfg.seed)
    with scoring.Scorer.from_config(cfg) as scorer:
        kept, summary = rejection.from_config(pol, scorer, cfg, task.train, n=_N.value, keep=_KEEP.value)
    rejection.write_dataset(kept, {"model": source, **summary}, _OUTPUT.value)
    if jax.process_index() == 0:
        print(json.dumps({"model": source, "output": _OUTPUT.value, **summary}, indent=2))


if __name__ == "__main__":
    app.run(main)
