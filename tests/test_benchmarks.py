"""The benchmark CLI runs end to end (--quick) and its configurations compute what they say.

Never asserts on the library's time or memory (ARCHITECTURE.md rule 10): only that every file is
written, every requested cell is filled, the Markdown regenerates from the CSV, and the memory
reading itself reads a step of known size right.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import report
from benchmarks.layers import layer_configs
from benchmarks.lstm import lstm_configs
from benchmarks.models import model_configs
from benchmarks.scale import SCALE_METHODS, scale_configs

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
    + [("lstm", n) for n in lstm_configs(True)]
    + [("scale", n) for n in scale_configs(True)],
)
def test_functional_forward_equals_module(suite: str, name: str) -> None:
    """Each configuration's one-example ``fn`` (what per_sample_grads sees) computes the
    module's forward: the methods being compared really do the same work."""
    suites = {"layers": layer_configs, "models": model_configs, "lstm": lstm_configs, "scale": scale_configs}
    cfg = suites[suite](True)[name]
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


# ------------------------------------------------------------------------------ scale suite


@pytest.mark.parametrize("name", list(scale_configs(True)))
@pytest.mark.parametrize("method", [m for m in SCALE_METHODS if m != "clip-fast-compiled"])
def test_scale_quick_configs_take_one_step_of_each_method(name: str, method: str) -> None:
    """Every scale-suite method builds and takes one step on the quick configurations, its
    FLOPs are counted, and its note says what it does with the GPT-2 model's tied head.
    (``clip-fast-compiled`` compiles for minutes here: run by the suite only.)"""
    from benchmarks.methods import count_flops, make_step

    if method.startswith("opacus"):
        pytest.importorskip("opacus")
    cfg = scale_configs(True)[name]
    step = make_step(cfg, method, 2)
    step()  # checks every shape the method promises (benchmarks.methods._checked)
    assert count_flops(step) > 0
    assert step.note == cfg.get("notes", {}).get(method, "")


