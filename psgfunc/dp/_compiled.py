"""A ``torch.compile`` route for the whole clipped-sum step.

``compiled_clipped_grad_sum(fn, max_norm)`` returns a function ``(params, *batch) -> (sum,
norms)`` that runs the forward, the backward, the per-example norms, the clip factors and the
clipped sum inside ONE compiled graph.

``method="fast"`` (what ``"auto"`` picks) compiles fast clipping: psgfunc layers tap their
outputs (:mod:`psgfunc.per_sample._tap`: a zero tensor added to each layer output, whose
per-example gradient is the layer's output gradient), so the graph holds layer inputs and
output gradients, never a ``[B, *shape]`` gradient of a psgfunc layer's params, and the
norms and sums are the eager fast path's formulas (Gram or materialised per layer, one
contraction per clipped sum). Linear, conv1d/2d/3d, embedding, layer_norm and lstm (one
example ``[T, D]`` without ``lengths``: the tap sits on the gate pre-activations) are tapped;
params of other calls (``lstm`` with ``lengths``, ``lstm_cell``, plain torch ops) are
differentiated per example inside the graph, with a warning. Which calls are tapped is planned by one eager run
of ``fn`` on the first example, per input signature (shapes, dtypes, structure): each new
signature plans and compiles again. The batch size is not part of the plan, but each new
batch size compiles again (``vmap`` traces with a concrete size): with Poisson sampling
expect one compilation per distinct batch size (the graphs are kept, and sizes near the
expected one recur), and prefer the eager :func:`clipped_grad_sum` where compilation is slow
(seconds for the MLP and the digits CNN here, about two minutes for the Embedding+LSTM
model).

``method="materialize"`` compiles ``vmap(grad(fn))``, the norms and the clipped sum; Inductor
may fuse the per-sample gradients with the clipping, but on CPU the graph still materialises
them.

When it helps (``python -m benchmarks``, 2-core CPU, torch 2.13, ratios to the EAGER
non-private step): compiled fast clipping removes the per-layer Python and vmap dispatch of
the eager step, which dominates small models: MLP 0.5-1.4x (eager ``clipped_grad_sum``
1.4-2.2x), digits CNN 1.2-1.7x (eager 2.2-2.8x), Embedding+DPLSTM 1.2-1.6x (eager 1.5-3.0x),
a transformer block 1.0-1.6x (eager 1.2-2.8x). Compilation takes seconds (MLP, CNN) to
about two minutes (the LSTM's loop unrolls into the graph) per batch size, so it pays for
many steps. ``method="materialize"`` ran 2.3-37x the non-private step. Benchmark before
choosing (``python -m benchmarks --suite models --methods nn,clip-fast,clip-fast-compiled``).

Validation that cannot run inside a graph stays outside: the batch is checked before the
call, and NaN/Inf norms raise ``ValueError`` after it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import optree
import torch
from torch.func import grad, vmap

from psgfunc._tree import batch_size
from psgfunc.dp._clip import _check_positive_finite
from psgfunc.per_sample._api import _prepare
from psgfunc.per_sample._kinds import _acc, _up, certified_norm, dense_bound
from psgfunc.per_sample._tap import discover, tap_pieces

_METHODS = ("auto", "fast", "materialize")

__all__ = ["compiled_clipped_grad_sum"]


def compiled_clipped_grad_sum(
    fn: Callable[..., torch.Tensor],
    max_norm: float,
    *,
    method: str = "auto",
    **compile_kwargs: Any,
) -> Callable[..., tuple[Any, torch.Tensor]]:
    """Compile ``sum_b clip(grad fn(params, *example_b))`` into one graph.

    Args:
        fn: ``fn(params, *example) -> 0-dim loss`` of ONE example, as for
            :func:`psgfunc.per_sample_grads`. Random ops draw independently per example
            (vmap ``randomness="different"``, as :func:`clipped_grad_sum`).
        max_norm: clipping bound ``C > 0`` (one float).
        method: ``"fast"``: fast clipping in the graph (psgfunc layers' per-sample gradients
            are never built; see the module docstring). ``"materialize"``: ``vmap(grad)``,
            clip and sum. ``"auto"``: ``"fast"``.
        **compile_kwargs: passed to ``torch.compile`` (e.g. ``dynamic=False``,
            ``mode="max-autotune"``, ``backend="eager"`` to check tracing without Inductor).

    ``method="fast"`` plans each input signature once (which layer calls are tapped, which
    leaves some other op also uses), so ``fn`` must make the same psgfunc layer calls with the
    same shapes on every call of that signature; a pass that does not follows no plan and
    raises ValueError, and a pass that swaps which params a layer uses is followed (the
    compiler retraces on the changed Python state and the pieces come from that trace). If
    ``fn`` may start using a params leaf in a plain torch op that it did not use that way when
    planned, build a new step.

    Returns:
        ``step(params, *batch) -> (clipped_sum, norms [B])``, equal to
        ``psgfunc.dp.clipped_grad_sum(fn, params, *batch, max_norm=C)`` up to float rounding.

    Raises:
        ValueError: an unknown ``method`` or invalid ``max_norm``; (from ``step``) mismatched
            batch sizes, an empty batch, or a non-finite per-example norm.
    """
    if method not in _METHODS:
        raise ValueError(f"compiled_clipped_grad_sum: unknown method {method!r}; use one of {_METHODS}")
    c = _check_positive_finite(max_norm, "compiled_clipped_grad_sum: max_norm")
    if method != "materialize":
        return _fast_step(fn, c, compile_kwargs)

    def graph(params: Any, *batch: Any) -> tuple[Any, torch.Tensor]:
        in_dims = tuple(optree.tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, b) for b in batch)
        grads = vmap(grad(fn), in_dims=(None, *in_dims))(params, *batch)
        leaves, spec = optree.tree_flatten(grads)
        norms = certified_norm([_Dense(g) for g in leaves])
        factor = c / norms.clamp_min(c)
        sums = [(factor.to(_acc(g.dtype)) @ _up(g.reshape(g.shape[0], -1))).to(g.dtype).reshape(g.shape[1:]) for g in leaves]
        return optree.tree_unflatten(spec, sums), norms.to(_acc(leaves[0].dtype))

    compiled = torch.compile(graph, **compile_kwargs)

    def step(params: Any, *batch: Any) -> tuple[Any, torch.Tensor]:
        if batch_size(*batch) == 0:
            raise _empty_error()
        params = optree.tree_map(lambda p: p.detach(), params)
        summed, norms = compiled(params, *batch)
        return summed, _check_finite(norms)

    return step


class _Dense:
    """A materialised ``[B, *shape]`` leaf as :func:`certified_norm` reads it."""

    def __init__(self, g: torch.Tensor):
        self.bound, self.dtype = dense_bound(g), g.dtype


def _empty_error() -> ValueError:
    return ValueError(
        "compiled_clipped_grad_sum: the batch is empty; use clipped_grad_sum for B = 0 "
        "(a pure-noise step) rather than compiling a graph for it"
    )


def _check_finite(norms: torch.Tensor) -> torch.Tensor:
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        raise ValueError(
            f"compiled_clipped_grad_sum: {int(bad.sum())} of {norms.numel()} examples have a "
            f"NaN or Inf gradient (batch indices {bad.nonzero().flatten().tolist()[:10]}); fix "
            "the loss or inputs before clipping"
        )
    return norms


def _signature(prep: Any) -> tuple[Any, ...]:
    """What a plan depends on: structure, per-example shapes, dtypes, constants (not the
    batch size: one plan serves every batch size)."""

    def leaf(t: Any, batched: bool) -> Any:
        if isinstance(t, torch.Tensor):
            return (tuple(t.shape[1:] if batched else t.shape), t.dtype, t.device)
        try:
            hash(t)
            return ("value", t)
        except TypeError:
            return ("id", id(t))

    params = tuple(leaf(t, False) for t in prep.p_leaves)
    batch = tuple(leaf(t, d == 0) for t, d in zip(prep.b_leaves, prep.b_dims))
    return (prep.p_spec, params, prep.b_spec, batch)


def _fast_step(fn: Callable[..., torch.Tensor], c: float, compile_kwargs: dict[str, Any]) -> Callable[..., Any]:
    """``step`` of ``method="fast"``: one plan per input signature, and one compiled graph
    per signature and batch size (``vmap`` traces with a concrete batch size; a compiled
    function of its own per size also keeps clear of the compiler's recompile limit)."""
    plans: dict[Any, Any] = {}
    graphs: dict[Any, Callable[..., Any]] = {}

    def plan_for(prep: Any, key: Any) -> Any:
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = discover(prep)
            if plan.materialized:
                warnings.warn(
                    f"psgfunc fast clipping (compiled): {len(plan.materialized)} of "
                    f"{len(prep.p_leaves)} parameter leaves are used by functions without a tap "
                    "(psgfunc.functional.linear, conv*, embedding, layer_norm and lstm without "
                    "lengths have one), so their per-sample gradients are materialised in the graph",
                    stacklevel=4,
                )
        return plan

    def build(plan: Any) -> Callable[..., Any]:
        def graph(params: Any, *batch: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
            # flattened inside: the compiler traces optree with its own tree specs
            inner = _prepare(fn, params, batch, None, "different")
            leaves = tap_pieces(inner, plan, inner.p_leaves, inner.b_leaves)
            norms = certified_norm(leaves)  # covers the norms' and the sums' rounding
            factor = c / norms.clamp_min(c)
            return [leaf.weighted_sum(factor) for leaf in leaves], norms.to(leaves[0].sq_norm.dtype)

        return torch.compile(graph, **compile_kwargs)

    def step(params: Any, *batch: Any) -> tuple[Any, torch.Tensor]:
        prep = _prepare(fn, params, batch, None, "different")
        if prep.size == 0:
            raise _empty_error()
        if not prep.p_leaves:
            raise ValueError("compiled_clipped_grad_sum: params has no tensor leaves; nothing to differentiate")
        key = _signature(prep)
        graph = graphs.get((key, prep.size))
        if graph is None:
            graph = graphs[key, prep.size] = build(plan_for(prep, key))
        summed, norms = graph(prep.unflatten(prep.p_leaves), *batch)
        return prep.unflatten(summed), _check_finite(norms)

    return step
