"""Train: GRPO, SFT (config trainer="sft"), or a pipeline of stages (a config with `stages`).

    python scripts/train.py                                   # configs/default.py: cold start, then GRPO
    python scripts/train.py --config=configs/default.py --config.steps=50 --config.grpo.num_generations=16
    python scripts/train.py --config=configs/r1_pipeline.py   # cold start -> GRPO -> RS-SFT -> GRPO
    python scripts/train.py --config=configs/r1_pipeline.py --until_stage=grpo

A pipeline run (and a GRPO run with a cold start, which is the pipeline cold_start -> grpo) skips
the stages it finished before and resumes an unfinished one, so rerunning the same command after an
interruption carries on where it stopped.

Any config field can be overridden as --config.FIELD=value; a misspelt field or a value of the wrong
type stops the run at once with a message naming it.

Several hosts: run the same command on every host with --distributed (the cluster is detected on
Cloud TPU, SLURM, Open MPI and Kubernetes) or with --coordinator_address=HOST:PORT --num_processes=N
--process_id=I. Each host reads its own block of prompts and scores its own completions.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from grpo_jax.common import data
from grpo_jax.rewards import scoring
from grpo_jax.run import checkpoint
from grpo_jax.run import compilation_cache
from grpo_jax.run import config
from grpo_jax.run import pipeline
from grpo_jax.run import workdir_lock

DEFAULT_CONFIG = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.py"))
config.check_argv(sys.argv, DEFAULT_CONFIG)  # an old or misspelt field: one line naming it, before flag parsing

_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "multi-host with the cluster detected by JAX (Cloud TPU, "
                                 "SLURM, Open MPI, Kubernetes); implied by the three flags above")
_UNTIL_STAGE = flags.DEFINE_string("until_stage", None, "pipelines: stop after this stage")
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "ml-collections config file", lock_config=True)


def main(argv):
    from absl import logging

    import jax


    if _DISTRIBUTED.value or _COORDINATOR.value or _NUM_PROCESSES.value:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs/TPUs use their own
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    checkpoint.report_failed_saves_once()  # not orbax's and tensorstore's tracebacks from every thread

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    cache = compilation_cache.enable(cfg.get("compilation_cache"))
    if pipeline.is_pipeline(pipeline.expand(cfg)):
        records = pipeline.run_pipeline(cfg, until_stage=_UNTIL_STAGE.value)
        if jax.process_index() == 0:
            print(pipeline.format_table(records))
    else:
        if _UNTIL_STAGE.value:
            raise app.UsageError("--until_stage needs a pipeline config (one with `stages`, or a cold start)")
        pipeline.run(cfg)
    if jax.process_index() == 0:
        print(cache.summary(), flush=True)


def run(argv):
    try:
        main(argv)
    except config.ConfigError as e:  # a value the run cannot use: named, before any work
        sys.exit(f"config: {e}")
    except (checkpoint.CheckpointError, scoring.RewardFailure, data.DataError, workdir_lock.WorkdirBusy) as e:
        sys.exit(str(e))  # a full disk, no intact checkpoint; a reward that hangs or always fails; a dataset
                          # the run cannot use; another run holding the workdir
    except KeyboardInterrupt as e:  # a second SIGINT/SIGTERM (grpo_jax.run.graceful_stop): no checkpoint this time
        print(f"{str(e) or 'interrupted'}; the last checkpoint is the newest one saved before it", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 128 + signal.SIGINT))


if __name__ == "__main__":
    app.run(run)
