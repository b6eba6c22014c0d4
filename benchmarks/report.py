"""Markdown tables and plots from a benchmark CSV (written by ``python -m benchmarks``).

Commands::

    python -m benchmarks.report benchmarks/results/bench.csv            # Markdown to stdout
    python -m benchmarks.report benchmarks/results/bench.csv --plots    # and redraw the PNGs
    python -m benchmarks.report benchmarks/results/bench.csv --update benchmarks/RESULTS.md

``--update FILE`` replaces what lies between the lines ``<!-- benchmark-results:begin -->``
and ``<!-- benchmark-results:end -->`` in FILE (README.md or RESULTS.md), so the numbers a
document shows always come from the committed CSV; text outside the markers is kept.
``--marker NAME`` uses ``<!-- benchmark-results:NAME:begin -->`` / ``...:NAME:end -->``
instead, so one document holds several CSVs' tables (the scale suite's:
``python -m benchmarks.report benchmarks/results/scale.csv --update README.md --marker scale``). Links
to the plots are written relative to the repository root (``--link-prefix``).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.methods import METHODS

BEGIN = "<!-- benchmark-results:begin -->"
END = "<!-- benchmark-results:end -->"
_NUMERIC = ("batch", "ms", "min_ms", "repeats", "peak_mb", "time_ratio", "mem_ratio", "flops", "flop_ratio", "ref_ms",
            "compile_s", "threads", "cpus", "quick", "rss_mb")
_INTS = ("batch", "repeats", "threads", "cpus", "quick")
# One fixed style per method, the same in every plot: psgfunc's methods are solid lines in the
# tab10 colours, torch's and Opacus's dashed lines in Paul Tol's muted colours (none repeats a
# tab10 colour), and every method has its own marker, so lines stay apart in grey scale and
# for colour-blind readers too.
METHOD_STYLES: dict[str, dict[str, Any]] = {
    "nn": dict(color="black", marker="o", ls="-", lw=2.5),
    "vmap": dict(color="tab:blue", marker="s", ls="-"),
    "expanded": dict(color="tab:orange", marker="^", ls="-"),
    "auto": dict(color="tab:green", marker="v", ls="-"),
    "shell": dict(color="tab:red", marker="D", ls="-"),
    "dpopt": dict(color="tab:purple", marker="<", ls="-"),
    "dpopt-fast": dict(color="tab:brown", marker=">", ls="-"),
    "clip-fast": dict(color="tab:pink", marker="p", ls="-"),
    "clip-fast-compiled": dict(color="tab:olive", marker="h", ls="-"),
    "clip-compiled": dict(color="tab:cyan", marker="*", ls="-"),
    "torch-ew": dict(color="tab:gray", marker="X", ls="--"),
    "opacus-hooks": dict(color="#332288", marker="P", ls="--"),
    "opacus-functorch": dict(color="#882255", marker="d", ls="--"),
    "opacus-ew": dict(color="#44AA99", marker="H", ls="--"),
    "opacus-ghost": dict(color="#DDCC77", marker="8", ls="--"),
}
_FALLBACK_MARKERS = "o s ^ v D < > p h * X P d H 8".split()


def method_style(method: str, index: int = 0) -> dict[str, Any]:
    """Matplotlib line keywords of ``method`` (:data:`METHOD_STYLES`; a method not listed
    gets a dotted line in ``tab10`` colour and marker number ``index``)."""
    style = METHOD_STYLES.get(method) or dict(
        color=f"C{index % 10}", marker=_FALLBACK_MARKERS[index % len(_FALLBACK_MARKERS)], ls=":"
    )
    return dict(lw=1.3, ms=5, **style) if "lw" not in style else dict(ms=5, **style)


_SUITE_TITLES = {
    "layers": "Layers (Opacus's benchmark shapes)",
    "models": "Models",
    "lstm": "LSTM layer",
    "scale": "Scale: a GPT-2-shaped transformer and WRN-16-4",
}


def load(path: str | Path) -> list[dict[str, Any]]:
    """The CSV's rows, numbers as floats (``batch``, ``repeats``, ``threads``... as ints)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in _NUMERIC:
            if key in row:
                value = float(row[key]) if row[key] not in ("", None) else math.nan
                row[key] = int(value) if key in _INTS and not math.isnan(value) else value
    return rows


def _unique(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _num(value: float) -> str:
    """Three significant digits, no exponent."""
    if not _ok(value):
        return "n/a"
    if value == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{digits}f}"


