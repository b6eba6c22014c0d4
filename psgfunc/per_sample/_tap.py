"""Fast-clipping pieces from ONE ``vmap(grad)``, with no custom autograd: traceable by
``torch.compile``.

The eager fast path (:mod:`psgfunc.per_sample._clip`) gets each layer's pieces (its input and
its output gradient) from the rules' ``autograd.Function`` backwards, which record them as a
side effect; ``torch.compile`` cannot trace that into a graph. Here every layer call that a
rule covers adds a zero tensor ``z_k`` to its output instead, and returns its input as an
auxiliary output. The gradient of one example's loss with respect to that example's own
``z_k`` IS the layer's output gradient for that example, so

    (dz_1, ..., dz_K), inputs = vmap(grad(example_loss, has_aux=True))(zeros, batch)

gives every piece with nothing but ``torch.func``: the whole step (forward, backward, norms,
clip factors, clipped sums) is one traceable function. The weights of covered layers are not
differentiated at all (they enter detached), so no ``[B, *shape]`` gradient is built for
them; a params leaf that some op without a tap also uses is differentiated per example and
materialised, as in the eager path.

Which calls are tapped, and the shapes of their outputs, is found once per input signature
by a discovery run of ``fn`` on the first example (:func:`discover`); the traced pass then
follows that plan (:func:`tap_pieces`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch.func import grad, vmap

from psgfunc import _rules
from psgfunc.per_sample._kinds import LeafPieces, leaf_pieces

__all__ = ["Tap", "Plan", "discover", "tap_pieces"]

Build = Callable[[tuple[torch.Tensor, ...], torch.Tensor], list[tuple[int, Any, tuple[Any, ...]]]]
"""``build(saved [B, ...] each, g [B, *out]) -> [(leaf index, kind, data), ...]``."""


class Tap:
    """The tap a rule's :meth:`~psgfunc.per_sample._expanded.Rule.tapped` talks to.

    Args:
        candidates: per params leaf, the tensor a layer must receive (by identity) for its
            call to be tapped, or None where that leaf must not be tapped.
        zs: per tapped call, the zero tensor added to its output; None while discovering.
    """

    def __init__(self, candidates: list[torch.Tensor | None], zs: list[torch.Tensor] | None):
        self.candidates, self.zs = candidates, zs
        self.saved: list[Any] = []
        self.builds: list[Build] = []
        self.calls: list[tuple[tuple[int, ...], torch.dtype]] = []

    def index(self, t: Any) -> int | None:
        """The params leaf ``t`` is, or None (not a leaf, a transformed leaf, or excluded)."""
        if t is None:
            return None
        for i, c in enumerate(self.candidates):
            if c is t:
                return i
        return None

    def out(self, y: torch.Tensor, saved: Any, build: Build) -> torch.Tensor:
        """Tap ``y`` (one example's layer output): ``y + z_k``, keeping ``saved`` (a tuple, or
        a list the layer may still append to until its call returns) for ``build``."""
        k = len(self.saved)
        self.saved.append(saved)
        self.builds.append(build)
        if self.zs is None:
            self.calls.append((tuple(y.shape), y.dtype))
            return y
        if k >= len(self.zs) or tuple(self.zs[k].shape) != tuple(y.shape):
            raise ValueError(
                "psgfunc fast clipping (compiled): fn called its psgfunc layers differently from "
                f"the run that planned the step (call {k}: output {tuple(y.shape)}); fn must call "
                "the same layers with the same shapes for every example"
            )
        return y + self.zs[k]


class Plan(NamedTuple):
    """What :func:`discover` found: the tapped calls' output shapes and dtypes (one example),
    in order, and the leaves to materialise."""

    calls: list[tuple[tuple[int, ...], torch.dtype]]
    materialized: list[int]


def _run(prep: Any, tap: Tap, leaves: list[torch.Tensor], example: list[Any]) -> torch.Tensor:
    prev = _rules.set_tap(tap)
    try:
        return prep.loss(leaves, *example)
    finally:
        _rules.set_tap(prev)


def discover(prep: Any) -> Plan:
    """Run ``fn`` on the first example to plan the tapped pass (eagerly, outside any graph).

    A leaf whose gradient reaches it through an op without a tap is materialised, and is not
    tapped anywhere else either (a layer that sees it then runs plainly); this repeats until
    the set is stable (a layer taps only when all of its params are tappable).
    """
    example = [t[0] if d == 0 else t for t, d in zip(prep.b_leaves, prep.b_dims)]
    excluded: set[int] = set()
    while True:
        leaves = [p.detach().requires_grad_(True) for p in prep.p_leaves]
        tap = Tap([None if i in excluded else p for i, p in enumerate(leaves)], None)
        with torch.enable_grad():
            loss = _run(prep, tap, leaves, example)
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        else:
            grads = (None,) * len(leaves)
        reached = {i for i, g in enumerate(grads) if g is not None}
        if reached <= excluded:
            return Plan(tap.calls, sorted(excluded))
        excluded |= reached


def tap_pieces(prep: Any, plan: Plan, p_leaves: list[torch.Tensor], b_leaves: list[Any]) -> list[LeafPieces]:
    """Per params leaf, its pieces for the batch ``b_leaves``, by one ``vmap(grad)``.

    ``p_leaves``/``b_leaves`` replace ``prep``'s (so that they are the inputs of a traced
    graph); ``plan`` comes from :func:`discover` on inputs of the same signature.
    """
    size = next(t.shape[0] for t, d in zip(b_leaves, prep.b_dims) if d is not None)
    dense_idx = plan.materialized
    candidates: list[torch.Tensor | None] = list(p_leaves)
    for i in dense_idx:
        candidates[i] = None

    traced: list[list[Build]] = []  # this pass's builds: its leaf indices, not the plan's

    def example_loss(zs: list[torch.Tensor], dense: list[torch.Tensor], *example: Any) -> Any:
        leaves = list(p_leaves)
        for i, d in zip(dense_idx, dense):
            leaves[i] = d
        tap = Tap(candidates, zs)
        loss = _run(prep, tap, leaves, list(example))
        traced.append(tap.builds)
        if len(tap.saved) != len(zs):
            raise ValueError(
                "psgfunc fast clipping (compiled): fn made "
                f"{len(tap.saved)} psgfunc layer calls, the planning run {len(zs)}; fn must call "
                "the same layers with the same shapes for every example"
            )
        return loss, [tuple(t) for t in tap.saved]

    device = p_leaves[0].device if p_leaves else None
    zs = [torch.zeros((size, *shape), dtype=dtype, device=device) for shape, dtype in plan.calls]
    per_example = grad(example_loss, argnums=(0, 1), has_aux=True)
    (g_z, g_dense), saved = vmap(per_example, in_dims=(0, None, *prep.b_dims), randomness=prep.randomness)(
        zs, [p_leaves[i] for i in dense_idx], *b_leaves
    )
    records: list[list[tuple[Any, tuple[Any, ...]]]] = [[] for _ in p_leaves]
    for build, s, g in zip(traced[-1], saved, g_z):
        for i, kind, data in build(s, g):
            records[i].append((kind, data))
    dense: list[torch.Tensor | None] = [None] * len(p_leaves)
    for i, g in zip(dense_idx, g_dense):
        dense[i] = g
    unused = [not r and d is None for r, d in zip(records, dense)]  # no gradient at all: zeros
    dense = [p.new_zeros((size, *p.shape)) if u else d for p, d, u in zip(p_leaves, dense, unused)]
    leaves = leaf_pieces(records, dense, size, [p.shape for p in p_leaves])
    for leaf, u in zip(leaves, unused):
        leaf.materialized = leaf.materialized and not u
    return leaves
