"""Host memory of loading a Hugging Face checkpoint onto a mesh of several hosts.

    python benchmarks/bench_loading.py --shape qwen2.5-0.5b --hosts 2 --devices_per_host 2 --mesh 1,4,1

Writes a random checkpoint of the named shape (bfloat16 safetensors, made tensor by tensor: nothing
downloads) into --folder once, then starts --hosts processes of --devices_per_host simulated CPU
devices (jax.distributed over gloo, as a multi-host run) that each load it with the mesh's
parameter shardings (`hf.load_hf(..., shardings=...)`, what `grpo_jax.run.loading` does) in float32.
Printed JSON per host: peak resident memory (ru_maxrss) before the load (imports, JAX, the mesh) and
after it, the growth, the bytes of this host's shards (what it must hold; on CPU devices they are
host memory), and the resident memory after the load split into anonymous and file-mapped pages
(the safetensors files are memory-mapped: pages read stay resident, counted in the peak, and are
reclaimable cache, not allocations).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOST = textwrap.dedent("""
    import json, resource, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=int(sys.argv[3]), process_id=int(sys.argv[1]))
    import numpy as np
    from grpo_jax.models import hf
    from grpo_jax.models import placement
    from grpo_jax.parallel import partitioning
    folder, mesh_shape = sys.argv[4], [int(x) for x in sys.argv[5].split(",")]
    cfg = hf.load_config(folder, "float32")
    mesh = partitioning.make_mesh(*mesh_shape)
    shardings = placement.param_shardings(cfg, mesh)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params, _ = hf.load_hf(folder, "float32", shardings=shardings)
    jax.block_until_ready(params)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    kb = lambda k: int(status[k].split()[0]) * 1024
    print("RESULT", json.dumps({"host": jax.process_index(), "peak_before_load_GB": before / 1e9,
                                "peak_after_load_GB": after / 1e9, "growth_GB": (after - before) / 1e9,
                                "own_shards_GB": mine / 1e9, "now_anonymous_GB": kb("RssAnon") / 1e9,
                                "now_file_mapped_GB": kb("RssFile") / 1e9}))
""")


def write_checkpoint(shape: str, folder: str) -> None:
    """A random bfloat16 checkpoint of `shape`, one tensor at a time (never the model in float32)."""
    import ml_dtypes

    from grpo_jax.models import architecture
    from grpo_jax.models import hf

    cfg = architecture.SHAPES[shape].replace(param_dtype="bfloat16", dtype="bfloat16")
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    state = {}
    for _, template, hf_shape, _ in hf._name_map(cfg):
        for name in hf._names(template, cfg):
            state[name] = (rng.standard_normal(hf_shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf.config_to_hf(cfg, dtype="bfloat16"), f, indent=2)
    hf._write_tensors(__import__("pathlib").Path(folder) / "model.safetensors", state)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument("--folder", default=os.path.expanduser("~/.cache/grpo_jax/bench_loading"))
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--devices_per_host", type=int, default=2)
    p.add_argument("--mesh", default="1,4,1", help="data,fsdp,tensor over all hosts' devices")
    args = p.parse_args()
    folder = os.path.join(args.folder, args.shape)
    write_checkpoint(args.shape, folder)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_host}"}
    procs = [subprocess.Popen([sys.executable, "-c", HOST, str(i), str(port), str(args.hosts), folder, args.mesh],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(args.hosts)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode:
            sys.exit(err[-3000:])
        results.append(json.loads(out.split("RESULT", 1)[1]))
    print(json.dumps({"shape": args.shape, "mesh": args.mesh, "hosts": results}, indent=1))


if __name__ == "__main__":
    main()
