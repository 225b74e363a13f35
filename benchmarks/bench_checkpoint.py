"""What a checkpoint costs the training loop: the time `save` blocks, synchronous vs asynchronous
(orbax writes, grpo_jax hashes and commits in the background), the checksums, and a verified restore.

    python benchmarks/bench_checkpoint.py                        # qwen2.5-0.5b, float32 params + AdamW
    python benchmarks/bench_checkpoint.py --shape smollm2-135m --repeats 5

The state is the shape's random parameters with an AdamW state (what a full fine-tune saves: 3x the
float32 parameters), on the default device. Sync and async saves alternate, so a noisy machine
affects both alike; each row prints the median over --repeats.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from grpo_jax.models import architecture
from grpo_jax.models import placement
from grpo_jax.models import transformer
from grpo_jax.parallel import partitioning
from grpo_jax.rl import train_state
from grpo_jax.run import checkpoint


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(architecture.SHAPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--sample_gb", type=float, default=0.5, help="the bound of the sampled verification")
    args = ap.parse_args(argv)

    cfg = architecture.SHAPES[args.shape]
    mesh = partitioning.make_mesh()
    params = placement.shard_params(transformer.init_params(cfg, jax.random.key(0)), cfg, mesh)
    state = train_state.create(params, optax.adamw(1e-5), mesh, seed=0, data={"epoch": 0, "position": 0, "seed": 0})
    nbytes = sum(x.nbytes for x in jax.tree.leaves(train_state.to_items(state)))
    root = tempfile.mkdtemp(dir=args.dir)
    bump = jax.jit(lambda s: s.replace(step=s.step + 1, params=jax.tree.map(lambda x: x + 1e-3, s.params)))
    rows = {"sync": [], "async": []}
    try:
        for i in range(args.repeats):
            for mode in ("sync", "async"):
                ckpt = checkpoint.Checkpoints(os.path.join(root, mode), keep=1, asynchronous=mode == "async")
                state = bump(state)
                jax.block_until_ready(state)
                t0 = time.perf_counter()
                ckpt.save(state)
                blocked = time.perf_counter() - t0
                ckpt.wait()
                written = time.perf_counter() - t0
                step_dir = os.path.join(checkpoint.directory(os.path.join(root, mode)), str(int(state.step)))
                t0 = time.perf_counter()
                assert checkpoint.problem(step_dir) is None
                verify = time.perf_counter() - t0
                t0 = time.perf_counter()  # what a restore reads of a state above checkpoint.verify_gb
                assert checkpoint.problem(step_dir, read_bytes=args.sample_gb * 1e9) is None
                sampled = time.perf_counter() - t0
                t0 = time.perf_counter()
                jax.block_until_ready(ckpt.restore(state))
                restore = time.perf_counter() - t0
                ckpt.close()
                rows[mode].append((blocked, written, verify, sampled, restore))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"{args.shape}: {nbytes / 1e9:.2f} GB saved (parameters + AdamW state), {jax.devices()[0].platform} "
          f"x{jax.device_count()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"median of {args.repeats}")
    print(f"| save | blocks the loop | written (incl. checksums) | verify (SHA-256) | verify, {args.sample_gb:g} GB "
          "sampled | verified restore |")
    print("|---|---|---|---|---|---|")
    out = {"shape": args.shape, "bytes": nbytes}
    for mode, runs in rows.items():
        med = dict(zip(("blocked_s", "written_s", "verify_s", "sampled_s", "restore_s"),
                       map(statistics.median, zip(*runs))))
        out[mode] = med
        print(f"| {mode} | {med['blocked_s']:.2f} s | {med['written_s']:.2f} s | {med['verify_s']:.2f} s "
              f"({nbytes / 1e9 / med['verify_s']:.2f} GB/s) | {med['sampled_s']:.2f} s | {med['restore_s']:.2f} s |")
    return out


if __name__ == "__main__":
    main()
