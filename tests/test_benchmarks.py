"""The benchmark CLI runs end to end (--quick) and its configurations compute what they say.

Never asserts on time or memory (ARCHITECTURE.md rule 10): only that every file is written, every
requested cell is filled, and the Markdown regenerates from the CSV.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import report
from benchmarks.layers import layer_configs
from benchmarks.lstm import lstm_configs
from benchmarks.models import model_configs

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["nn", "vmap", "expanded", "auto", "shell", "dpopt-fast", "clip-fast", "torch-ew"]
CONFIGS = ["Linear", "LayerNorm"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--suite", "layers", "--configs", ",".join(CONFIGS),
           "--methods", ",".join(METHODS), "--batch-sizes", "2,4", "--out", str(out), "--name", "smoke"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_quick_run_writes_csv_markdown_and_plot(quick_run: Path) -> None:
    csv_path, md_path, png = quick_run / "smoke.csv", quick_run / "smoke.md", quick_run / "smoke_layers.png"
    for path in (csv_path, md_path, png):
        assert path.is_file() and path.stat().st_size > 0, path
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    cells = {(r["config"], int(r["batch"]), r["method"]) for r in rows}
    assert cells == {(c, b, m) for c in CONFIGS for b in (2, 4) for m in METHODS}
    assert [r for r in rows if r["error"]] == []
    assert all(float(r["ms"]) > 0 and float(r["time_ratio"]) > 0 for r in rows)
    text = md_path.read_text()
    assert "| config | B | non-private (ms) | vmap | expanded | auto |" in text
    assert "![layers: time and peak memory against batch size](smoke_layers.png)" in text


def test_report_regenerates_markdown_between_markers(quick_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "README.md"
    target.write_text(f"# Title\n\nbefore\n\n{report.BEGIN}\nold numbers\n{report.END}\n\nafter\n")
    assert report.main([str(quick_run / "smoke.csv"), "--update", str(target), "--link-prefix", "x/"]) == 0
    text = target.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old numbers" not in text
    assert "`torch.set_num_threads(1)`" in text
    assert "](x/smoke_layers.png)" in text
    report.main([str(quick_run / "smoke.csv"), "--update", str(target), "--link-prefix", "x/"])
    assert target.read_text() == text  # regenerating changes nothing


@pytest.mark.parametrize(
    "suite, name",
    [("layers", n) for n in layer_configs(True)]
    + [("models", n) for n in model_configs(True)]
    + [("lstm", n) for n in lstm_configs(True)],
)
def test_functional_forward_equals_module(suite: str, name: str) -> None:
    """Each configuration's one-example ``fn`` (what per_sample_grads sees) computes the
    module's forward: the methods being compared really do the same work."""
    cfg = {"layers": layer_configs, "models": model_configs, "lstm": lstm_configs}[suite](True)[name]
    torch.manual_seed(0)
    module = cfg["nn"]()
    x = cfg["x"](3)
    params = {k: v.detach() for k, v in module.named_parameters()}
    with torch.no_grad():
        batched = module(x)
        one_by_one = torch.stack([cfg["fn"](params, x[i]) for i in range(3)])
    torch.testing.assert_close(one_by_one, batched, rtol=1e-5, atol=1e-6)


def test_every_method_has_its_own_colour_marker_and_fixed_style() -> None:
    from benchmarks.methods import METHODS as ALL_METHODS

    styles = [report.method_style(m) for m in ALL_METHODS]
    assert set(ALL_METHODS) <= set(report.METHOD_STYLES)
    assert len({s["color"] for s in styles}) == len(ALL_METHODS)
    assert len({s["marker"] for s in styles}) == len(ALL_METHODS)
    # the style belongs to the method, not to its position in a plot
    assert report.method_style("opacus-ew", 0) == report.method_style("opacus-ew", 7)
    assert report.method_style("not-a-method", 3)["ls"] == ":"


def test_quick_runs_default_to_a_git_ignored_folder() -> None:
    from benchmarks import cli

    assert cli.parse_args(["--quick"]).out == cli.QUICK_RESULTS
    assert cli.parse_args([]).out == cli.RESULTS
    assert cli.parse_args(["--quick", "--out", "elsewhere"]).out == "elsewhere"
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{cli.QUICK_RESULTS}/bench-quick.csv"], cwd=ROOT)
    assert ignored.returncode == 0, f"{cli.QUICK_RESULTS} is not listed in .gitignore"
