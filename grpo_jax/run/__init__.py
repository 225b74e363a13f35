"""Running a job: run configs and their checks, loading a Policy from a config or a checkpoint,
verified checkpoints, the trainer loop, multi-stage pipelines, graceful stops and the workdir
lock."""
