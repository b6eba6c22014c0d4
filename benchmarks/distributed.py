"""``python -m benchmarks.distributed``: DP-SGD steps per second on 1 and 2 processes.

Commands::

    python -m benchmarks.distributed                  # both models, 1 and 2 processes
    python -m benchmarks.distributed --quick          # tiny run (seconds), a smoke test

Each row trains one model with ``DPOptimizer(fast_clipping=True, distributed=True)`` on a
fixed global batch (``--batch``, split evenly over the ranks: every step is full, so the
rows compare the same work) in ``world`` processes started with the 'spawn' method on
127.0.0.1 (gloo), each with ``threads`` torch threads: ``(1 process, 1 thread)``,
``(1 process, 2 threads)`` and ``(2 processes, 1 thread each)``. Time: the median over
``--repeats`` blocks of ``--steps`` steps after ``--warmup`` steps, rank 0's clock between
barriers. Communication: the clipped sum is ONE all-reduce of the trainable parameters'
size per step (``allreduce_mb``; a ring all-reduce moves ``2 (world-1)/world`` of it per
rank); ``allreduce_ms`` times that all-reduce alone (median of 20), plus one 8-byte seed
broadcast per step with ``secure=True`` (not used here).

Models: the digits CNN of ``examples/dp_cnn_digits.py`` (8x8 images, 6 k parameters) and an
MLP 784-1024-1024-10 (1.9 M parameters, 7.6 MB all-reduced per step).

Output: a table on stdout and ``<out>/distributed.csv`` (with ``busy_before``, the fraction of
the cores other processes kept busy just before the row, and the 1-minute load average).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import psgfunc.dp as dp
import psgfunc.nn as pnn
from benchmarks.layers import cpu_busy

FIELDS = ["model", "params", "world", "threads", "global_batch", "rank_batch", "steps_per_s",
          "ms_per_step", "allreduce_mb", "allreduce_ms", "busy_before", "load_1min", "repeats", "steps", "torch", "cpus",
          "quick"]


def _model(name: str, batch: int) -> tuple[nn.Module, tuple[int, ...], int]:
    """The model (psgfunc shells), its input shape and its number of classes."""
    if name == "cnn":
        net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(128, 10),
        )
        shape = (1, 8, 8)
    else:
        net = nn.Sequential(nn.Linear(784, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 10))
        shape = (784,)
    return pnn.expand_weights(net, max_batch_size=batch), shape, 10


def _rank(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        per_rank = cfg["batch"] // world
        torch.manual_seed(0)
        model, shape, classes = _model(cfg["model"], per_rank)
        opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), max_norm=1.0, noise_multiplier=1.0,
                             expected_batch_size=cfg["batch"], seed=0, fast_clipping=True, distributed=True)
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(per_rank, *shape, generator=g), torch.randint(0, classes, (per_rank,), generator=g)

        def step() -> None:
            F.cross_entropy(model(x), y, reduction="sum").backward()
            opt.step()
            opt.zero_grad()

        for _ in range(cfg["warmup"]):
            step()
        times = []
        for _ in range(cfg["repeats"]):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(cfg["steps"]):
                step()
            dist.barrier()
            times.append((time.perf_counter() - start) / cfg["steps"])
        params = [p for p in model.parameters() if p.requires_grad]
        flat = torch.zeros(sum(p.numel() for p in params))
        comm = []
        for _ in range(20):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(flat)
            comm.append(time.perf_counter() - start)
        if rank == 0:
            torch.save({"step_s": statistics.median(times), "allreduce_s": statistics.median(comm),
                        "params": flat.numel(), "bytes": flat.numel() * flat.element_size(),
                        "rank_batch": per_rank}, Path(out) / "result.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_row(model: str, world: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = {"model": model, "threads": threads, "batch": args.batch, "warmup": args.warmup,
           "steps": args.steps, "repeats": args.repeats}
    busy = cpu_busy()  # other processes on the machine make every row slower
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(_rank, args=(world, _free_port(), cfg, tmp), nprocs=world,
                                              join=True, start_method="spawn")
        res = torch.load(Path(tmp) / "result.pt")
    return {
        "model": model, "params": res["params"], "world": world, "threads": threads,
        "global_batch": args.batch, "rank_batch": res["rank_batch"],
        "steps_per_s": 1.0 / res["step_s"], "ms_per_step": 1e3 * res["step_s"],
        "allreduce_mb": res["bytes"] / 2**20, "allreduce_ms": 1e3 * res["allreduce_s"] if world > 1 else 0.0,
        "busy_before": busy, "load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "repeats": args.repeats, "steps": args.steps, "torch": torch.__version__, "cpus": os.cpu_count(),
        "quick": int(args.quick),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated: cnn, mlp (default %(default)s)")
    parser.add_argument("--batch", type=int, default=256, help="global batch per step (default %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks; the median is kept (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default %(default)s)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="batch 8, 2 steps, 1 repeat (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.repeats, args.warmup = 8, 2, 1, 1
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    rows = []
    print(f"{'model':<6}{'params':>10}{'procs':>6}{'threads':>8}{'steps/s':>9}{'ms/step':>9}{'allreduce MB':>13}{'ms':>7}")
    for model in args.models.split(","):
        for world, threads in ((1, 1), (1, 2), (2, 1)):
            r = run_row(model, world, threads, args)
            rows.append(r)
            print(f"{r['model']:<6}{r['params']:>10}{r['world']:>6}{r['threads']:>8}{r['steps_per_s']:>9.1f}"
                  f"{r['ms_per_step']:>9.1f}{r['allreduce_mb']:>13.3f}{r['allreduce_ms']:>7.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("distributed_quick.csv" if args.quick else "distributed.csv")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
