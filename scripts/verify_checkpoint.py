"""Verify a run's checkpoints byte for byte against their manifests (every block's SHA-256).

A run verifies the checkpoint it resumes from by its file sizes and up to checkpoint.verify_gb of
its blocks; this reads every byte, for a state larger than that or before trusting an archive.

    python scripts/verify_checkpoint.py runs/default                # every checkpoint (a pipeline: each stage's)
    python scripts/verify_checkpoint.py gs://bucket/run --step=500

Prints one line per checkpoint; the exit status is 1 when any is damaged. Nothing is moved or
deleted (a training run sets a damaged checkpoint aside itself when it resumes).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grpo_jax.common import storage
from grpo_jax.run import checkpoint


def checkpoint_dirs(workdir: str) -> list:
    """WORKDIR/checkpoints, or for a pipeline each WORKDIR/STAGE/checkpoints."""
    root = storage.path(workdir)
    if checkpoint.directory(root).is_dir():
        return [checkpoint.directory(root)]
    return sorted(checkpoint.directory(d) for d in root.iterdir() if checkpoint.directory(d).is_dir())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", help="a run's workdir (local or a URI such as gs://bucket/run)")
    ap.add_argument("--step", type=int, default=None, help="only this step (default: every checkpoint)")
    args = ap.parse_args()
    dirs = checkpoint_dirs(args.workdir)
    if not dirs:
        print(f"no checkpoints in {args.workdir}")
        return 1
    damaged = 0
    for ckpt_dir in dirs:
        steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
        for step in steps if args.step is None else [args.step]:
            start, nbytes = time.perf_counter(), checkpoint.manifest_bytes(ckpt_dir / str(step))
            why = checkpoint.problem(ckpt_dir / str(step))
            seconds = time.perf_counter() - start
            damaged += why is not None
            print(f"{ckpt_dir / str(step)}: " + (f"DAMAGED: {why}" if why else
                  f"intact ({nbytes / 1e9:.3f} GB read in {seconds:.1f} s, every block's SHA-256 as written)"),
                  flush=True)
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