def _methods(rows: Sequence[dict[str, Any]]) -> list[str]:
    present = _unique(r["method"] for r in rows)
    return [m for m in METHODS if m in present] + [m for m in present if m not in METHODS]


def _table(rows: Sequence[dict[str, Any]], cell: Any, first: str, base_cell: Any) -> list[str]:
    methods = [m for m in _methods(rows) if m != "nn"]
    head = ["config", "B", first, *methods]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    index = {(r["config"], r["batch"], r["method"]): r for r in rows}
    for config in _unique(r["config"] for r in rows):
        for batch in _unique(r["batch"] for r in rows if r["config"] == config):
            ref = index.get((config, batch, "nn"))
            cells = [config, str(batch), base_cell(ref) if ref else "n/a"]
            for m in methods:
                r = index.get((config, batch, m))
                cells.append("n/a" if r is None or r["error"] else cell(r))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _time_cell(r: dict[str, Any]) -> str:
    return _num(r["time_ratio"])


def _mb(value: float) -> str:
    """Megabytes: one decimal below 10, whole numbers above."""
    return "n/a" if not _ok(value) else (f"{value:.1f}" if value < 10 else f"{value:.0f}")


def _mem_cell(r: dict[str, Any]) -> str:
    text = _mb(r["peak_mb"])
    return text + (f" ({_num(r['mem_ratio'])}x)" if _ok(r["mem_ratio"]) else "")


def _flop_cell(r: dict[str, Any]) -> str:
    return _num(r.get("flop_ratio", math.nan))


def _gflop(r: dict[str, Any]) -> str:
    return _num(r.get("flops", math.nan) / 1e9)


