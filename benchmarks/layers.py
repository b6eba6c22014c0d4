"""Per-layer cost of per-sample gradients: psgfunc's methods against a plain step and Opacus.

Run::

    python benchmarks/layers.py                 # full: Opacus's benchmark shapes, B = 16, 64
    python benchmarks/layers.py --quick         # tiny shapes, 1 repeat: a smoke run (~30 s)
    python benchmarks/layers.py --out benchmarks/results/layers.csv   # the default path

Layers and inputs are those of Opacus's micro-benchmark config (``benchmarks/config.json``
in pytorch/opacus): ``Linear(512, 512)`` on ``x [B, 512]``; ``Conv2d(64, 64, k=8)`` on
``x [B, 64, 50, 100]``; ``LayerNorm(64)`` on ``x [B, 64]``; ``Embedding(20000, 100)`` on one
index per example, ``idx [B]``. Each step is a forward, the loss ``sum(out * target)`` (a
fixed random ``target``) and a backward that leaves, per method:

* ``nn``: the ordinary gradient (torch.nn, non-private; the reference for the ratios);
* ``vmap``: ``per_sample_grads(fn, params, x, target, method="vmap")`` with ``fn`` written
  with ``psgfunc.functional`` for one example;
* ``expanded``: the same call with ``method="expanded"`` (the per-layer rules);
* ``shell``: the ``psgfunc.nn`` shell's forward and ``loss.backward()`` (``.grad_sample``
  and ``.grad``);
* ``opacus``: ``opacus.GradSampleModule`` (hooks) forward and backward (``.grad_sample``),
  when opacus is installed.

Before each measurement the script waits (up to ``--max-wait`` s) until other processes use
at most ``--max-busy`` of the CPU, and records what it saw (``busy_before`` in the CSV).

Time: the median of at least ``--repeats`` (5) steps after ``--warmup`` (1) steps, and of
as many more as fit in ``--min-time`` (1 s; at most 100 steps) for fast layers, with
``torch.set_num_threads(--threads)`` (2 by default); the CSV also has the minimum. On a
shared machine, other processes on the same cores inflate small steps a lot (two OpenMP
threads wait for each other across time slices): compare ratios from one run.

Memory (:func:`step_peak_mb`): the peak resident-set growth of ONE step, in a fresh child
process forked (before any torch op ran) for each (layer, batch, method), with the layer,
inputs and target already built and after one step on a single example (which pays one-time
costs: lazy imports, kernel caches). On Linux, just before the step the child returns its
free heap pages to the OS (``malloc_trim``), resets its peak RSS (``/proc/self/clear_refs``)
and reads its RSS; the figure is the peak RSS during the step (``VmHWM``) minus that RSS. It
counts every byte the step needs at its high-water mark beyond the live model and inputs
(activations, saved tensors, per-sample gradients, kernel workspaces, allocator slack), at
page granularity. Elsewhere it falls back to the growth of ``ru_maxrss`` over the step,
which misses memory the step reuses from pages the process already touched.

A second table compares, for the convolution rule, the two ways of contracting each
example's weight gradient (grouped convolution with the batch as groups, which the rule
uses, against unfold + einsum) on the Opacus layer and on typical small CNN layers, and is
saved next to the first CSV as ``conv_weight_grad.csv`` (``conv_weight_grad_quick.csv``).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import gc
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psgfunc.functional as PF  # noqa: E402
import psgfunc.nn as pnn  # noqa: E402
from psgfunc import per_sample_grads  # noqa: E402
from psgfunc.per_sample.rules.conv import per_sample_conv_weight_grad  # noqa: E402


def _grad_sample_module() -> Any:
    """opacus.GradSampleModule, or None. Imported in the child only: importing opacus starts
    torch's OpenMP pool, and a pool started before fork makes every forked child crawl."""
    try:
        from opacus import GradSampleModule
    except ImportError:  # pragma: no cover
        return None
    return GradSampleModule

METHODS = ["nn", "vmap", "expanded", "shell", "opacus"]


# --------------------------------------------------------------------------- layer configs


