"""Slow references the fast paths are checked against (ARCHITECTURE.md rule 8).

``per_example_grads`` is a plain Python loop over the batch that calls
``torch.autograd.grad`` on one example at a time, in float64. It uses no torch.func
transform, so it is independent of both ``vmap`` and the expanded-weights machinery.
Tolerances for comparing against it live in ``assert_tree_close`` alone.
"""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch

# relative error allowed per dtype (max |a - e| / max(|e|, tiny), per leaf)
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def to_float64(tree: Any) -> Any:
    """Cast every floating tensor leaf of ``tree`` to float64 (integers are kept)."""
    return optree.tree_map(
        lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree
    )


def per_example_grads(fn: Callable[..., torch.Tensor], params: Any, *batch: Any, dtype=torch.float64) -> Any:
    """Per-example gradients by a loop: for each b, ``autograd.grad(fn(params, *batch[b]), params)``.

    Args:
        fn: ``fn(params, *example) -> 0-dim loss`` for ONE example (no batch dim).
        params: pytree of tensors.
        *batch: pytrees with tensor leaves shaped ``[B, ...]``.
        dtype: floating dtype for params and floating batch leaves (float64 by default).

    Returns:
        params' structure with leaves ``[B, *leaf.shape]`` in ``dtype``.
    """
    cast = (lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
    p_leaves, p_spec = optree.tree_flatten(params)
    p_leaves = [cast(p).detach() for p in p_leaves]
    batch = optree.tree_map(cast, batch)
    sizes = {t.shape[0] for t in optree.tree_leaves(batch) if isinstance(t, torch.Tensor)}
    assert len(sizes) == 1, f"batch leaves disagree on B: {sizes}"
    (b_size,) = sizes
    rows: list[list[torch.Tensor]] = []
    for b in range(b_size):
        leaves = [p.clone().requires_grad_(True) for p in p_leaves]
        example = optree.tree_map(lambda t, b=b: t[b] if isinstance(t, torch.Tensor) else t, batch)
        loss = fn(optree.tree_unflatten(p_spec, leaves), *example)
        assert loss.dim() == 0, f"fn must return a 0-dim loss, got shape {tuple(loss.shape)}"
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)])
    stacked = [
        torch.stack([row[i] for row in rows]) if rows else p.new_zeros((0, *p.shape))
        for i, p in enumerate(p_leaves)
    ]
    return optree.tree_unflatten(p_spec, stacked)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - e| / max(max|e|, 1e-30)`` in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def assert_tree_close(actual: Any, expected: Any, dtype: torch.dtype | None = None, rtol: float | None = None) -> None:
    """Assert two pytrees agree leaf by leaf: same structure, shapes, and relative error.

    ``dtype`` picks the tolerance from ``RTOL`` (default: the dtype of ``actual``'s leaves).
    """
    a_leaves, a_spec = optree.tree_flatten(actual)
    e_leaves, e_spec = optree.tree_flatten(expected)
    assert a_spec == e_spec, f"structures differ: {a_spec} vs {e_spec}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        assert a.shape == e.shape, f"leaf {i}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
        tol = rtol if rtol is not None else RTOL[dtype or a.dtype]
        err = max_rel_error(a, e)
        assert err <= tol, f"leaf {i} (shape {tuple(a.shape)}): relative error {err:.3e} > {tol:.0e}"
