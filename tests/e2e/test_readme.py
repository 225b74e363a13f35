"""Every Python block in the README and in docs/ runs as written (each in a fresh namespace, from a
scratch folder; one that says it comes after a training command runs after a short run of it)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = ["README.md"] + sorted(os.path.join("docs", p) for p in os.listdir(os.path.join(ROOT, "docs")) if p.endswith(".md"))
BLOCKS = {f"{page}#{i}": code for page in PAGES for i, code in enumerate(
    re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, page), encoding="utf-8").read(), re.S))}


def test_the_readme_and_docs_have_python_blocks():
    assert len(BLOCKS) >= 6 and any(k.startswith("README.md") for k in BLOCKS), sorted(BLOCKS)


@pytest.mark.parametrize("where", sorted(BLOCKS))
def test_python_block_runs(where, tmp_path):
    code = BLOCKS[where]
    if "after `python scripts/train.py`" in code:  # a short run of the default config in runs/default
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config.cold_start.steps=2",
                        "--config.steps=2", "--config.eval.every=0", "--config.data.eval_size=8",
                        "--config.verifier.workers=1"], cwd=tmp_path, check=True, capture_output=True, timeout=600)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0, f"{where}:\n{code}\n{p.stderr[-3000:]}"
