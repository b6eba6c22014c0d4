"""The digits DP-SGD job of ``dp_cnn_digits.py``, its model and data split over processes.

Command:  torchrun --nproc_per_node 2 examples/dp_cnn_digits_ddp.py
          (gloo on CPU; with GPUs the backend is nccl and rank r uses cuda:LOCAL_RANK)
Expected: the single-process run's numbers: about 92% test accuracy at epsilon 1.83 (delta
          1e-5; sigma 5.3, 30 epochs of expected batch 256); rank 0 prints one line per epoch
          and a summary line; exits 0. Run as plain ``python examples/dp_cnn_digits_ddp.py``
          it forms a one-process group and gives the same numbers.

Each process ("rank") builds the same CNN (rank 0's weights are broadcast when the optimizer
is built) and loads, at every step, its own disjoint shard of one Poisson sample of the
training set (``PoissonDataLoader(..., distributed=True)``: rank r takes the sampled indices
``i`` with ``i % world_size == r``). It clips its own examples' gradients;
``DPOptimizer(..., distributed=True)`` all-reduces the clipped sums (one all-reduce of the
parameters' size per step), adds the noise ONCE, from a generator seeded identically on
every rank, divides by the GLOBAL expected batch size, and every rank applies the same
update. The privacy analysis is therefore exactly the single-process one on the union of the
shards: same sample rate, same number of steps, same sigma, same epsilon. With the same
``--seed`` the union of the shards is the single-process example's batch and the noise is
its noise, so the two runs agree up to float rounding (the sum is added in another order).

Do not wrap the model in ``torch.nn.parallel.DistributedDataParallel``: it would all-reduce
the raw, unclipped gradients (``DPOptimizer`` refuses such a model).

Flags are those of ``dp_cnn_digits.py`` (``--help``), plus ``--backend``; ``--quick`` runs
one epoch of 3 steps (a smoke test).
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence
from typing import Any

import _digits  # examples/_digits.py, next to this script
import dp_cnn_digits  # the model (examples/dp_cnn_digits.py)
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import psgfunc.dp as dp


def _init(backend: str | None) -> tuple[bool, torch.device]:
    """Join the process group torchrun describes (or a one-process one); returns
    ``(whether this call created it, this rank's device)``."""
    created = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python ...`: a group of one, on loopback
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29512"),
                              RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
        created = True
    if "nccl" in str(dist.get_backend()).lower():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return created, device


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns rank-local metrics (``test_acc``, ``epsilon``, ``steps``,
    ``sigma``, ``world_size``, ``shard_examples`` and the final ``params``)."""
    parser = _digits.make_parser(
        __doc__, epochs=30, sigma=5.3, max_norm=1.0, batch_size=256, lr=0.1, momentum=0.9
    )
    parser.add_argument("--backend", default=None, help="gloo or nccl (default: nccl with GPUs, else gloo)")
    args = parser.parse_args(argv)
    created, device = _init(args.backend)
    try:
        return _train(args, device)
    finally:
        if created:
            dist.destroy_process_group()


def _train(args: Any, device: torch.device) -> dict[str, Any]:
    start = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    data = _digits.load_split()
    n = len(data.y_train)
    sample_rate = args.batch_size / n
    if args.quick:
        epochs, steps_per_epoch = 1, _digits.QUICK_STEPS
    else:
        epochs, steps_per_epoch = args.epochs, max(1, round(1 / sample_rate))
    total = epochs * steps_per_epoch
    if args.target_epsilon is not None:
        sigma = _digits.noise_multiplier_for(args.target_epsilon, sample_rate, total, args.delta)
    else:
        sigma = args.sigma if args.sigma is not None else args.default_sigma
    say = print if rank == 0 else (lambda *a, **k: None)
    say(
        f"dp_cnn_digits_ddp: {world} process(es), backend {dist.get_backend()}; {n} train digits, "
        f"{epochs} epoch(s) x {steps_per_epoch} steps, global expected batch {args.batch_size:g} "
        f"(sample rate {sample_rate:.4f}), sigma {sigma:.3f}, max_norm {args.max_norm:g}"
    )
    torch.manual_seed(args.seed)
    model = dp_cnn_digits.build(n).to(device)  # a Poisson shard never exceeds n examples
    inner = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    optimizer = dp.DPOptimizer(
        inner,
        max_norm=args.max_norm,
        noise_multiplier=sigma,
        expected_batch_size=args.batch_size,  # GLOBAL: all ranks together
        seed=args.seed,  # rank 0's seed is used everywhere; secure=True (no seed) for releases
        fast_clipping=args.fast_clipping,
        distributed=True,
    )
    loader = dp.PoissonDataLoader(
        TensorDataset(data.x_train, data.y_train),
        sample_rate,
        steps=steps_per_epoch,
        generator=torch.Generator().manual_seed(args.seed),  # secure=True for releases
        distributed=True,
    )
    steps = seen = 0
    eps = float("nan")
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            if len(y):  # an empty shard still steps: the sum and the noise are collective
                x, y = x.to(device), y.to(device)
                F.cross_entropy(model(x), y, reduction="sum").backward()
                seen += len(y)
            optimizer.step()
            steps += 1
        eps = _digits.epsilon(sigma, sample_rate, steps, args.delta)
        test_acc = _digits.accuracy(model, data.x_test.to(device), data.y_test.to(device))
        say(f"epoch {epoch:3d}/{epochs}: test acc {test_acc:.3f}  epsilon {eps:.2f}")
    test_acc = _digits.accuracy(model, data.x_test.to(device), data.y_test.to(device))
    say(
        f"\ndp_cnn_digits_ddp: DP-SGD test accuracy {test_acc:.1%} at epsilon {eps:.2f} (delta "
        f"{args.delta:g}, sigma {sigma:.3f}, {steps} steps) on {world} process(es); "
        f"{time.perf_counter() - start:.0f} s"
    )
    return {
        "test_acc": test_acc,
        "epsilon": eps,
        "steps": steps,
        "sigma": sigma,
        "world_size": world,
        "shard_examples": seen,
        "params": [p.detach().cpu().clone() for p in model.parameters()],
    }


if __name__ == "__main__":
    main()