def layer_configs(quick: bool) -> dict[str, dict[str, Any]]:
    """name -> torch.nn factory, shell factory, functional layer, input maker, description."""
    lin, conv_c, conv_k, conv_hw, ln, vocab, dim = (
        (32, 4, 3, (8, 8), 8, 100, 8) if quick else (512, 64, 8, (50, 100), 64, 20000, 100)
    )
    return {
        "Linear": dict(
            desc=f"Linear({lin}, {lin}), x [B, {lin}]",
            nn=lambda: nn.Linear(lin, lin),
            shell=lambda b: pnn.Linear(lin, lin, b),
            fn=lambda p, x: PF.linear(p, x),
            x=lambda b: torch.randn(b, lin),
        ),
        "Conv2d": dict(
            desc=f"Conv2d({conv_c}, {conv_c}, k={conv_k}), x [B, {conv_c}, {conv_hw[0]}, {conv_hw[1]}]",
            nn=lambda: nn.Conv2d(conv_c, conv_c, conv_k),
            shell=lambda b: pnn.Conv2d(conv_c, conv_c, conv_k, b),
            fn=lambda p, x: PF.conv2d(p, x),
            x=lambda b: torch.randn(b, conv_c, *conv_hw),
        ),
        "LayerNorm": dict(
            desc=f"LayerNorm({ln}), x [B, {ln}]",
            nn=lambda: nn.LayerNorm(ln),
            shell=lambda b: pnn.LayerNorm(ln, b),
            fn=lambda p, x: PF.layer_norm(p, x, (ln,)),
            x=lambda b: torch.randn(b, ln),
        ),
        "Embedding": dict(
            desc=f"Embedding({vocab}, {dim}), idx [B]",
            nn=lambda: nn.Embedding(vocab, dim),
            shell=lambda b: pnn.Embedding(vocab, dim, b),
            fn=lambda p, x: PF.embedding(p, x),
            x=lambda b: torch.randint(0, vocab, (b,)),
        ),
    }


def make_step(cfg: dict[str, Any], method: str, batch: int) -> Callable[[], Any]:
    """Build everything for one (layer, method, batch) and return the step to time."""
    torch.manual_seed(0)
    module = cfg["nn"]()
    x = cfg["x"](batch)
    with torch.no_grad():
        target = torch.randn_like(module(x))
    params = {k: v.detach() for k, v in module.named_parameters()}
    layer = cfg["fn"]

    if method == "nn":
        def step():
            module.zero_grad()
            (module(x) * target).sum().backward()
            return [p.grad for p in module.parameters()]
    elif method in ("vmap", "expanded"):
        def fn(p, xi, ti):
            return (layer(p, xi) * ti).sum()

        def step():
            return per_sample_grads(fn, params, x, target, method=method)
    elif method == "shell":
        shell = cfg["shell"](batch)
        shell.load_state_dict(module.state_dict())

        def step():
            pnn.zero_grad(shell)
            (shell(x) * target).sum().backward()
            return [p.grad_sample for p in shell.parameters()]
    elif method == "opacus":
        grad_sample_module = _grad_sample_module()
        if grad_sample_module is None:
            return None
        gsm = grad_sample_module(module)

        def step():
            gsm.zero_grad(set_to_none=True)
            (gsm(x) * target).sum().backward()
            return [p.grad_sample for p in module.parameters()]
    else:
        raise ValueError(method)
    return step


# ----------------------------------------------------------------- conv weight-grad variants


