"""benchmarks/gpu_check.py end to end on the CPU with tiny shapes (--tiny), so that the one prepared
accelerator run cannot rot between the sessions that get a device."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_tiny(out, *only):
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", f"--out={out}",
                        *(["--only", *only] if only else [])], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads((out / "gpu_check.json").read_text())
    names = [name for name, _, _ in _module().stages(True, str(out)) if not only or name in only]
    assert list(res["stages"]) == names
    assert {n: s["status"] for n, s in res["stages"].items()} == {n: "ok" for n in names}, \
        (out / "gpu_check.log").read_text()[-3000:]
    return res["stages"]


def test_the_checks_of_correctness_run_on_tiny_shapes(tmp_path):
    st = _run_tiny(tmp_path / "gc", "attention", "greedy")
    att = st["attention"]["results"][0]
    assert att["ok"] and att["other"] == "xla"  # no cuDNN on a CPU: XLA's attention stands in
    assert att["einsum"]["logp_abs_err_max"] > 0  # bf16 against float32: a real, non-zero error
    greedy = st["greedy"]["results"][0]
    assert greedy["ok"] and greedy["tiny_random"]["float32"]["identical_rows"] == 3


@pytest.mark.slow  # ~100 s on 2 cores; the correctness stages above always run
def test_every_stage_runs_on_tiny_shapes_and_writes_its_figures(tmp_path):
    out = tmp_path / "gc"
    st = _run_tiny(out)
    assert [r["batch"] for r in st["grpo_step"]["results"][0]["runs"]] == [64, 256]
    assert all(len(s["results"]) == len(c) for (n, _, c), s in zip(_module().stages(True, str(out)), st.values()))


def test_a_failed_or_hung_stage_is_recorded_and_the_next_one_runs(tmp_path):
    gc = _module()
    with open(tmp_path / "log", "w") as log:
        failed = gc.run_stage("bad", 30, [[sys.executable, "-c", "import sys; sys.exit(3)"]], str(tmp_path), log)
        hung = gc.run_stage("slow", 2, [[sys.executable, "-c", "import time; time.sleep(60)"]], str(tmp_path), log)
        ok = gc.run_stage("fine", 30, [[sys.executable, "-c",
                                        "import sys, json; json.dump({'x': 1}, open(sys.argv[1][6:], 'w'))"]],
                          str(tmp_path), log)
    assert failed["status"] == "failed (exit 3)" and failed["results"] == [None]
    assert hung["status"].startswith("timeout") and hung["seconds"] < 10
    assert ok == {**ok, "status": "ok", "results": [{"x": 1}]}
