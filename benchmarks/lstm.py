"""One LSTM layer: per-sample gradients against the fused ``nn.LSTM`` step and Opacus.

Run::

    python benchmarks/lstm.py             # T = 128, D = H = 100, B = 16 and 64 (~7 min)
    python benchmarks/lstm.py --threads 2 1   # both settings, the committed CSV (~15 min)
    python benchmarks/lstm.py --quick     # tiny shapes, 1 repeat, no waiting: a smoke run
    python benchmarks/lstm.py --threads 1 --out benchmarks/results/lstm-1thread.csv

The layer is ``LSTM(100, 100)`` over ``x [B, 128, 100]`` (``batch_first``); every step is a
forward, the loss ``sum(out * target)`` over the outputs at all steps (a fixed random
``target``) and a backward, leaving, per method:

* ``nn``: ``torch.nn.LSTM`` (torch's fused C++ loop), ``.grad`` (the reference of ratios);
* ``plain``: ``psgfunc.functional.lstm`` with ordinary autograd, ``.grad`` only: what a
  ``DPLSTM`` costs without per-sample gradients;
* ``shell``: ``psgfunc.nn.DPLSTM``, ``p.grad_sample`` and ``p.grad``;
* ``expanded`` / ``vmap``: ``per_sample_grads(fn, params, x, target, method=...)`` with ``fn``
  the one-example ``PF.lstm`` loss;
* ``clip-fast``: ``psgfunc.dp.clipped_grad_sum(..., method="fast")``: per-example norms and
  the clipped sum, without ``[B, *shape]`` tensors;
* ``opacus-hooks``: ``opacus.layers.DPLSTM`` in ``opacus.GradSampleModule`` (hooks), the
  LSTM Opacus supports, ``p.grad_sample`` (when opacus is installed).

Time: for each ``--threads`` value, one freshly forked process
(``torch.set_num_threads``) builds every method's step for a batch size, runs each once
(shape check) plus one warm-up, then times them in interleaved rounds (every round runs
every method once, in a rotating order) until each has ``--repeats`` (7) samples and at
least ``--min-time`` (2 s) in total (at most 100 rounds); the table gives the median and the
minimum. Interleaving matters on a shared machine: the background load changes from second
to second, and measuring the methods one after the other would put it into the ratios.
Even so, with 2 threads on a busy 2-core box the two intra-op threads wait for each other
across time slices, which inflates every step of many small ops (an LSTM recurrence) by
up to 10x: compare ratios, and ``--threads 1`` numbers, of one run.

Memory (not with ``--quick``): the growth of the peak resident set size (``ru_maxrss``)
during ONE step, in a fresh forked process per (method, batch size)
(:func:`benchmarks.layers.measure`), after the inputs were built and a one-example step ran:
every byte the step touched at its high-water mark (activations, saved tensors, per-sample
gradients, workspaces), at page granularity. Before each thread setting the script waits
up to ``--max-wait`` s for other processes to leave the CPU quiet and records the busy
fraction it saw (``busy_before``).

Prints a Markdown table and the goals (per-sample gradients at most 3x the fused
``nn.LSTM`` and at least 3x faster than Opacus; ``plain`` at most 2x ``nn.LSTM``), and saves
every number as CSV (``--out``, default ``benchmarks/results/lstm.csv``).

:func:`lstm_configs` gives the same layer to ``python -m benchmarks --suite lstm``.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing as mp
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psgfunc.functional as PF  # noqa: E402
from benchmarks import layers as _layers  # noqa: E402
from benchmarks import methods as _methods  # noqa: E402

METHODS: dict[str, str] = {
    "nn": "torch.nn.LSTM forward + backward (fused C++ loop): .grad",
    "plain": "psgfunc.functional.lstm forward + backward: .grad (a DPLSTM without per-sample grads)",
    "shell": "psgfunc.nn.DPLSTM forward + backward: .grad_sample and .grad",
    "expanded": "per_sample_grads(method='expanded') over PF.lstm",
    "vmap": "per_sample_grads(method='vmap') over PF.lstm",
    "clip-fast": "psgfunc.dp.clipped_grad_sum(method='fast'): norms and clipped sum",
    "opacus-hooks": "opacus.layers.DPLSTM + GradSampleModule (hooks): .grad_sample",
}


class LastLayer(nn.Module):
    """``x [B, T, D] -> out [B, T, H]``: an LSTM's output sequence (no state)."""

    def __init__(self, lstm: nn.Module):
        super().__init__()
        self.lstm = lstm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


