"""Write a training checkpoint as a Hugging Face folder (config.json, safetensors, tokenizer) that
transformers and vLLM load unchanged.

    python scripts/export_hf.py --out=exports/default                       # latest checkpoint of the default run
    python scripts/export_hf.py --config=configs/gsm8k_qwen.py --step=500 --out=exports/qwen --dtype=bfloat16
    python scripts/export_hf.py --config=configs/r1_pipeline.py --out=exports/r1  # the last stage's policy
    python scripts/export_hf.py --config=configs/smollm2_lora.py --peft --out=exports/peft  # a PEFT adapter folder

A LoRA run exports its adapters merged into the base's kernels (a plain HF folder), or with --peft
as a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) for
`peft.PeftModel.from_pretrained` on the base model named in it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from grpo_jax.run import config
from grpo_jax.run import loading
from grpo_jax.run import pipeline

config.check_argv(sys.argv)  # an old field name: say the new one (flag parsing would not)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.py"),
    "the run's ml-collections config file", lock_config=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step of config.workdir (default: the latest)")
_OUT = flags.DEFINE_string("out", None, "output folder", required=True)
_STAGE = flags.DEFINE_string("stage", None, "pipeline configs: the stage to export (default: the last)")
_DTYPE = flags.DEFINE_string("dtype", None, "dtype of the written weights (default: the parameters' own)")
_PEFT = flags.DEFINE_bool("peft", False, "LoRA runs: write a PEFT adapter folder instead of merged weights")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging


    logging.set_verbosity(logging.WARNING)
    pol, run, source = pipeline.load_policy(_CONFIG.value, _STAGE.value, _STEP.value)
    if _PEFT.value:
        # The base as the run recorded it (pipeline stages start from the previous stage's policy).
        base = loading.hf_base(loading.run_config(run.workdir) or run)
        out = pol.export_peft(_OUT.value, base_model=base)
        print(f"wrote the adapters of {source} to {out}" + ("" if base else
              " (their base is not a published model: export it with this script too, e.g. --stage=NAME of the stage "
              "it came from)"))
    else:
        print(f"wrote {source} to {pol.export_hf(_OUT.value, dtype=_DTYPE.value)}")


if __name__ == "__main__":
    app.run(main)