def flop_floors(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per configuration: the non-private step's FLOPs (the floor every method
    pays) at each batch size, and how many FLOPs the cheapest private method adds."""
    lines = []
    for config in _unique(r["config"] for r in rows):
        sub = [r for r in rows if r["config"] == config and _ok(r.get("flops", math.nan))]
        base = [r for r in sub if r["method"] == "nn" and not r["error"]]
        if not base:
            continue
        floors = ", ".join(f"{_gflop(r)} GFLOP at B={r['batch']}" for r in base)
        private = [r for r in sub if r["method"] != "nn" and not r["error"] and _ok(r.get("flop_ratio", math.nan))
                   and not str(r.get("note", "")).startswith("WRONG")]
        best = min(private, key=lambda r: r["flop_ratio"], default=None)
        extra = (f"; the fewest FLOPs of a private step: `{best['method']}`, {_num(best['flop_ratio'])}x "
                 f"(B={best['batch']})") if best else ""
        lines.append(f"- `{config}`: non-private step {floors}{extra}.")
    return lines


def machine_line(rows: Sequence[dict[str, Any]]) -> str:
    r = rows[0]
    opacus = f"opacus {r['opacus']}" if r.get("opacus") else "opacus not installed"
    kind = " (--quick: tiny shapes, 1 repeat; smoke run, not a measurement)" if r.get("quick") else ""
    malloc = f", glibc malloc with `{r['malloc']}`" if r.get("malloc") else ""
    return (f"Machine: {r['cpus']}-CPU Linux box, torch {r['torch']} (CPU), {opacus}, "
            f"`torch.set_num_threads({r['threads']})`{malloc}{kind}.")


def _memory_how(rows: Sequence[dict[str, Any]]) -> str:
    """How the memory column was read: with glibc's mmap threshold held (a run that records
    ``rss_mb``, see :mod:`benchmarks.cli`), or with the allocator as the run found it."""
    if not any(_ok(r.get("rss_mb", math.nan)) for r in rows):
        return ""
    return (", with glibc's mmap threshold held at 128 KiB (every tensor that size or larger its own "
            "mapping, given back when freed), so that the figure is the step's own high-water mark; "
            "with glibc's defaults freed heap gaps stay resident and add more, depending on the order "
            "of allocations (the CSV's `rss_mb`, and a column of the `--details` table)")


def markdown(rows: Sequence[dict[str, Any]], *, plots: Sequence[str | Path] = (), details: bool = False,
             relative_to: str | Path | None = None, link_prefix: str = "") -> str:
    """The results section: machine, methods, per suite a time table and a memory table.

    Args:
        rows: from :func:`load`.
        plots: PNG paths to link (one per suite, named ``*_<suite>.png``).
        details: append the long table with every number (median, min, repeats, errors).
        relative_to: write plot links relative to this folder (else as given).
        link_prefix: prepended to every plot link (e.g. ``benchmarks/results/``).
    """
    if not rows:
        return "No results.\n"
    private = [r for r in rows if r["method"] != "nn" and not r.get("error")]
    paired = _unique(r["config"] for r in private if _ok(r.get("ref_ms", math.nan)))
    unpaired = _unique(r["config"] for r in private if not _ok(r.get("ref_ms", math.nan)))
    how = ""
    if paired:
        how = (", timed in the method's own process, one non-private step after each of its steps "
               "(paired: both under the same load)")
        if unpaired:
            how += (f" for {', '.join(f'`{c}`' for c in paired)}; for {', '.join(f'`{c}`' for c in unpaired)} "
                    "over the non-private cell's own median (an older, unpaired run)")
    out = [machine_line(rows), ""]
    out += [
        "Time: median step time of each method divided by the non-private `torch.nn` step "
        "(forward + backward) on the same batch" + how
        + "; the non-private column is in milliseconds. "
        "Memory: peak resident-set growth of one step over the live model and inputs, in MB, "
        "measured in a fresh process per cell (ratio to the non-private step where that grows by "
        "at least 1 MB)" + _memory_how(rows) + ". "
        "`n/a`: the method does not support the configuration (see below).",
        "",
        "Methods:",
        "",
    ]
    out += [f"- `{m}`: {METHODS.get(m, m)}" for m in _methods(rows)]
    links = {}
    for p in plots:
        stem = Path(p).stem
        link = Path(p).relative_to(relative_to) if relative_to is not None else Path(p)
        links[stem.rsplit("_", 1)[-1]] = link_prefix + link.as_posix()
    for suite in _unique(r["suite"] for r in rows):
        sub = [r for r in rows if r["suite"] == suite]
        out += ["", f"#### {_SUITE_TITLES.get(suite, suite)}", ""]
        out += [f"- `{c}`: {d}" for c, d in _unique((r["config"], r["desc"]) for r in sub)]
        out += ["", "Time, ratio to non-private (lower is better):", ""]
        out += _table(sub, _time_cell, "non-private (ms)", lambda r: _num(r["ms"]))
        out += ["", "Peak memory growth of one step, MB (ratio to non-private):", ""]
        out += _table(sub, _mem_cell, "non-private (MB)", lambda r: _mb(r["peak_mb"]))
        if any(_ok(r.get("flops", math.nan)) and r["method"] != "nn" for r in sub) and suite == "scale":
            out += ["", "FLOPs of one step (`torch.utils.flop_counter.FlopCounterMode`: matrix products, "
                    "convolutions, attention), ratio to non-private; the compiled methods' counted on the "
                    "same program run eagerly. The FLOP floor, per model:", ""]
            out += flop_floors(sub)
            out += [""] + _table(sub, _flop_cell, "non-private (GFLOP)", _gflop)
        compiled = [r for r in sub if _ok(r.get("compile_s", math.nan))]
        if compiled:
            out += ["", "Compile time of the compiled methods (s, once per batch size, in the cell's "
                    "fresh process, before timing): "
                    + ", ".join(f"`{r['method']}` {r['config']} B={r['batch']} {r['compile_s']:.0f}" for r in compiled)
                    + "."]
        if suite in links:
            out += ["", f"![{suite}: time and peak memory against batch size]({links[suite]})"]
    failures = _unique((r["method"], r["config"], r["error"]) for r in rows if r["error"])
    if failures:
        out += ["", "Not supported (`n/a`):", ""]
        out += [f"- `{m}` on {c}: {e[:160]}" for m, c, e in failures]
    notes = _unique((r["method"], r["config"], r["note"]) for r in rows if r.get("note"))
    if notes:
        out += ["", "Notes (the numbers are given, but read them with this):", ""]
        out += [f"- `{m}` on {c}: {n[:300]}" for m, c, n in notes]
    if details:
        out += ["", "#### Every measurement", "",
                "| suite | config | B | method | median (ms) | min (ms) | steps | x time | peak (MB) | x memory "
                "| RSS, glibc defaults (MB) | GFLOP | x FLOPs | compile (s) | others' CPU before / during "
                "| attempts | error |",
                "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            out.append(
                f"| {r['suite']} | {r['config']} | {r['batch']} | {r['method']} | {_num(r['ms'])} | "
                f"{_num(r['min_ms'])} | {r['repeats']} | {_num(r['time_ratio'])} | {_mb(r['peak_mb'])} | "
                f"{_num(r['mem_ratio'])} | {_mb(r.get('rss_mb', math.nan))} | {_gflop(r)} | {_flop_cell(r)} | {_num(r.get('compile_s', math.nan))} | "
                f"{r['busy_before']} / {r.get('busy_during', '')} | {r.get('attempts', '')} | "
                f"{r['error'][:80]} |"
            )
    return "\n".join(out) + "\n"


def plot(rows: Sequence[dict[str, Any]], prefix: str | Path) -> list[Path]:
    """One PNG per suite, ``<prefix>_<suite>.png``: time (top) and peak memory (bottom)
    against batch size, one column per layer or model, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    prefix = Path(prefix)
    methods = _methods(rows)
    style = {m: method_style(m, i) for i, m in enumerate(methods)}
    paths = []
    for suite in _unique(r["suite"] for r in rows):
        sub = [r for r in rows if r["suite"] == suite]
        configs = _unique(r["config"] for r in sub)
        fig, axes = plt.subplots(2, len(configs), figsize=(3.1 * len(configs) + 0.4, 5.6), squeeze=False)
        handles = {}
        for j, config in enumerate(configs):
            for i, (key, label) in enumerate((("ms", "time per step (ms)"), ("peak_mb", "peak RSS growth (MB)"))):
                ax = axes[i][j]
                for m in methods:
                    pts = sorted((r["batch"], r[key]) for r in sub
                                 if r["config"] == config and r["method"] == m and not r["error"] and _ok(r[key]))
                    if pts:
                        (line,) = ax.plot(*zip(*pts), label=m, **style[m])
                        handles.setdefault(m, line)
                ax.set_xscale("log", base=2)
                if key == "ms":
                    ax.set_yscale("log")
                    ax.set_title(config, fontsize=10)
                else:
                    top = max([r[key] for r in sub if r["config"] == config and _ok(r[key])], default=0)
                    if top > 20:  # some steps grow by nothing: a log scale with a linear part at 0
                        ax.set_yscale("symlog", linthresh=1.0)
                    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                    ax.set_ylim(bottom=0)
                    ax.set_xlabel("batch size")
                batches = sorted(_unique(r["batch"] for r in sub if r["config"] == config))
                ax.set_xticks(batches, [str(b) for b in batches])
                ax.minorticks_off()
                ax.tick_params(labelsize=8)
                ax.grid(alpha=0.3)
                if j == 0:
                    ax.set_ylabel(label, fontsize=9)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(7, len(handles)),
                   fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        path = prefix.with_name(f"{prefix.name}_{suite}.png")
        fig.savefig(path, dpi=72)
        plt.close(fig)
        paths.append(path)
    return paths


