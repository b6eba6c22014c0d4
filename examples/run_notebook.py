"""Execute the research notebook headless, writing the executed copy elsewhere by default.

Commands::

    python examples/run_notebook.py                  # full sizes (~90 s), writes
                                                     # examples/notebooks/vmap_vs_expanded.executed.ipynb
    python examples/run_notebook.py --small          # toy sizes in seconds (PSGFUNC_NOTEBOOK_SMALL=1)
    python examples/run_notebook.py --output out.ipynb
    python examples/run_notebook.py --in-place       # rewrite the committed notebook (maintainers)

The default output, ``<notebook>.executed.ipynb`` next to the notebook, is git-ignored, so a
run leaves the committed notebook (and ``git status``) untouched. Needs nbformat, nbclient
and ipykernel.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parent / "notebooks" / "vmap_vs_expanded.ipynb"


def default_output(notebook: Path) -> Path:
    """``<stem>.executed.ipynb`` next to ``notebook`` (the pattern is in .gitignore)."""
    return notebook.with_name(f"{notebook.stem}.executed.ipynb")


def execute(notebook: Path, output: Path, *, small: bool = False, timeout: int = 900):
    """Runs ``notebook`` top to bottom in its own folder and writes the result to ``output``.

    Returns the executed notebook (an ``nbformat`` node). ``small`` sets
    ``PSGFUNC_NOTEBOOK_SMALL=1`` for the kernel (toy sizes). Raises nbclient's
    ``CellExecutionError`` (with the cell and traceback) if a cell fails; nothing is
    written then.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    previous = os.environ.get("PSGFUNC_NOTEBOOK_SMALL")
    if small:
        os.environ["PSGFUNC_NOTEBOOK_SMALL"] = "1"  # the kernel inherits the environment
    try:
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(notebook.parent)}},
        )
        client.execute()
    finally:
        if small:
            if previous is None:
                os.environ.pop("PSGFUNC_NOTEBOOK_SMALL", None)
            else:
                os.environ["PSGFUNC_NOTEBOOK_SMALL"] = previous
    nbformat.write(nb, output)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", type=Path, default=NOTEBOOK,
                        help="the notebook to run (default: %(default)s)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--output", "-o", type=Path, default=None,
                       help="where to write the executed notebook (default: <notebook>.executed.ipynb)")
    where.add_argument("--in-place", action="store_true", help="overwrite the notebook itself")
    parser.add_argument("--small", action="store_true", help="toy sizes (PSGFUNC_NOTEBOOK_SMALL=1)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (default: %(default)s)")
    args = parser.parse_args(argv)
    output = args.notebook if args.in_place else (args.output or default_output(args.notebook))
    execute(args.notebook, output, small=args.small, timeout=args.timeout)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
