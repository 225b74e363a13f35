"""Evaluate a checkpoint or a Hugging Face folder on a config's held-out prompts.

    python scripts/evaluate.py                                     # latest checkpoint of configs/default.py's run
    python scripts/evaluate.py --config=configs/gsm8k_qwen.py --step=200 --k=16
    python scripts/evaluate.py --hf=exports/default                # an exported (or any HF) model folder
    python scripts/evaluate.py --config=configs/r1_pipeline.py --stage=grpo   # one stage of a pipeline

Prints pass@1 (greedy), maj@k, pass@k (unbiased) and mean sampled accuracy as JSON, with the same
verifier the run used (config eval.reward). --config.FIELD=value overrides work as in train.py. Only
the policy's parameters are loaded (grpo_jax.rollout.policy): no optimizer state, no random init first.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from grpo_jax.common import data
from grpo_jax.rewards import scoring
from grpo_jax.rollout import evaluation
from grpo_jax.run import config
from grpo_jax.run import pipeline

config.check_argv(sys.argv)  # an old field name: say the new one (flag parsing would not)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.py"),
    "the run's ml-collections config file (data, template, eval settings, model shape)", lock_config=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step of config.workdir (default: the latest)")
_HF = flags.DEFINE_string("hf", None, "evaluate this Hugging Face folder or hub id instead of a checkpoint")
_STAGE = flags.DEFINE_string("stage", None, "pipeline configs: the stage to evaluate (default: the last)")
_K = flags.DEFINE_integer("k", None, "samples per problem for maj@k / pass@k (default: config.eval.k)")
_OUTPUT = flags.DEFINE_string("output", None, "also write the JSON here")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging


    logging.set_verbosity(logging.WARNING)
    pol, cfg, source = pipeline.load_policy(_CONFIG.value, _STAGE.value, _STEP.value, _HF.value)
    task = data.load_task(cfg.data, cfg.seed)
    options = {**evaluation.settings(cfg), **({} if _K.value is None else {"k": _K.value})}
    with scoring.Scorer.from_config(cfg) as scorer:
        result = {"model": source, "problems": len(task.eval), **evaluation.evaluate(pol, task.eval, scorer, **options)}
    text = json.dumps(result, indent=2)
    print(text)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