def markers(name: str = "") -> tuple[str, str]:
    """The begin and end lines of the block ``name`` (``""``: :data:`BEGIN`, :data:`END`)."""
    if not name:
        return BEGIN, END
    return f"<!-- benchmark-results:{name}:begin -->", f"<!-- benchmark-results:{name}:end -->"


def update(path: str | Path, text: str, name: str = "") -> None:
    """Replace the text between the markers of block ``name`` (:func:`markers`) in ``path``
    (appended if absent)."""
    BEGIN, END = markers(name)  # noqa: N806
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + block + rest.split(END, 1)[1]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + block + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("csv", help="a CSV written by python -m benchmarks")
    parser.add_argument("--plots", action="store_true", help="redraw <csv stem>_<suite>.png next to the CSV")
    parser.add_argument("--details", action="store_true", help="add the long table of every measurement")
    parser.add_argument("--update", default=None, metavar="FILE",
                        help="write the Markdown between the benchmark-results markers of FILE")
    parser.add_argument("--marker", default="", metavar="NAME",
                        help="with --update: the block between <!-- benchmark-results:NAME:begin/end --> "
                             "(default: the unnamed block)")
    parser.add_argument("--link-prefix", default=None,
                        help="prefix of plot links (default: the CSV's folder, e.g. benchmarks/results/)")
    args = parser.parse_args(argv)
    csv_path = Path(args.csv)
    rows = load(csv_path)
    prefix = csv_path.with_suffix("")
    plots = plot(rows, prefix) if args.plots else sorted(csv_path.parent.glob(f"{prefix.name}_*.png"))
    link_prefix = args.link_prefix if args.link_prefix is not None else csv_path.parent.as_posix() + "/"
    text = markdown(rows, plots=plots, details=args.details, relative_to=csv_path.parent, link_prefix=link_prefix)
    if args.update:
        update(args.update, text, args.marker)
        print(f"updated {args.update}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