def unfold_weight_grad(x, g, weight_shape, stride, padding, dilation, groups):
    """Per-example conv weight gradients by unfold (im2col) + einsum: ``[B, O, C/G, *k]``."""
    dim = len(stride)
    size, channels = x.shape[:2]
    out_channels, kernel = g.shape[1], weight_shape[2:]
    x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    for i in range(dim):  # [B, C, *S] -> [B, C, *S', *k] (strided views)
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])[..., :: dilation[i]]
    patches = x.reshape(size, groups, channels // groups, *g.shape[2:], *kernel)
    g = g.reshape(size, groups, out_channels // groups, *g.shape[2:])
    pos, ker = "lmn"[:dim], "pqr"[:dim]
    out = torch.einsum(f"bgo{pos},bgc{pos}{ker}->bgoc{ker}", g, patches)
    return out.reshape(size, *weight_shape)


def grouped_weight_grad(x, g, weight_shape, stride, padding, dilation, groups):
    """What the conv rule does: one grouped convolution gradient, batch as groups."""
    return per_sample_conv_weight_grad(
        x.unsqueeze(0), g.unsqueeze(0), weight_shape, stride, padding, dilation, groups
    )


def conv_wgrad_configs(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [dict(name="tiny 2d", b=8, c=4, o=4, k=(3, 3), s=(8, 8), groups=1, stride=(1, 1))]
    return [
        dict(name="Opacus conv 64->64 k8 50x100", b=16, c=64, o=64, k=(8, 8), s=(50, 100), groups=1, stride=(1, 1)),
        dict(name="first layer 3->32 k3 32x32", b=64, c=3, o=32, k=(3, 3), s=(32, 32), groups=1, stride=(1, 1)),
        dict(name="MNIST 1->16 k8 s2 28x28", b=64, c=1, o=16, k=(8, 8), s=(28, 28), groups=1, stride=(2, 2)),
        dict(name="mid 32->64 k3 16x16", b=64, c=32, o=64, k=(3, 3), s=(16, 16), groups=1, stride=(1, 1)),
        dict(name="depthwise 64 g64 k3 16x16", b=64, c=64, o=64, k=(3, 3), s=(16, 16), groups=64, stride=(1, 1)),
        dict(name="1-D 64->64 k5 L200", b=64, c=64, o=64, k=(5,), s=(200,), groups=1, stride=(1,)),
        dict(name="3-D 8->16 k3 16^3", b=16, c=8, o=16, k=(3, 3, 3), s=(16, 16, 16), groups=1, stride=(1, 1, 1)),
    ]


def make_wgrad_step(cfg: dict[str, Any], variant: str, batch: int) -> Callable[[], Any]:
    torch.manual_seed(0)
    dim = len(cfg["k"])
    x = torch.randn(batch, cfg["c"], *cfg["s"])
    out = [(s - k) // st + 1 for s, k, st in zip(cfg["s"], cfg["k"], cfg["stride"])]
    g = torch.randn(batch, cfg["o"], *out)
    shape = (cfg["o"], cfg["c"] // cfg["groups"], *cfg["k"])
    fn = grouped_weight_grad if variant == "grouped" else unfold_weight_grad
    args = (x, g, shape, cfg["stride"], (0,) * dim, (1,) * dim, cfg["groups"])
    return lambda: fn(*args)


# ---------------------------------------------------------------------------- measurement


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
PINNED_MMAP_THRESHOLD = 128 * 1024  # glibc's default starting threshold, here held fixed


def pin_malloc() -> bool:
    """glibc: make every block of 128 KiB or more its own mapping, given back to the OS when
    freed, for the rest of this process (``mallopt(M_MMAP_THRESHOLD, 128 KiB)``, which also
    turns off the threshold's growth). Return whether it took (False off glibc).

    By default the threshold grows to the largest block freed so far (up to 32 MiB), after
    which tensors below it come from the heap, where freed gaps stay resident: the peak RSS
    of a step then depends on the order of its allocations (the same step read 89-109 MB
    from process to process). With the threshold held, a step's peak RSS growth is the
    high-water mark of what it holds (tensors, kernel workspaces) and repeats within a MB:
    on WRN-16-4 it matched the profiler's peak of live tensor bytes to 1 MB."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, PINNED_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def step_peak_mb(step: Callable[[], Any]) -> float:
    """Run ``step()`` once; return its peak resident-set growth in MB (see the module doc).

    Linux: free heap pages go back to the OS first (``malloc_trim(0)``), so the step must
    fault in all it uses; the peak RSS is reset to the current RSS (writing ``5`` to
    ``/proc/self/clear_refs``); the result is ``VmHWM`` after the step minus ``VmRSS``
    before it. Elsewhere: the growth of ``ru_maxrss`` (a lower bound)."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
        if _status_kb("VmHWM") > before + 1024:  # the reset did not take (kernel < 4.0)
            raise OSError("clear_refs")
    except (OSError, AttributeError):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    step()
    return (_status_kb("VmHWM") - before) / 1024


def _child(conn, builder, args, threads, warmup, repeats, min_ms, tiny=True, flops=False, ref_args=None,
           memory_only=False):
    """In a fresh forked process (the parent never ran torch's thread pool, see
    ``_grad_sample_module``): a one-example step (one-time initialisation; not with
    ``tiny=False``, where the parent already paid it), one step for peak memory, the FLOPs of
    one step (``flops=True``, :func:`benchmarks.methods.count_flops`), then warm-up and timed
    steps. ``args[-1]`` is the batch size. A step that compiled reports ``compile_s``.

    ``ref_args``: also build ``builder(*ref_args)`` (the non-private step) after the memory
    and FLOPs readings and time it interleaved with the step, one of each per round; its
    median is ``ref_ms``, so that the step's ratio to it is measured under the same load
    (a shared machine's speed drifts from second to second and from process to process).
    ``memory_only``: report the peak memory alone, read with glibc's mmap threshold held
    (:func:`pin_malloc`; ``pinned`` says whether it took)."""
    try:
        pinned = pin_malloc() if memory_only else False
        warnings.simplefilter("ignore")
        torch.set_num_threads(threads)
        if tiny:
            first = builder(*args[:-1], 1)
            if first is None:
                conn.send(None)
                return
            first()
            del first
        step = builder(*args)
        if step is None:
            conn.send(None)
            return
        peak_mb = step_peak_mb(step)
        if memory_only:
            conn.send(dict(peak_mb=peak_mb, pinned=pinned))
            return
        result: dict[str, Any] = dict(compile_s=getattr(step, "compile_s", math.nan),
                                      note=getattr(step, "note", ""))
        if flops:
            from benchmarks.methods import count_flops

            result["flops"] = count_flops(step)
        ref = builder(*ref_args) if ref_args is not None else None
        for _ in range(warmup):
            step()
            if ref is not None:
                ref()
        times: list[float] = []
        ref_times: list[float] = []
        while len(times) < repeats or (sum(times) < min_ms and len(times) < 100):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
            if ref is not None:
                start = time.perf_counter()
                ref()
                ref_times.append((time.perf_counter() - start) * 1e3)
        result.update(ms=statistics.median(times), min_ms=min(times), n=len(times), peak_mb=peak_mb)
        if ref_times:
            result["ref_ms"] = statistics.median(ref_times)
        conn.send(result)
    except Exception as error:  # report, do not hang the parent
        conn.send(dict(error=f"{type(error).__name__}: {error}"))
    finally:
        conn.close()


def cpu_ticks() -> tuple[int, int]:
    """``(total, idle + iowait)`` clock ticks of all cores since boot (Linux ``/proc/stat``)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


def cpu_busy(window: float = 0.5) -> float:
    """Fraction of all cores busy during ``window`` seconds (Linux ``/proc/stat``; 0 elsewhere)."""
    try:
        total0, idle0 = cpu_ticks()
        time.sleep(window)
        total1, idle1 = cpu_ticks()
    except OSError:  # pragma: no cover
        return 0.0
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(max_busy: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until other processes use at most ``max_busy`` of the CPU.

    Returns the last busy fraction seen (the run goes on after ``max_wait`` anyway)."""
    if max_wait <= 0:
        return float("nan")  # not even sampled (quick runs)
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > max_busy and time.monotonic() < deadline:
        time.sleep(2.0)
        busy = cpu_busy()
    return busy


def measure(builder, args, threads, warmup, repeats, min_ms, *, timeout=None, tiny=True,
            flops=False, ref_args=None, memory_only=False) -> dict[str, Any] | None:
    """Run :func:`_child` in a forked process and return what it reports (``ref_args``: the
    paired reference step's builder arguments, ``memory_only``: the peak memory alone, see
    :func:`_child`).

    ``timeout``: seconds to wait for the child; past it the child is killed and the result is
    an error (a cell never hangs the run). Raises EOFError when the child died silently."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, builder, args, threads, warmup, repeats, min_ms, tiny, flops,
                                            ref_args, memory_only))
    proc.start()
    child.close()
    try:
        if timeout is not None and not parent.poll(timeout):
            proc.kill()
            return dict(error=f"timed out: no result after {timeout:g} s (the cell was killed)")
        return parent.recv()
    finally:
        proc.join()
        parent.close()


def _config_by_name(quick: bool, name: str) -> dict[str, Any]:
    return layer_configs(quick)[name]


def _layer_builder(quick: bool, name: str, method: str, batch: int):
    return make_step(_config_by_name(quick, name), method, batch)


def _wgrad_builder(quick: bool, index: int, variant: str, batch: int):
    return make_wgrad_step(conv_wgrad_configs(quick)[index], variant, batch)


# ---------------------------------------------------------------------------------- tables


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (smoke run)")
    parser.add_argument("--out", default=None,
                        help="CSV path (default benchmarks/results/layers.csv, with --quick "
                             "benchmarks/results/layers_quick.csv)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--layers", nargs="+", default=None, help="subset of layer names")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--min-time", type=float, default=None,
                        help="keep repeating a fast step until this many seconds (max 100 steps)")
    parser.add_argument("--max-busy", type=float, default=0.25,
                        help="before each measurement, wait while other processes keep more than "
                             "this fraction of the CPU busy")
    parser.add_argument("--max-wait", type=float, default=None,
                        help="seconds to wait for a quiet CPU before measuring anyway "
                             "(default 120, quick 0)")
    parser.add_argument("--no-conv-weight-grad", action="store_true", help="skip the second table")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    min_ms = 1e3 * (args.min_time if args.min_time is not None else (0.0 if args.quick else 1.0))
    if args.out is None:
        args.out = f"benchmarks/results/layers{'_quick' if args.quick else ''}.csv"
    if args.max_wait is None:
        args.max_wait = 0.0 if args.quick else 120.0
    configs = layer_configs(args.quick)
    names = args.layers or list(configs)

    rows = []
    print(f"# psgfunc layer benchmark ({'quick' if args.quick else 'full'}); torch {torch.__version__}, "
          f"{args.threads} threads, median of {repeats} after {warmup} warm-up; "
          f"CPU count {os.cpu_count()}\n")
    for name in names:
        for batch in args.batches:
            base = None
            for method in METHODS:
                busy = wait_for_quiet(args.max_busy, args.max_wait)
                result = measure(_layer_builder, (args.quick, name, method, batch), args.threads, warmup, repeats, min_ms)
                row = dict(layer=name, shape=configs[name]["desc"], batch=batch, method=method,
                           ms=float("nan"), ratio=float("nan"), min_ms=float("nan"), repeats=0,
                           peak_mb=float("nan"), busy_before=busy if math.isnan(busy) else round(busy, 2), error="")
                if result is None:
                    row["error"] = "opacus not installed"
                elif "error" in result:
                    row["error"] = result["error"]
                else:
                    row.update(ms=result["ms"], min_ms=result["min_ms"], repeats=result["n"],
                               peak_mb=result["peak_mb"])
                    if method == "nn":
                        base = result["ms"]
                    row["ratio"] = result["ms"] / base if base else float("nan")
                rows.append(row)
                print(f"  {name:9s} B={batch:<3d} {method:8s} {fmt(row['ms'], '9.2f')} ms  "
                      f"x{fmt(row['ratio'], '.2f')}  {fmt(row['peak_mb'], '.1f')} MB {row['error']}", flush=True)

    print("\n| layer (input) | B | method | median (ms) | x non-private | min (ms) | peak RSS growth (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']}: {r['shape']} | {r['batch']} | {r['method']} | {fmt(r['ms'], '.2f')} | "
              f"{fmt(r['ratio'], '.2f')} | {fmt(r['min_ms'], '.2f')} | {fmt(r['peak_mb'], '.0f')} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nsaved {out}")

    if not args.no_conv_weight_grad:
        wrows = []
        for i, cfg in enumerate(conv_wgrad_configs(args.quick)):
            res = {}
            for v in ("grouped", "unfold"):
                wait_for_quiet(args.max_busy, args.max_wait)
                res[v] = measure(_wgrad_builder, (args.quick, i, v, cfg["b"]), args.threads, warmup, repeats, min_ms)
            wrows.append(dict(config=cfg["name"], batch=cfg["b"],
                              grouped_ms=res["grouped"].get("ms", float("nan")),
                              unfold_ms=res["unfold"].get("ms", float("nan")),
                              grouped_min_ms=res["grouped"].get("min_ms", float("nan")),
                              unfold_min_ms=res["unfold"].get("min_ms", float("nan")),
                              grouped_peak_mb=res["grouped"].get("peak_mb", float("nan")),
                              unfold_peak_mb=res["unfold"].get("peak_mb", float("nan"))))
        print("\n| conv per-sample weight grad | B | grouped conv median / min (ms) | "
              "unfold+einsum median / min (ms) | grouped peak (MB) | unfold peak (MB) |")
        print("|---|---|---|---|---|---|")
        for r in wrows:
            print(f"| {r['config']} | {r['batch']} | {fmt(r['grouped_ms'], '.2f')} / "
                  f"{fmt(r['grouped_min_ms'], '.2f')} | {fmt(r['unfold_ms'], '.2f')} / "
                  f"{fmt(r['unfold_min_ms'], '.2f')} | {fmt(r['grouped_peak_mb'], '.0f')} | "
                  f"{fmt(r['unfold_peak_mb'], '.0f')} |")
        wout = out.with_name(f"conv_weight_grad{'_quick' if args.quick else ''}.csv")
        with wout.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(wrows[0]))
            writer.writeheader()
            writer.writerows(wrows)
        print(f"\nsaved {wout}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
