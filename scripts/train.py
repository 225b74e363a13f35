"""Train with GRPO.

    python scripts/train.py                                   # configs/default.py, CPU, offline
    python scripts/train.py --config=configs/default.py --config.steps=50 --config.grpo.num_generations=16

Any config field can be overridden as --config.FIELD=value; a misspelt field or a value of the wrong
type stops the run at once with a message naming it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.py"),
    "ml-collections config file", lock_config=True)


def main(argv):
    from absl import logging

    from grpo_jax.trainer import Trainer

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    trainer = Trainer(_CONFIG.value)
    try:
        trainer.run()
    finally:
        trainer.close()


if __name__ == "__main__":
    app.run(main)
