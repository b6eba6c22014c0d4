"""examples/notebooks/vmap_vs_expanded.ipynb runs top to bottom at its small sizes.

The notebook's first cell reads ``PSGFUNC_NOTEBOOK_SMALL=1`` (toy sizes, seconds); its own
assertion checks that vmap and expanded per-sample gradients agree. Nothing here looks at
the timings (ARCHITECTURE.md rule 10).
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebooks" / "vmap_vs_expanded.ipynb"


def test_notebook_runs_with_small_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSGFUNC_NOTEBOOK_SMALL", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "SMALL=True" in text
    assert "largest difference relative to the gradient's size" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 2  # the layer sweep and the LSTM sweeps
