"""Every Python block in the README runs as written (each in a fresh namespace, from a scratch folder;
the first one after the training command it names)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCKS = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(), re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    code = BLOCKS[index]
    if "after `python scripts/train.py`" in code:  # a short run of the default config in runs/default
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config.cold_start.steps=2",
                        "--config.steps=2", "--config.eval.every=0", "--config.data.eval_size=8",
                        "--config.verifier.workers=1"], cwd=tmp_path, check=True, capture_output=True, timeout=600)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0, f"README block {index}:\n{code}\n{p.stderr[-3000:]}"
