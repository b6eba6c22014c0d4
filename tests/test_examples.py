"""Smoke tests of the digits DP-SGD examples: each ``main`` run in-process with ``--quick``.

The examples live in ``examples/`` (not a package: Opacus installs a top-level package named
``examples``), so they are loaded by path, with ``examples/`` on ``sys.path`` for their
shared helper ``_digits``.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ("dp_cnn_digits", "dp_lstm_digits")


@pytest.fixture(scope="module")
def examples() -> dict[str, ModuleType]:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLES))
        loaded = {}
        for name in NAMES:
            spec = importlib.util.spec_from_file_location(f"psgfunc_example_{name}", EXAMPLES / f"{name}.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[name] = module
        yield loaded


def _check_sane(result: dict, steps: int) -> None:
    for run in ("dp", "non_private"):
        r = result[run]
        assert 0.0 <= r["train_acc"] <= 1.0
        assert 0.0 <= r["test_acc"] <= 1.0
        assert r["steps"] == steps
        assert len(r["history"]) == 1
    assert math.isfinite(result["dp"]["epsilon"]) and result["dp"]["epsilon"] > 0
    assert result["non_private"]["epsilon"] == math.inf
    assert result["sigma"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_quick_run_and_fast_clipping(examples, name, capsys):
    result = examples[name].main(["--quick"])
    _check_sane(result, steps=3)
    assert f"{name}: DP-SGD test accuracy" in capsys.readouterr().out  # the summary line
    assert all(p.grad_sample is None for p in result["dp"]["model"].parameters())
    # --fast-clipping: same noise seed, same batches, so the same weights up to rounding
    fast = examples[name].main(["--quick", "--fast-clipping"])
    _check_sane(fast, steps=3)
    assert fast["dp"]["epsilon"] == result["dp"]["epsilon"]
    for a, b in zip(result["dp"]["model"].parameters(), fast["dp"]["model"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_empty_poisson_batches(examples):
    # expected batch 0.05 of 1437 examples: with seed 0 the 3 batches are all empty, and
    # DPOptimizer.step() must still take (pure-noise) steps
    # (sigma 1: with so few expected examples a larger sigma gives epsilon 0 at delta 1e-5)
    result = examples["dp_cnn_digits"].main(["--quick", "--batch-size", "0.05", "--sigma", "1"])
    _check_sane(result, steps=3)
    assert result["dp"]["empty_batches"] == 3
    assert result["non_private"]["empty_batches"] == 3
    # both runs start from the same weights; only the private one moved (by noise alone)
    dp_params = list(result["dp"]["model"].parameters())
    plain_params = list(result["non_private"]["model"].parameters())
    assert all(torch.isfinite(p).all() for p in dp_params)
    assert any(not torch.equal(a, b) for a, b in zip(dp_params, plain_params))


def test_target_epsilon(examples):
    result = examples["dp_cnn_digits"].main(["--quick", "--target-epsilon", "3.0"])
    _check_sane(result, steps=3)
    assert result["dp"]["epsilon"] <= 3.0 + 1e-6
    assert result["dp"]["epsilon"] == pytest.approx(3.0, rel=0.05)


@pytest.mark.parametrize("flags", [["--sigma", "0"], ["--sigma", "1", "--target-epsilon", "1"], ["--lr", "-1"]])
def test_bad_flags_exit(examples, flags):
    with pytest.raises(SystemExit):
        examples["dp_cnn_digits"].main(["--quick", *flags])


def test_demo_table_columns_line_up():
    spec = importlib.util.spec_from_file_location("psgfunc_demo", EXAMPLES / "demo_per_sample_grads.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    text = demo.table([("per-example loop", 305.2, None), ("per_sample_grads('expanded')", 7.0, 2.98e-07)])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # every row as wide as the header
    header, _, *rows = lines
    ms_end = header.index("ms") + 2
    assert all(row[:ms_end].endswith(("305.2", "7.0")) for row in rows)  # right-aligned under "ms"
    assert rows[1].startswith("per_sample_grads('expanded')  ")


def test_dp_gpt2_tiny_quick(tmp_path, capsys):
    # functional route on a Hugging Face GPT-2: fast clipping, Poisson batches, accountant, plot
    spec = importlib.util.spec_from_file_location("psgfunc_example_dp_gpt2_tiny", EXAMPLES / "dp_gpt2_tiny.py")
    gpt2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpt2)
    plot = tmp_path / "curves.png"
    with warnings.catch_warnings(record=True) as record:  # psgfunc warns if an op falls back to vmap
        warnings.simplefilter("always")
        result = gpt2.main(["--quick", "--batch-size", "16", "--plot", str(plot)])
    assert [str(w.message) for w in record if "psgfunc" in str(w.message)] == []
    for run in ("dp", "non_private"):
        assert result[run]["steps"] == 2
        assert all(math.isfinite(row["val_loss"]) for row in result[run]["history"])
    assert 0 < result["dp"]["epsilon"] < math.inf
    assert result["non_private"]["epsilon"] == math.inf
    assert plot.is_file() and plot.stat().st_size > 0
    assert "dp_gpt2_tiny: DP-SGD validation perplexity" in capsys.readouterr().out