def lstm_configs(quick: bool) -> dict[str, dict[str, Any]]:
    """``{"LSTM": configuration}`` in the format of :mod:`benchmarks.methods`."""
    steps, size, hidden = (8, 8, 8) if quick else (128, 100, 100)

    def opacus_nn() -> nn.Module:
        from opacus.layers import DPLSTM

        return LastLayer(DPLSTM(size, hidden, batch_first=True))

    def fn(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        p = {k.removeprefix("lstm."): v for k, v in params.items()}
        return PF.lstm(p, x)[0]  # one example: x [T, D] -> [T, H]

    return {
        "LSTM": dict(
            desc=f"LSTM({size}, {hidden}), x [B, {steps}, {size}] (batch_first)",
            nn=lambda: LastLayer(nn.LSTM(size, hidden, batch_first=True)),
            fn=fn,
            x=lambda b: torch.randn(b, steps, size),
            opacus_nn=opacus_nn,
        )
    }


def make_step(quick: bool, method: str, batch: int) -> Callable[[], Any] | None:
    """The step of one (method, batch size); None when Opacus is missing."""
    cfg = lstm_configs(quick)["LSTM"]
    if method == "opacus-hooks":
        try:
            import opacus  # noqa: F401
        except ImportError:  # pragma: no cover
            return None
    if method != "plain":
        return _methods.make_step(cfg, method, batch)
    torch.manual_seed(0)
    module = cfg["nn"]()
    x = cfg["x"](batch)
    with torch.no_grad():
        target = torch.randn_like(module(x))
    params = {k.removeprefix("lstm."): v for k, v in module.named_parameters()}

    def step() -> Any:
        for p in params.values():
            p.grad = None
        (PF.lstm(params, x, batch_first=True)[0] * target).sum().backward()
        return [p.grad for p in params.values()]

    return step


# ---------------------------------------------------------------------------- measurement


def _interleaved_child(conn: Any, quick: bool, methods: list[str], batches: list[int],
                       threads: int, warmup: int, repeats: int, min_ms: float) -> None:
    """For each batch size: build every method's step, then time them in rounds (each round
    runs every method once, in a rotating order) so that all methods see the same load."""
    import warnings

    try:
        warnings.simplefilter("ignore")
        torch.set_num_threads(threads)
        conn.send({batch: _time_methods(quick, methods, batch, warmup, repeats, min_ms)
                   for batch in batches})
    except Exception as error:  # report, do not hang the parent
        conn.send({b: {m: dict(error=f"{type(error).__name__}: {error}") for m in methods}
                   for b in batches})
    finally:
        conn.close()


def _time_methods(quick: bool, methods: list[str], batch: int, warmup: int, repeats: int,
              min_ms: float) -> dict[str, dict[str, Any]]:
    import time

    steps: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        try:
            step = make_step(quick, method, batch)
            if step is None:
                results[method] = dict(error="opacus not installed")
                continue
            for _ in range(1 + warmup):  # the first call also checks the output shapes
                step()
            steps[method] = step
        except Exception as error:  # this method does not support the configuration
            results[method] = dict(error=f"{type(error).__name__}: {error}")
    samples: dict[str, list[float]] = {m: [] for m in steps}
    order = list(steps)
    rounds = 0
    while order and (rounds < repeats or (
            min(sum(s) for s in samples.values()) < min_ms and rounds < 100)):
        for method in order[rounds % len(order):] + order[: rounds % len(order)]:
            start = time.perf_counter()
            steps[method]()
            samples[method].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    for method, s in samples.items():
        results[method] = dict(ms=statistics.median(s), min_ms=min(s), n=len(s))
    return results


def _interleaved(quick: bool, methods: list[str], batches: list[int], threads: int,
                 warmup: int, repeats: int, min_ms: float) -> dict[int, dict[str, dict[str, Any]]]:
    """``{batch: {method: median and minimum time}}``, from one fresh forked process (see
    :func:`_interleaved_child`); the parent never starts torch's thread pool."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_interleaved_child,
                       args=(child, quick, methods, batches, threads, warmup, repeats, min_ms))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {b: {m: dict(error="the measuring process died (out of memory?)") for m in methods}
                  for b in batches}
    proc.join()
    return result


def _measure_one(quick: bool, method: str, batch: int, threads: int) -> dict[str, Any] | None:
    """Peak-RSS growth of one step, in a fresh process (:func:`benchmarks.layers.measure`)."""
    try:
        return _layers.measure(make_step, (quick, method, batch), threads, 0, 1, 0.0)
    except EOFError:
        return None


def fmt(value: Any, spec: str) -> str:
    return "n/a" if not isinstance(value, (int, float)) or math.isnan(value) else format(value, spec)


def goals(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each with its numbers and whether it was reached (medians)."""
    at = {(r["threads"], r["batch"], r["method"]): r["ms"] for r in rows}
    lines = []

    def check(name: str, value: float, ok: bool) -> None:
        verdict = "n/a" if math.isnan(value) else ("reached" if ok else "NOT reached")
        lines.append(f"- {name}: {fmt(value, '.2f')} ({verdict})")

    for threads, b in dict.fromkeys((r["threads"], r["batch"]) for r in rows):
        nn_ms, shell_ms, opacus_ms, plain_ms = (
            at.get((threads, b, m), math.nan) for m in ("nn", "shell", "opacus-hooks", "plain")
        )
        tag = f"{threads} thread{'s' if threads > 1 else ''}, B={b}"
        check(f"{tag}: DPLSTM per-sample grads / nn.LSTM <= 3", shell_ms / nn_ms, shell_ms <= 3 * nn_ms)
        check(f"{tag}: Opacus DPLSTM hooks / DPLSTM per-sample grads >= 3", opacus_ms / shell_ms,
              opacus_ms >= 3 * shell_ms)
        check(f"{tag}: plain PF.lstm (no per-sample grads) / nn.LSTM <= 2", plain_ms / nn_ms,
              plain_ms <= 2 * nn_ms)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (smoke run)")
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/lstm.csv; "
                        "quick: benchmarks/results/lstm-quick.csv)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 16 64 (quick: 2 4)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, nargs="+", default=[2],
                        help="torch.set_num_threads; several values: one table each (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds at least (7; quick 1)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="keep timing until every method has run this many seconds (2; quick 0)")
    parser.add_argument("--max-busy", type=float, default=0.25)
    parser.add_argument("--max-wait", type=float, default=None, help="seconds (20; quick 0)")
    args = parser.parse_args(argv)
    quick = args.quick
    batches = args.batches or ([2, 4] if quick else [16, 64])
    repeats = args.repeats if args.repeats is not None else (1 if quick else 7)
    min_ms = 1e3 * (args.min_time if args.min_time is not None else (0.0 if quick else 2.0))
    max_wait = args.max_wait if args.max_wait is not None else (0.0 if quick else 20.0)
    warmup = 0 if quick else 1
    out = Path(args.out or ("benchmarks/results/lstm-quick.csv" if quick else "benchmarks/results/lstm.csv"))
    methods = ["nn"] + [m for m in args.methods if m != "nn"]
    desc = lstm_configs(quick)["LSTM"]["desc"]
    print(f"# LSTM benchmark ({'quick' if quick else 'full'}): {desc}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; median of >= {repeats} interleaved rounds after {warmup} warm-up\n",
          flush=True)

    rows: list[dict[str, Any]] = []
    for threads in args.threads:
        busy = _layers.wait_for_quiet(args.max_busy, max_wait)
        all_times = _interleaved(quick, methods, batches, threads, warmup, repeats, min_ms)
        for batch in batches:
            times = all_times[batch]
            base = base_min = base_mb = math.nan
            for method in methods:
                timed = times.get(method, dict(error="not measured"))
                if "error" not in timed and not quick:  # peak memory of one step, own process
                    mem = _measure_one(quick, method, batch, threads)
                    timed["peak_mb"] = mem.get("peak_mb", math.nan) if mem else math.nan
                row = dict(threads=threads, batch=batch, method=method, ms=math.nan,
                           ratio=math.nan, min_ms=math.nan, min_ratio=math.nan, repeats=0,
                           peak_mb=math.nan, mem_ratio=math.nan,
                           busy_before="" if math.isnan(busy) else round(busy, 2), error="",
                           what=METHODS[method])
                if "error" in timed:
                    row["error"] = " ".join(str(timed["error"]).split())[:300]
                else:
                    row.update(ms=timed["ms"], min_ms=timed["min_ms"], repeats=timed["n"],
                               peak_mb=timed.get("peak_mb", math.nan))
                    if method == "nn":
                        base, base_min, base_mb = timed["ms"], timed["min_ms"], row["peak_mb"]
                    row["ratio"] = row["ms"] / base
                    row["min_ratio"] = row["min_ms"] / base_min
                    if base_mb >= 1.0:
                        row["mem_ratio"] = row["peak_mb"] / base_mb
                rows.append(row)
                print(f"  {threads}t B={batch:<3d} {method:13s} {fmt(row['ms'], '9.2f')} ms  "
                      f"x{fmt(row['ratio'], '.2f')}  {fmt(row['peak_mb'], '.1f')} MB {row['error']}",
                      flush=True)

    print(f"\n{desc}\n")
    print("| threads | B | method | median (ms) | x nn.LSTM | min (ms) | x nn.LSTM (min) | "
          "peak RSS growth (MB) | x nn.LSTM mem |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['batch']} | {r['method']} | {fmt(r['ms'], '.1f')} | "
              f"{fmt(r['ratio'], '.2f')} | {fmt(r['min_ms'], '.1f')} | {fmt(r['min_ratio'], '.2f')} | "
              f"{fmt(r['peak_mb'], '.0f')} | {fmt(r['mem_ratio'], '.1f')} |")
    print("\nGoals (ratios of medians):\n" + "\n".join(goals(rows)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nsaved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
