"""examples/notebooks/vmap_vs_expanded.ipynb runs top to bottom at its small sizes, through
examples/run_notebook.py, which leaves the committed notebook untouched.

The notebook's first cell reads ``PSGFUNC_NOTEBOOK_SMALL=1`` (toy sizes, seconds); its own
assertion checks that vmap and expanded per-sample gradients agree. Nothing here looks at
the timings (ARCHITECTURE.md rule 10).
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "notebooks" / "vmap_vs_expanded.ipynb"


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebook", ROOT / "examples" / "run_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebook_runs_with_small_sizes(tmp_path: Path) -> None:
    runner = _runner()
    before = NOTEBOOK.read_bytes()
    out = tmp_path / "executed.ipynb"
    # raises CellExecutionError, with the cell and traceback, on any error
    nb = runner.execute(NOTEBOOK, out, small=True, timeout=120)
    assert NOTEBOOK.read_bytes() == before  # the committed notebook is not rewritten
    assert nbformat.read(out, as_version=4).cells == nb.cells
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "SMALL=True" in text
    assert "largest difference relative to the gradient's size" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 2  # the layer sweep and the LSTM sweeps


def test_runner_writes_a_git_ignored_copy_by_default() -> None:
    runner = _runner()
    copy = runner.default_output(NOTEBOOK)
    assert copy != NOTEBOOK and copy.parent == NOTEBOOK.parent
    ignored = subprocess.run(["git", "check-ignore", "-q", str(copy.relative_to(ROOT))], cwd=ROOT)
    assert ignored.returncode == 0, f"{copy.name} is not git-ignored"
