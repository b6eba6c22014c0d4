"""A ``torch.compile`` route for the whole clipped-sum step.

``compiled_clipped_grad_sum(fn, max_norm)`` returns a function ``(params, *batch) -> (sum,
norms)`` that computes ``vmap(grad(fn))``, the per-example norms, the clip factors and the
clipped sum inside ONE compiled graph. Inductor can then fuse the per-sample gradient
contractions with the clipping, so the ``[B, *shape]`` tensors need not be held all at once.

When it helps: models whose per-sample gradients are large compared with the activations
(big dense layers, small sequence lengths), repeated many times with the same shapes
(compilation takes seconds to tens of seconds, and every new batch size recompiles unless
``dynamic=True``), possibly on an accelerator where Inductor's generated kernels are fast
(not measured: no GPU was available to this project). On the
2-core CPU of ``python -m benchmarks`` it did NOT help: 2-22x the non-private step (MLP,
digits CNN, Embedding+DPLSTM, Transformer) against 0.8-3.3x for the eager
``clipped_grad_sum(method="fast")``, because the graph still materialises the per-sample
gradients and Inductor's CPU code for them is slower than MKL. Benchmark both
(``python -m benchmarks --methods nn,clip-fast,clip-compiled``) before choosing.

Validation that cannot run inside a graph stays outside: the batch is checked before the
call, and NaN/Inf norms raise ``ValueError`` after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch.func import grad, vmap

from psgfunc._tree import batch_size, row_sq_norms
from psgfunc.dp._clip import _check_positive_finite

__all__ = ["compiled_clipped_grad_sum"]


def compiled_clipped_grad_sum(
    fn: Callable[..., torch.Tensor],
    max_norm: float,
    **compile_kwargs: Any,
) -> Callable[..., tuple[Any, torch.Tensor]]:
    """Compile ``sum_b clip(grad fn(params, *example_b))`` into one graph.

    Args:
        fn: ``fn(params, *example) -> 0-dim loss`` of ONE example, as for
            :func:`psgfunc.per_sample_grads`.
        max_norm: clipping bound ``C > 0`` (one float).
        **compile_kwargs: passed to ``torch.compile`` (e.g. ``dynamic=True``,
            ``mode="max-autotune"``).

    Returns:
        ``step(params, *batch) -> (clipped_sum, norms [B])``, equal to
        ``psgfunc.dp.clipped_grad_sum(fn, params, *batch, max_norm=C)`` up to float rounding.

    Raises:
        ValueError: (from ``step``) mismatched batch sizes, an empty batch, or a non-finite
            per-example norm.
    """
    c = _check_positive_finite(max_norm, "compiled_clipped_grad_sum: max_norm")

    def graph(params: Any, *batch: Any) -> tuple[Any, torch.Tensor]:
        in_dims = tuple(optree.tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, b) for b in batch)
        grads = vmap(grad(fn), in_dims=(None, *in_dims))(params, *batch)
        leaves, spec = optree.tree_flatten(grads)
        sq = None
        for g in leaves:
            s = row_sq_norms(g)
            sq = s if sq is None else sq + s
        norms = sq.sqrt()
        factor = c / norms.clamp_min(c)
        sums = [torch.tensordot(factor.to(g.dtype), g, dims=1) for g in leaves]
        return optree.tree_unflatten(spec, sums), norms

    compiled = torch.compile(graph, **compile_kwargs)

    def step(params: Any, *batch: Any) -> tuple[Any, torch.Tensor]:
        if batch_size(*batch) == 0:
            raise ValueError(
                "compiled_clipped_grad_sum: the batch is empty; use clipped_grad_sum for B = 0 "
                "(a pure-noise step) rather than compiling a graph for it"
            )
        params = optree.tree_map(lambda p: p.detach(), params)
        summed, norms = compiled(params, *batch)
        bad = ~torch.isfinite(norms)
        if bool(bad.any()):
            raise ValueError(
                f"compiled_clipped_grad_sum: {int(bad.sum())} of {norms.numel()} examples have a "
                f"NaN or Inf gradient (batch indices {bad.nonzero().flatten().tolist()[:10]}); fix "
                "the loss or inputs before clipping"
            )
        return summed, norms

    return step
