"""The persistent XLA compilation cache the suite runs with (conftest.py): XLA:CPU writes entries and a
fresh process reads them back instead of compiling, and a changed program misses."""

import json
import os
import re
import subprocess
import sys

import pytest

PROGRAM = """
import json, sys, jax, jax.numpy as jnp
events = []
jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
scale = float(sys.argv[1])
y = jax.jit(lambda x: jnp.tanh(x @ x.T) * scale)(jnp.ones((64, 64))).block_until_ready()
print(json.dumps({"hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses"), "value": float(y.sum())}))
"""


def _run(cache, scale):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROGRAM, str(scale)], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_suite_runs_with_a_persistent_cache():
    assert os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.environ.get("GRPO_JAX_TEST_XLA_CACHE") == "off"
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        assert os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"  # every program, however small


def test_a_fresh_process_reads_what_another_wrote_and_a_changed_program_misses(tmp_path):
    first = _run(tmp_path, 2.0)
    assert first["hits"] == 0 and first["misses"] >= 1 and os.listdir(tmp_path)
    second = _run(tmp_path, 2.0)
    assert second["hits"] >= 1 and second["misses"] == 0 and second["value"] == first["value"]
    # The scale is a constant of the program: another value is another program, compiled anew.
    other = _run(tmp_path, 3.0)
    assert other["misses"] >= 1 and other["value"] == first["value"] * 1.5


@pytest.mark.slow
def test_a_restarted_run_loads_every_program_from_the_configs_cache(tmp_path):
    """`compilation_cache` (on by default): a second run of the same config compiles nothing, and
    says so on its last line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # every program, however small
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines = []
    for run in ("a", "b"):
        p = subprocess.run([sys.executable, "scripts/train.py", f"--config.workdir={tmp_path / run}",
                            f"--config.compilation_cache={tmp_path / 'xla'}", "--config.cold_start.steps=0",
                            "--config.steps=2", "--config.eval.every=0", "--config.data.eval_size=4", "--config.eval.k=1",
                            "--config.verifier.workers=-1"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        lines.append(p.stdout.strip().splitlines()[-1])
    first, second = (re.match(rf"XLA compilation cache {tmp_path / 'xla'}: (\d+) programs loaded, (\d+) compiled", line)
                     for line in lines)
    assert first and second, lines
    assert int(first.group(2)) > 10 and int(second.group(1)) > 10 and int(second.group(2)) == 0, lines
