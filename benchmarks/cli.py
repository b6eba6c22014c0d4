"""``python -m benchmarks``: every method against a non-private step, on layers, models, an LSTM.

Commands::

    python -m benchmarks                              # full run: layers, models, lstm; B = 16, 64
    python -m benchmarks --suite scale                # GPT-2-shaped and WRN-16-4 (long: see below)
    python -m benchmarks --quick                      # every suite and method once, tiny shapes:
                                                      # a smoke run (about a minute on 2 idle cores),
                                                      # written to the git-ignored results/quick/
    python -m benchmarks --suite layers --batch-sizes 16,64,256 --repeats 9
    python -m benchmarks.report benchmarks/results/bench.csv   # Markdown again, from the CSV
    python -m benchmarks.report benchmarks/results/bench.csv --plots   # and redraw the PNGs

Suites (configurations in the format of :mod:`benchmarks.methods`):

* ``layers``: Opacus's micro-benchmark shapes, from :func:`benchmarks.layers.layer_configs`:
  Linear 512->512, Conv2d 64->64 k=8 on 50x100, LayerNorm 64, Embedding 20000x100;
* ``models``: :func:`benchmarks.models.model_configs`: an MLP, the digits CNN, an
  Embedding+LSTM text classifier, a transformer block;
* ``lstm``: one LSTM layer, T = 128, D = H = 100 (:func:`benchmarks.lstm.lstm_configs`);
* ``scale`` (not in the default full run): :func:`benchmarks.scale.scale_configs`, a
  GPT-2-small-shaped transformer (2 blocks, d = 768, T = 128, vocab 8192, tied head; B = 4, 8)
  and WRN-16-4 with GroupNorm on 3x32x32 (B = 16, 32), with the methods of
  :data:`benchmarks.scale.SCALE_METHODS`; written to ``scale.csv``. Each step takes seconds
  and the compiled method compiles for minutes per batch size: about an hour on 2 shared
  cores (``--repeats 3 --min-time 0`` shortens it).

Methods (:data:`benchmarks.methods.METHODS`): the non-private ``torch.nn`` step, psgfunc's
``per_sample_grads`` (vmap / expanded / auto), the ``psgfunc.nn`` shells, fast clipping
(``clipped_grad_sum`` and ``DPOptimizer(fast_clipping=True)``, and ``DPOptimizer`` without it),
torch's expanded weights, and, when Opacus is installed, its GradSampleModule in the modes
hooks / functorch / ew and ghost clipping. A method that does not support a configuration
gets its error message in the CSV and ``n/a`` in the tables.

Measurement (:func:`benchmarks.layers.measure`): every (configuration, batch size, method)
runs in its own freshly forked process with ``torch.set_num_threads(--threads)``, killed
(and recorded as an error) if it has not reported after ``--cell-timeout`` seconds. The
compiled methods compile in that process with Inductor's compile workers off
(:func:`benchmarks.methods.inductor_in_process`, set before the first fork; nothing is
compiled in the parent): a worker pool copied across a fork once left a cell waiting on it
for over ten minutes. Their compile time, once per batch size and in a fresh process (so it
includes the compiler's first-use costs), is the ``compile_s`` column. FLOPs of one step
(``flops``, ``flop_ratio`` to the non-private step): ``torch.utils.flop_counter.FlopCounterMode``
(matrix products, convolutions, attention), counted once outside the timed steps; for the
compiled methods on the same program run eagerly (``backend="eager"``), since the counter
cannot see inside an Inductor graph. Time: the
median of ``--repeats`` steps (and of as many more as fit in ``--min-time`` seconds, at most
100) after ``--warmup`` steps. Paired (the default, not with ``--quick``): each private
method's process also builds the non-private step and runs it after every timed step; the
ratio is the method's median over that paired median (``ref_ms``), both taken under the
same load, rather than over the ``nn`` cell's own median from another process and another
minute (on a shared 2-core box the speed of both drifted by 30% and more between runs).
``--no-paired``: the ``nn`` cell's median. Memory (:func:`benchmarks.layers.step_peak_mb`): the peak
resident-set growth of ONE step over the live model and inputs, after a one-example step
(Linux: free heap pages returned to the OS, peak RSS reset, then ``VmHWM`` after the step
minus ``VmRSS`` before it): every byte the step needs at its high-water mark (activations,
saved tensors, per-sample gradients, workspaces), at page granularity. ``peak_mb`` is read
in fresh processes with glibc's mmap threshold held at 128 KiB
(:func:`benchmarks.layers.pin_malloc`: every tensor that size or larger is its own mapping,
given back when freed), the median of ``--mem-repeats`` (3; the compiled methods, which
compile again in each: 1) such processes; such readings repeat within a MB. ``rss_mb`` is the
same reading in the timing process with glibc's defaults, where freed heap gaps stay
resident: it adds tens of MB that depend on the order of allocations and moves by 10-20%
from process to process (reported, not used for the ratios).
Memory ratios are given only where the non-private step grows by at least 1 MB. Before each
measurement the run waits (up to ``--max-wait`` s) until other processes leave the CPU quiet
(``busy_before`` in the CSV), and measures a cell again (up to ``--retries`` times) when other
processes kept more than ``--max-busy`` of the CPU busy during it (``busy_during``,
``attempts``).

``--quick``: tiny shapes, one batch size per configuration, one timed step, no waiting for a
quiet CPU, no one-example step per cell (the parent took one of each method before forking),
and the compiled methods only on the layers suite's Linear (compiling a model takes from
seconds to minutes even at tiny sizes): every method runs at least once. Cold compiler
cache, 2 cores: about 45 s wall in all (each cell also reads its memory in one more fresh process).

Outputs, in ``--out`` (default ``benchmarks/results``; ``benchmarks/results/quick``, which git
ignores, for ``--quick`` runs): ``<name>.csv`` (every number), ``<name>.md`` (tables with ratios to
the non-private step, see :mod:`benchmarks.report`) and ``<name>_<suite>.png`` (time and peak
memory against batch size, one panel per layer or model).
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import math
import os
import resource
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from benchmarks import layers, lstm, models, scale
from benchmarks.methods import COMPILED, METHODS, inductor_in_process, make_step

FIELDS = [
    "suite", "config", "desc", "batch", "method", "ms", "min_ms", "repeats", "peak_mb",
    "time_ratio", "mem_ratio", "flops", "flop_ratio", "compile_s", "busy_before", "busy_during",
    "attempts", "error", "note", "threads", "torch", "opacus", "cpus", "quick", "malloc", "ref_ms",
    "rss_mb",
]
MIN_BASE_MB = 1.0  # below this non-private peak growth, memory ratios are not meaningful
RESULTS = "benchmarks/results"  # the committed results
QUICK_RESULTS = "benchmarks/results/quick"  # smoke runs: listed in .gitignore


SUITES: dict[str, Callable[[bool], dict[str, dict[str, Any]]]] = {
    "layers": layers.layer_configs,
    "models": models.model_configs,
    "lstm": lstm.lstm_configs,
    "scale": scale.scale_configs,
}
DEFAULT_SUITES = ["layers", "models", "lstm"]  # a full run; --quick runs every suite
SUITE_METHODS = {"scale": scale.SCALE_METHODS}  # suites that run a subset of the methods
QUICK_COMPILED = {"layers": ["Linear"]}
"""With --quick, where the compiled methods run (compiling costs seconds to minutes per
cell; elsewhere --quick skips them, so that it still runs every method once in <= 90 s)."""


def build_step(suite: str, name: str, quick: bool, method: str, batch: int) -> Any:
    """The builder :func:`benchmarks.layers.measure` calls in the child (batch size last)."""
    return make_step(SUITES[suite](quick)[name], method, batch)


def _measure(args: tuple[Any, ...], opts: argparse.Namespace, warmup: int, repeats: int,
             min_ms: float) -> tuple[dict[str, Any], float]:
    """One measurement (a forked child), and the fraction of all cores that OTHER processes
    kept busy meanwhile: busy ticks (``/proc/stat``) minus this process's and the child's
    CPU time (``getrusage``), over the elapsed ticks; NaN where ``/proc/stat`` is missing."""
    try:
        total0, idle0 = layers.cpu_ticks()
    except OSError:  # pragma: no cover - not Linux
        total0 = idle0 = None
    cpu0 = _own_cpu_seconds()
    suite, name, quick, method, batch = args
    ref_args = (suite, name, quick, "nn", batch) if opts.paired and method != "nn" else None
    try:
        result = layers.measure(build_step, args, opts.threads, warmup, repeats, min_ms,
                                timeout=opts.cell_timeout, tiny=not opts.quick, flops=True,
                                ref_args=ref_args)
    except EOFError:  # the child died without reporting (killed, e.g. out of memory)
        result = dict(error="the measuring process died (out of memory?)")
    if result is None:
        result = dict(error="not available")
    if "error" not in result:
        result["rss_mb"] = result.get("peak_mb", math.nan)  # glibc's defaults, the timing process
        result["peak_mb"] = _median_peak(args, opts, 1 if method in COMPILED else opts.mem_repeats)
    if total0 is None:
        return result, math.nan
    total1, idle1 = layers.cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = ((total1 - total0) - (idle1 - idle0)) / hz
    others = max(0.0, busy - (_own_cpu_seconds() - cpu0)) / max((total1 - total0) / hz, 1e-9)
    return result, others


def _median_peak(args: tuple[Any, ...], opts: argparse.Namespace, repeats: int) -> float:
    """The median of ``repeats`` peak-memory readings of the cell, each in a fresh process
    with glibc's mmap threshold held (:func:`benchmarks.layers.pin_malloc`). Off glibc,
    where no reading could hold it, the median of the plain readings; NaN when none came
    back."""
    pinned, plain = [], []
    for _ in range(max(repeats, 1)):
        try:
            more = layers.measure(build_step, args, opts.threads, 0, 0, 0.0, timeout=opts.cell_timeout,
                                  tiny=not opts.quick, memory_only=True)
        except EOFError:
            more = None
        if more and "peak_mb" in more:
            (pinned if more.get("pinned") else plain).append(more["peak_mb"])
    peaks = pinned or plain
    return statistics.median(peaks) if peaks else math.nan


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _prewarm(methods: list[str], has_opacus: bool) -> None:
    """For 1-thread runs: import Opacus and take one tiny step of every method here, once,
    so that the forked children inherit the lazy imports and first-call set-up (up to a
    second each) instead of paying them in every measurement.

    Not done with more threads: importing Opacus and running torch ops start torch's
    intra-op thread pool, and children forked from a process with a started pool are slow
    (see ``benchmarks.layers._grad_sample_module``). With ONE thread no pool is started.
    Each child still takes its own one-example step before it measures (not with --quick).
    The compiled methods are not run here: their modules are imported, nothing compiles
    before the children fork."""
    import torch

    torch.set_num_threads(1)
    if has_opacus:
        import opacus  # noqa: F401
    if any(m in COMPILED for m in methods):  # the compiler's imports, but no compile here:
        import torch._dynamo  # noqa: F401  # a compile starts state a fork must not copy
        import torch._inductor.compile_fx  # noqa: F401
    tiny = layers.layer_configs(True)["Linear"]
    for method in methods:
        if method in COMPILED:
            continue
        try:
            make_step(tiny, method, 1)()
        except Exception:  # the measurement reports it
            pass


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", default=None,
                        help=f"comma-separated suites of {list(SUITES)} (default: {','.join(DEFAULT_SUITES)}; "
                             "quick: all)")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma-separated (default 16,64 or the configuration's own, scale: "
                             "GPT2 4,8, WRN16-4 16,32; quick 4, scale 2)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: %(default)s")
    parser.add_argument("--configs", default="", help="comma-separated subset of layer/model names (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, one batch size, 1 repeat, no waiting: a smoke run that runs every "
                             "method once (the compiled methods, which compile for seconds to minutes, only "
                             "on the layers suite's Linear)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps at least (default 5, quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1, quick 0)")
    parser.add_argument("--mem-repeats", type=int, default=None,
                        help="peak-memory readings per cell, each in a fresh process with glibc's mmap "
                             "threshold held, of which the median is reported (default 3, quick 1; the "
                             "compiled methods: 1)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="repeat fast steps until this many seconds, at most 100 steps (default 1, quick 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 2, quick 1)")
    parser.add_argument("--max-busy", type=float, default=0.25,
                        help="wait while other processes keep more than this fraction of the CPU busy")
    parser.add_argument("--max-wait", type=float, default=None,
                        help="seconds to wait for a quiet CPU before measuring anyway (default 120, quick 0)")
    parser.add_argument("--retries", type=int, default=None,
                        help="measure a cell again (up to this many times) when other processes kept "
                             "more than --max-busy of the CPU busy during it (default 2, quick 0)")
    parser.add_argument("--cell-timeout", type=float, default=None,
                        help="seconds one cell (build, compile, steps) may take before it is killed and "
                             "recorded as an error (default 1800, quick 300)")
    parser.add_argument("--out", default=None,
                        help=f"output folder (default: {RESULTS}; with --quick: {QUICK_RESULTS}, git-ignored)")
    parser.add_argument("--name", default=None, help="file stem (default: bench, quick: bench-quick)")
    parser.add_argument("--no-plots", action="store_true", help="CSV and Markdown only")
    parser.add_argument("--paired", action=argparse.BooleanOptionalAction, default=None,
                        help="time the non-private step in each method's process, interleaved, and "
                             "take the ratio to that (default: on, off with --quick)")
    opts = parser.parse_args(argv)
    if opts.paired is None:
        opts.paired = not opts.quick
    opts.suites = _csv_list(opts.suite) if opts.suite else (list(SUITES) if opts.quick else DEFAULT_SUITES)
    opts.batches = [int(b) for b in _csv_list(opts.batch_sizes)] if opts.batch_sizes else None
    if opts.cell_timeout is None:
        opts.cell_timeout = 300.0 if opts.quick else 1800.0
    if opts.threads is None:
        opts.threads = 1 if opts.quick else 2
    if opts.retries is None:
        opts.retries = 0 if opts.quick else 2
    if opts.mem_repeats is None:
        opts.mem_repeats = 1 if opts.quick else 3
    opts.method_list = _csv_list(opts.methods)
    opts.config_list = _csv_list(opts.configs)
    for kind, given, known in (("suite", opts.suites, SUITES), ("method", opts.method_list, METHODS)):
        unknown = [g for g in given if g not in known]
        if unknown:
            parser.error(f"unknown {kind} {unknown}; choose from {list(known)}")
    if "nn" not in opts.method_list:
        opts.method_list.insert(0, "nn")  # the reference of every ratio
    if opts.name is None:
        opts.name = ("scale" if opts.suites == ["scale"] else "bench") + ("-quick" if opts.quick else "")
    if opts.out is None:
        opts.out = QUICK_RESULTS if opts.quick else RESULTS
    return opts


def plan(opts: argparse.Namespace, methods: list[str]) -> list[tuple[str, str, str, int, str]]:
    """The cells to measure, in order: ``(suite, config, desc, batch, method)``.

    A suite in :data:`SUITE_METHODS` runs only its methods; batch sizes are ``--batch-sizes``,
    else the configuration's ``batches``, else 16, 64 (quick: 4). With ``--quick`` (and no
    ``--configs``) the compiled methods run only where :data:`QUICK_COMPILED` says."""
    jobs = []
    for suite in opts.suites:
        configs = SUITES[suite](opts.quick)
        suite_methods = [m for m in methods if m in SUITE_METHODS.get(suite, methods)]
        for name, cfg in configs.items():
            if opts.config_list and name not in opts.config_list:
                continue
            run = [m for m in suite_methods if not (opts.quick and m in COMPILED and not opts.config_list
                                                     and name not in QUICK_COMPILED.get(suite, ()))]
            for batch in opts.batches or cfg.get("batches") or ([4] if opts.quick else [16, 64]):
                jobs += [(suite, name, cfg["desc"], batch, method) for method in run]
    return jobs


def malloc_setting() -> str:
    """glibc's malloc tunables this run inherited (``MALLOC_MMAP_THRESHOLD_`` and the like),
    as ``NAME=value`` pairs; empty for the defaults. Peak RSS depends on them: with glibc's
    default, the threshold above which a block is its own mapping (given back when freed)
    grows to the largest block freed so far (up to 32 MiB), so later tensors below it come
    from the heap, whose freed gaps stay resident."""
    return " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") and k.endswith("_"))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    warmup = opts.warmup if opts.warmup is not None else (0 if opts.quick else 1)
    repeats = opts.repeats if opts.repeats is not None else (1 if opts.quick else 5)
    min_ms = 1e3 * (opts.min_time if opts.min_time is not None else (0.0 if opts.quick else 1.0))
    max_wait = opts.max_wait if opts.max_wait is not None else (0.0 if opts.quick else 120.0)
    has_opacus = importlib.util.find_spec("opacus") is not None
    methods = [m for m in opts.method_list if has_opacus or not m.startswith("opacus")]
    inductor_in_process()  # before any fork: no compile workers anywhere (they hung forked cells)
    if opts.threads == 1:
        _prewarm(methods, has_opacus)
    gc.freeze()  # the children's gc.collect() (before each memory reading) skips what the
    # parent built: with torch and Opacus imported a full collection takes ~0.4 s a cell
    meta = dict(threads=opts.threads, torch=_version("torch"), opacus=_version("opacus"),
                cpus=os.cpu_count(), quick=int(opts.quick), malloc=malloc_setting())

    jobs = plan(opts, methods)
    if not jobs:
        print("nothing to run: check --suite and --configs", file=sys.stderr)
        return 2

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"psgfunc benchmark ({'quick' if opts.quick else 'full'}): {len(jobs)} measurements; "
          f"torch {meta['torch']}, opacus {meta['opacus'] or 'not installed'}, {opts.threads} threads, "
          f"{meta['cpus']} CPUs; median of >= {repeats} after {warmup} warm-up", flush=True)
    rows: list[dict[str, Any]] = []
    base: dict[tuple[str, str, int], dict[str, Any]] = {}
    start = time.perf_counter()
    bar = tqdm(jobs, unit="run", dynamic_ncols=True)
    for suite, name, desc, batch, method in bar:
        bar.set_description(f"{name} B={batch} {method}")
        for attempt in range(1, opts.retries + 2):
            busy = layers.wait_for_quiet(opts.max_busy, max_wait)
            result, during = _measure((suite, name, opts.quick, method, batch), opts, warmup, repeats, min_ms)
            if "timed out" in str(result.get("error", "")):
                break  # measuring again would take as long
            if not during > opts.max_busy or attempt > opts.retries:
                break
            tqdm.write(f"  {name:<11} B={batch:<4d} {method:<16} other processes kept "
                       f"{during:.0%} of the CPU busy: measuring again")
        row = dict(suite=suite, config=name, desc=desc, batch=batch, method=method,
                   ms=result.get("ms", math.nan), min_ms=result.get("min_ms", math.nan),
                   repeats=result.get("n", 0), peak_mb=result.get("peak_mb", math.nan),
                   time_ratio=math.nan, mem_ratio=math.nan, flops=result.get("flops", math.nan),
                   flop_ratio=math.nan, compile_s=result.get("compile_s", math.nan),
                   busy_before="" if math.isnan(busy) else round(busy, 2),
                   busy_during="" if math.isnan(during) else round(during, 2), attempts=attempt,
                   error=" ".join(str(result.get("error", "")).split())[:300],
                   note=" ".join(str(result.get("note", "")).split())[:300], **meta,
                   ref_ms=result.get("ref_ms", math.nan), rss_mb=result.get("rss_mb", math.nan))
        key = (suite, name, batch)
        if method == "nn":
            base[key] = row
        ref = base.get(key)
        if not row["error"] and not math.isnan(row["ref_ms"]):
            row["time_ratio"] = row["ms"] / row["ref_ms"]  # paired: same process, same minutes
        elif ref is not None and not row["error"] and not ref["error"]:
            row["time_ratio"] = row["ms"] / ref["ms"]
        if ref is not None and not row["error"] and not ref["error"]:
            if ref["peak_mb"] >= MIN_BASE_MB:
                row["mem_ratio"] = row["peak_mb"] / ref["peak_mb"]
            if ref["flops"] > 0:
                row["flop_ratio"] = row["flops"] / ref["flops"]
        rows.append(row)
        tqdm.write(f"  {name:<11} B={batch:<4d} {method:<16} "
                   + (f"ERROR {row['error'][:90]}" if row["error"] else
                      f"{row['ms']:10.2f} ms  x{row['time_ratio']:<6.2f} {row['peak_mb']:8.1f} MB"
                      f"  {row['flops'] / 1e9:9.3g} GFLOP"
                      + ("" if math.isnan(row["compile_s"]) else f"  compiled in {row['compile_s']:.1f} s")))
    bar.close()
    elapsed = time.perf_counter() - start

    csv_path = out / f"{opts.name}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)

    from benchmarks import report  # matplotlib is imported only now, after every child ran

    written = [csv_path]
    plots = [] if opts.no_plots else report.plot(report.load(csv_path), out / opts.name)
    md_path = out / f"{opts.name}.md"
    md_path.write_text(report.markdown(report.load(csv_path), plots=plots, details=True,
                                       relative_to=out))
    written += [md_path, *plots]
    print(f"\n{len(rows)} measurements in {elapsed:.0f} s; wrote " + ", ".join(map(str, written)))
    return 0
