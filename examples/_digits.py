"""Shared parts of the digits DP-SGD examples: data, flags, training loop, privacy report.

Not an example itself: ``dp_cnn_digits.py`` and ``dp_lstm_digits.py`` each define a model
builder and call :func:`run`, which

1. loads scikit-learn's bundled digits (1797 8x8 images, no download), centres the pixels
   and splits them 80/20, stratified, with a fixed seed (the same split whatever ``--seed``
   says);
2. picks the noise multiplier (``--sigma``, or ``--target-epsilon`` through
   :func:`psgfunc.dp.noise_multiplier_for`);
3. trains the model with DP-SGD: Poisson-sampled batches (:class:`psgfunc.dp.PoissonDataLoader`)
   and :class:`psgfunc.dp.DPOptimizer` around ``torch.optim.SGD``, printing per epoch the
   train and test accuracy and the epsilon spent so far (:func:`psgfunc.dp.epsilon`);
4. trains the same model, from the same initial weights, without privacy on the same
   Poisson batches (same epochs, batch size and learning rate) for comparison;
5. prints a comparison table and one summary line, and returns the metrics as a dict.

A model builder is ``build(max_batch_size) -> nn.Module`` taking a batch ``[B, 8, 8]`` of
images to logits ``[B, 10]``: ``max_batch_size`` is an int for the private model (whose
parameters must get ``.grad_sample``) and ``None`` for the non-private one.

Accuracies on the training set are reported for diagnosis only: unlike the model itself,
they are not differentially private releases.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

import psgfunc.dp as dp

SPLIT_SEED = 0  # the train/test split never changes with --seed
TEST_FRACTION = 0.2
QUICK_STEPS = 3  # --quick: one epoch of this many steps per run (for tests)

Builder = Callable[[int | None], nn.Module]


@dataclass(frozen=True)
class Digits:
    """The split: images ``[N, 8, 8]`` float32 in ``[-0.5, 0.5]``, labels ``[N]`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_split(test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> Digits:
    """scikit-learn's digits, pixels (0 to 16) scaled to ``[-0.5, 0.5]``, split stratified by label.

    Centring the pixels (rather than ``[0, 1]``) is worth about one point of DP test accuracy.
    """
    data = load_digits()
    x = torch.tensor(data.images / 16.0 - 0.5, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed, stratify=y.numpy()
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def make_parser(
    description: str | None,
    *,
    epochs: int,
    sigma: float,
    max_norm: float,
    batch_size: float,
    lr: float,
    momentum: float = 0.9,
    optimizer: str = "sgd",
) -> argparse.ArgumentParser:
    """The flags both examples share, with each example's tuned defaults."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=epochs, help="expected passes over the data (default %(default)s)")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--sigma", type=float, default=None, help=f"noise multiplier (default {sigma})")
    noise.add_argument(
        "--target-epsilon",
        type=float,
        default=None,
        help="choose sigma so that the whole run spends this epsilon (instead of --sigma)",
    )
    parser.add_argument("--delta", type=float, default=1e-5, help="delta of (epsilon, delta)-DP (default %(default)s)")
    parser.add_argument("--max-norm", type=float, default=max_norm, help="per-example clipping bound C (default %(default)s)")
    parser.add_argument(
        "--batch-size",
        type=float,
        default=batch_size,
        help="expected Poisson batch size; sample rate = batch size / training examples (default %(default)s)",
    )
    parser.add_argument(
        "--optimizer", choices=("sgd", "adam"), default=optimizer, help="inner optimizer (default %(default)s)"
    )
    parser.add_argument("--lr", type=float, default=lr, help="learning rate (default %(default)s)")
    parser.add_argument("--momentum", type=float, default=momentum, help="SGD momentum (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights, batches and noise (default %(default)s)")
    parser.add_argument(
        "--fast-clipping",
        action="store_true",
        help="DPOptimizer(fast_clipping=True): per-example norms without per-sample gradients",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default %(default)s: these models are too small to gain from more)",
    )
    parser.add_argument("--quick", action="store_true", help=f"one epoch of {QUICK_STEPS} steps per run (smoke test)")
    parser.set_defaults(default_sigma=sigma)
    return parser


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence dp_accounting's RDP convergence warnings (orders it drops, harmlessly)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon spent after ``steps`` DP-SGD steps (the default PLD accountant, Poisson sampling)."""
    with _quiet_absl():
        return dp.epsilon(sigma, sample_rate, steps, delta)


def noise_multiplier_for(target: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest sigma whose run of ``steps`` steps spends at most ``target``."""
    with _quiet_absl():
        return dp.noise_multiplier_for(target, sample_rate, steps, delta)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y`` (eval mode, one batch)."""
    was_training = model.training
    model.eval()
    correct = (model(x).argmax(dim=-1) == y).float().mean().item()
    model.train(was_training)
    return correct


def train(
    build: Builder,
    data: Digits,
    args: argparse.Namespace,
    *,
    sigma: float | None,
    steps_per_epoch: int,
    epochs: int,
    desc: str,
) -> dict[str, Any]:
    """Train one model, DP-SGD if ``sigma`` is a number, plainly if it is None.

    Both runs start from the same weights (``torch.manual_seed(args.seed)`` before
    ``build``) and draw the same Poisson batches (a generator seeded with ``args.seed``).
    """
    private = sigma is not None
    n = len(data.y_train)
    sample_rate = args.batch_size / n
    torch.manual_seed(args.seed)
    # A Poisson batch has no fixed size; the whole training set is a bound it never exceeds.
    model = build(n if private else None)
    optimizer: torch.optim.Optimizer
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    if private:
        optimizer = dp.DPOptimizer(
            optimizer,
            max_norm=args.max_norm,
            noise_multiplier=sigma,
            expected_batch_size=args.batch_size,
            seed=args.seed,  # reproducible noise; use secure=True (and no seed) for real releases
            fast_clipping=args.fast_clipping,
        )
    loader = dp.PoissonDataLoader(
        TensorDataset(data.x_train, data.y_train),
        sample_rate,
        steps=steps_per_epoch,
        generator=torch.Generator().manual_seed(args.seed),
    )
    history = []
    steps = empty = 0
    start = time.perf_counter()
    with tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", dynamic_ncols=True) as bar:
        for epoch in range(1, epochs + 1):
            model.train()
            for x, y in loader:
                optimizer.zero_grad()
                if len(y) == 0:
                    # An empty Poisson batch still is a step of the mechanism: DPOptimizer.step()
                    # with no per-sample gradients applies pure noise, as the accountant
                    # assumes. (A non-private run simply has nothing to learn from.)
                    empty += 1
                    if private:
                        optimizer.step()
                elif private:
                    # Sum, not mean: grad_sample must hold each example's own gradient, which
                    # DPOptimizer clips to max_norm and divides by the EXPECTED batch size.
                    F.cross_entropy(model(x), y, reduction="sum").backward()
                    optimizer.step()
                else:
                    F.cross_entropy(model(x), y).backward()
                    optimizer.step()
                steps += 1
                bar.update()
            row = {
                "epoch": epoch,
                "steps": steps,
                "train_acc": accuracy(model, data.x_train, data.y_train),
                "test_acc": accuracy(model, data.x_test, data.y_test),
                "epsilon": epsilon(sigma, sample_rate, steps, args.delta) if private else math.inf,
            }
            history.append(row)
            bar.write(
                f"{desc} epoch {epoch:3d}/{epochs}: train acc {row['train_acc']:.3f}  "
                f"test acc {row['test_acc']:.3f}  epsilon {row['epsilon']:.2f}"
            )
            bar.set_postfix(test_acc=f"{row['test_acc']:.3f}", eps=f"{row['epsilon']:.2f}")
    last = history[-1]
    return {
        "train_acc": last["train_acc"],
        "test_acc": last["test_acc"],
        "epsilon": last["epsilon"],
        "steps": steps,
        "empty_batches": empty,
        "seconds": time.perf_counter() - start,
        "history": history,
        "model": model,
    }


def run(
    name: str,
    build: Builder,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Parse ``argv``, train privately and non-privately, print the comparison, return metrics.

    Returns:
        ``{"dp": {...}, "non_private": {...}, "sigma", "sample_rate", "delta", "seconds"}``
        where each run's dict holds ``train_acc``, ``test_acc``, ``epsilon`` (``inf`` for the
        non-private run), ``steps``, ``empty_batches``, ``seconds``, ``history`` (one dict per
        epoch) and the trained ``model``.
    """
    start = time.perf_counter()
    args = parser.parse_args(argv)
    for flag in ("batch_size", "max_norm", "lr", "delta"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    for flag in ("epochs", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    data = load_split()
    n = len(data.y_train)
    if args.batch_size > n:
        parser.error(f"--batch-size must be at most the {n} training examples, got {args.batch_size}")
    sample_rate = args.batch_size / n
    if args.quick:
        epochs, steps_per_epoch = 1, QUICK_STEPS
    else:
        epochs, steps_per_epoch = args.epochs, max(1, round(1 / sample_rate))
    total_steps = epochs * steps_per_epoch
    if args.target_epsilon is not None:
        sigma = noise_multiplier_for(args.target_epsilon, sample_rate, total_steps, args.delta)
    else:
        sigma = args.sigma if args.sigma is not None else args.default_sigma
    if not sigma > 0:
        parser.error(f"--sigma must be > 0 (sigma = 0 gives no privacy), got {sigma}")
    print(
        f"{name}: {n} train / {len(data.y_test)} test digits; {epochs} epoch(s) x "
        f"{steps_per_epoch} steps, expected batch {args.batch_size:g} (sample rate "
        f"{sample_rate:.4f}), sigma {sigma:.3f}, max_norm {args.max_norm:g}, lr {args.lr:g}, "
        f"delta {args.delta:g}{', fast clipping' if args.fast_clipping else ''}"
    )
    common = dict(steps_per_epoch=steps_per_epoch, epochs=epochs)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        private = train(build, data, args, sigma=sigma, desc="DP-SGD", **common)
        plain = train(build, data, args, sigma=None, desc="non-private", **common)
    finally:
        torch.set_num_threads(threads)

    print(f"\n{'run':<12}{'train acc':>10}{'test acc':>10}{'epsilon':>9}{'seconds':>9}")
    for label, r in (("DP-SGD", private), ("non-private", plain)):
        print(f"{label:<12}{r['train_acc']:>10.3f}{r['test_acc']:>10.3f}{r['epsilon']:>9.2f}{r['seconds']:>9.1f}")
    seconds = time.perf_counter() - start
    print(
        f"\n{name}: DP-SGD test accuracy {private['test_acc']:.1%} at epsilon "
        f"{private['epsilon']:.2f} (delta {args.delta:g}, sigma {sigma:.3f}, {private['steps']} "
        f"steps); non-private {plain['test_acc']:.1%}; {seconds:.0f} s"
    )
    return {
        "dp": private,
        "non_private": plain,
        "sigma": sigma,
        "sample_rate": sample_rate,
        "delta": args.delta,
        "seconds": seconds,
    }