def _gpt2_norms(method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the norms ``method`` clips by, the true per-example gradient norms) on the quick GPT-2
    model in float64, three examples."""
    from torch.func import grad, vmap

    import psgfunc.nn as pnn
    from psgfunc.dp import DPOptimizer, clipped_grad_sum

    cfg = scale_configs(True)["GPT2"]
    torch.manual_seed(0)
    module = cfg["nn"]().double()
    x = cfg["x"](3)
    with torch.no_grad():
        target = torch.randn_like(module(x))
    params = {k: v.detach() for k, v in module.named_parameters()}

    def fn(p: dict[str, torch.Tensor], xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        return (cfg["fn"](p, xi) * ti).sum()

    per_example = vmap(grad(fn), (None, 0, 0))(params, x, target)
    true = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_example.values()]).sum(0).sqrt()
    if method == "clip-fast":
        return clipped_grad_sum(fn, params, x, target, max_norm=1.0, method="fast")[1], true
    shell = pnn.expand_weights(module, 3)
    opt = DPOptimizer(torch.optim.SGD(list(shell.parameters()), lr=0.0), max_norm=1.0,
                      noise_multiplier=0.0, expected_batch_size=3, fast_clipping=True)
    opt.zero_grad()
    (shell(x) * target).sum().backward()
    return opt.accumulate(), true


def test_gpt2_tied_head_clip_fast_clips_by_the_true_norms() -> None:
    """The functional GPT-2 ties the head to the token embedding's leaf through PF.linear:
    clipped_grad_sum sees both uses and clips by the true per-example norms."""
    norms, true = _gpt2_norms("clip-fast")
    torch.testing.assert_close(norms, true, rtol=1e-10, atol=0)


def test_gpt2_tied_head_dpopt_fast_clips_by_the_true_norms() -> None:
    """The module GPT-2's head is a plain F.linear on the token embedding's weight in the
    root's forward: expand_weights serves it through the op-level rules, so DPOptimizer's
    fast clipping sees both uses and clips by the true per-example norms (it used to miss
    the head's share silently, then refused the model)."""
    norms, true = _gpt2_norms("dpopt-fast")
    torch.testing.assert_close(norms, true, rtol=1e-10, atol=0)


def test_quick_plan_runs_every_method_once_and_compiles_only_on_linear() -> None:
    from benchmarks import cli
    from benchmarks.methods import COMPILED
    from benchmarks.methods import METHODS as ALL_METHODS

    opts = cli.parse_args(["--quick"])
    assert opts.suites == list(cli.SUITES) and "scale" in opts.suites
    jobs = cli.plan(opts, list(ALL_METHODS))
    assert {j[4] for j in jobs} == set(ALL_METHODS)
    for method in COMPILED:
        assert [(j[0], j[1]) for j in jobs if j[4] == method] == [("layers", "Linear")]
    scale_jobs = [j for j in jobs if j[0] == "scale"]
    assert {j[4] for j in scale_jobs} == set(SCALE_METHODS) - set(COMPILED)
    assert {j[3] for j in jobs} == {2, 4}  # one batch size per configuration


def test_full_plan_uses_each_scale_models_own_batch_sizes_and_file_name() -> None:
    from benchmarks import cli

    opts = cli.parse_args(["--suite", "scale"])
    assert opts.name == "scale" and cli.parse_args([]).suites == cli.DEFAULT_SUITES
    jobs = cli.plan(opts, list(SCALE_METHODS))
    assert {(j[1], j[3]) for j in jobs} == {("GPT2", 4), ("GPT2", 8), ("WRN16-4", 16), ("WRN16-4", 32)}
    assert {j[4] for j in jobs} == set(SCALE_METHODS)
    assert "GPT-2-shaped, 2 blocks: Embedding(8192, 768)" in jobs[0][2]
    assert cli.plan(cli.parse_args(["--suite", "scale", "--batch-sizes", "3"]), ["nn"])[0][3] == 3


def _sleepy_builder(*args: object) -> object:
    import time

    time.sleep(60)


def layers_pin_works() -> bool:
    import ctypes
    import ctypes.util

    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallopt")
    except OSError:
        return False


def _holding_builder(*args: object) -> object:
    """A step that holds two 20 MB tensors at once, after the builder freed a 32 MB one and
    left small blocks behind it (with glibc's defaults that raises the mmap threshold)."""
    churn = torch.ones(8 * 2**20)
    keep = [torch.ones(1000) for _ in range(100)]
    del churn

    def step() -> object:
        a = torch.ones(5 * 2**20)
        b = torch.ones(5 * 2**20)
        return float(a[0] + b[0]) + len(keep)

    step()  # first-use costs (as the benchmark's one-example step pays them)
    return step


def test_a_cell_that_hangs_is_killed_and_recorded() -> None:
    from benchmarks import layers

    result = layers.measure(_sleepy_builder, (1,), 1, 0, 1, 0.0, timeout=0.5, tiny=False)
    assert result is not None and result["error"].startswith("timed out")


def test_report_states_the_flop_floor_and_compile_times(tmp_path: Path) -> None:
    from benchmarks.cli import FIELDS

    rows = []
    for method, flops, compile_s, note in (("nn", 2e9, "", ""), ("clip-fast", 2.2e9, "", ""),
                                           ("dpopt-fast", 2.1e9, "", "WRONG norms"),
                                           ("clip-fast-compiled", 2.4e9, 61.0, "")):
        rows.append({k: "" for k in FIELDS} | dict(
            suite="scale", config="GPT2", desc="d", batch=4, method=method, ms=10, peak_mb=5,
            time_ratio=1, flops=flops, flop_ratio=flops / 2e9, compile_s=compile_s, note=note,
            threads=2, cpus=2, quick=0, torch="2", opacus=""))
    path = tmp_path / "scale.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    text = report.markdown(report.load(path))
    assert "- `GPT2`: non-private step 2.00 GFLOP at B=4; the fewest FLOPs of a private step: `clip-fast`, 1.10x" in text
    assert "| GPT2 | 4 | 2.00 | 1.10 | 1.05 | 1.20 |" not in text  # methods are in METHODS order
    assert "| GPT2 | 4 | 2.00 | 1.05 | 1.10 | 1.20 |" in text
    assert "`clip-fast-compiled` GPT2 B=4 61" in text
    assert "- `dpopt-fast` on GPT2: WRONG norms" in text


@pytest.mark.parametrize("transposed", [False, True])
def test_flops_count_a_grouped_convolution_backward_once(transposed: bool) -> None:
    """The FLOPs column counts a grouped convolution's weight gradient as the sum of its
    groups' (torch's formula counted it ``groups`` times: the batch-as-groups per-example
    gradient looked B times dearer than it is)."""
    from benchmarks.methods import count_flops

    torch.manual_seed(0)
    conv = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
    groups, c, o = 4, 8, 12
    x = torch.randn(2, c, 9, 9)
    w = torch.randn(c, o // groups, 3, 3) if transposed else torch.randn(o, c // groups, 3, 3)

    def grouped() -> None:
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        conv(xx, ww, groups=groups).sum().backward()

    def per_group() -> None:
        for xg, wg in zip(x.chunk(groups, 1), w.chunk(groups, 0)):
            xx, ww = xg.clone().requires_grad_(), wg.clone().requires_grad_()
            conv(xx, ww).sum().backward()

    assert count_flops(grouped) == count_flops(per_group) > 0


def test_the_machine_line_names_glibc_malloc_tunables(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import cli

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert cli.malloc_setting() == ""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert cli.malloc_setting() == "MALLOC_MMAP_THRESHOLD_=1048576"
    row = dict(cpus=2, torch="2.13.0", opacus="", threads=2, quick=0, malloc=cli.malloc_setting())
    assert "glibc malloc with `MALLOC_MMAP_THRESHOLD_=1048576`" in report.machine_line([row])
    assert "malloc" not in report.machine_line([dict(row, malloc="")])


def test_paired_runs_time_the_non_private_step_in_each_methods_process(tmp_path: Path) -> None:
    """Default (not --quick): each private method's ratio is to a non-private step timed in its
    own process, interleaved (ref_ms); the nn cell is not paired with itself."""
    cmd = [sys.executable, "-m", "benchmarks", "--suite", "layers", "--configs", "Linear", "--methods",
           "nn,clip-fast", "--batch-sizes", "2", "--repeats", "2", "--warmup", "0", "--min-time", "0",
           "--max-wait", "0", "--retries", "0", "--threads", "1", "--no-plots", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {r["method"]: r for r in report.load(tmp_path / "bench.csv")}
    assert math.isnan(rows["nn"]["ref_ms"]) and rows["nn"]["time_ratio"] == 1.0
    fast = rows["clip-fast"]
    assert fast["ref_ms"] > 0 and fast["time_ratio"] == pytest.approx(fast["ms"] / fast["ref_ms"])
    assert "paired" in (tmp_path / "bench.md").read_text()


def test_quick_runs_are_not_paired(quick_run: Path) -> None:
    rows = report.load(quick_run / "smoke.csv")
    assert all(math.isnan(r["ref_ms"]) for r in rows)
    assert "paired" not in (quick_run / "smoke.md").read_text()


def test_peak_memory_is_the_median_of_fresh_processes(monkeypatch) -> None:
    """Full runs read each cell's peak memory in three fresh processes with glibc's mmap
    threshold held and report the median; quick runs read it once. Readings that could not
    hold the threshold are used only when none could."""
    from benchmarks import cli, layers

    assert cli.parse_args([]).mem_repeats == 3
    assert cli.parse_args(["--quick"]).mem_repeats == 1
    more = iter([dict(peak_mb=30.0, pinned=True), dict(peak_mb=12.0, pinned=True), dict(peak_mb=99.0, pinned=False),
                 dict(peak_mb=7.0, pinned=False)])
    calls = []

    def fake(*args, **kwargs):
        calls.append(kwargs)
        return next(more)

    monkeypatch.setattr(layers, "measure", fake)
    opts = cli.parse_args([])
    assert cli._median_peak(("scale", "WRN16-4", False, "clip-fast", 2), opts, 3) == 21.0
    assert len(calls) == 3 and all(c["memory_only"] for c in calls)
    assert cli._median_peak(("scale", "WRN16-4", False, "clip-fast", 2), opts, 1) == 7.0


@pytest.mark.skipif(not layers_pin_works(), reason="glibc's mallopt is not available")
def test_pinned_peak_is_what_the_step_holds() -> None:
    """With the mmap threshold held, a step that holds 40 MB of tensors at once reads 40 MB,
    after its builder freed a 32 MB tensor (which with glibc's defaults would have raised
    the threshold): the figure is the step's own high-water mark."""
    code = ("import torch; torch.set_num_threads(1)\n"
            "from benchmarks import layers\n"
            "from tests.test_benchmarks import _holding_builder\n"
            "pinned = layers.pin_malloc()\n"
            "print(pinned, layers.step_peak_mb(_holding_builder()))\n")
    # (a fresh process, as the benchmark's memory cells are: not a fork of this one, whose
    # allocator and thread pools other tests have used)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    pinned, peak = run.stdout.split()[-2:]
    assert pinned == "True"
    assert 39.0 <= float(peak) <= 41.5, run.stdout
