"""The loss explorer notebook runs top to bottom (its cells assert what they show)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "grpo_loss_explorer.ipynb"


def test_loss_explorer_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # advantages, surrogate, KL, aggregation plots
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


QUICKSTART = NOTEBOOK.parent / "quickstart.ipynb"


@pytest.mark.slow  # SmolLM2 through both stages again: test_smollm2_recipe keeps the recipe in the default run
def test_quickstart_notebook_trains_smollm2_and_shows_the_curve(tmp_path, monkeypatch):
    """The Colab quickstart, shortened (QUICKSTART_TINY: a tiny batch, 2 GRPO steps) on the CPU: it
    finds the device, runs both stages of the SmolLM2 recipe, plots the reward and prints completions."""
    monkeypatch.setenv("QUICKSTART_STEPS", "2")
    monkeypatch.setenv("QUICKSTART_TINY", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(QUICKSTART, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(QUICKSTART.parents[1])}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1  # the reward curve
    text = "".join(o.get("text", "") for o in outputs)
    assert "x cpu" in text.lower() or "(cpu)" in text
    assert "cold_start" in text and "grpo" in text and text.count("(answer ") == 4, text[-2000:]
