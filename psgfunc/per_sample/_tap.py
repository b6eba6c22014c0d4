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

Covered layers are psgfunc's functional layers and, for models written in plain torch, the
torch functions with per-sample rules (:mod:`psgfunc.per_sample._torch_ops`: ``F.linear``,
conv, the norms, embeddings, ``matmul``/``addmm``/``einsum``, elementwise ops with a
parameter operand...): the rules' torch-function mode runs around ``fn`` in the planning run
and in the traced pass alike (the compiler traces it), hands those calls to the rules, whose
``tapped`` paths then run. It knows the leaves by identity (:meth:`Tap.index`) and views of
them by their ``_base`` (so ``h @ wte.weight.T`` and ``F.linear(h, wte.weight)``, a tied
head, are taps on the table). Where the compiler shows the mode a call otherwise than the
eager run does, the pass is off its plan; the step then plans with the mode off (``Plan.ops``:
psgfunc layers tapped, other leaves materialised).

Which calls are tapped, and the shapes of their outputs, is found once per input signature
by a discovery run of ``fn`` on the first example (:func:`discover`); the traced pass then
follows that plan (:func:`traced_pieces`) and checks it: it reports the layer calls it made
(a Python constant of the trace: the compiled graph keeps the report of the trace that built
it) and, per tapped leaf, whether a plain op also reached that leaf in this batch (a probe: the
leaf ``p`` enters ``fn`` as ``p + e * r`` with a scalar ``e = 0`` and a fixed direction ``r``;
the per-example ``d loss / d e = <plain gradient, r>`` is exactly zero when only tapped layers,
which take ``p`` detached, use it, and nonzero almost surely otherwise). A pass that differs
from its plan never yields a sum: the caller plans again (:mod:`psgfunc.dp._compiled`).
Nothing in the traced pass raises on a difference from the plan: an exception inside a
``torch.func`` transform under ``torch.compile`` breaks the graph and leaves a broken cache
entry behind.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, NamedTuple

import torch
from torch.func import grad, vmap

from psgfunc import _rules
from psgfunc.per_sample import _torch_ops
from psgfunc.per_sample._kinds import LeafPieces, leaf_pieces

__all__ = ["Tap", "Plan", "Traced", "discover", "traced_pieces", "tap_pieces"]

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
        a list the layer may still append to until its call returns) for ``build``.

        A call the plan does not have (one more than planned, another output shape or dtype)
        is recorded and left untapped: the pass is off its plan (:attr:`calls` differs from
        the plan's) and its pieces are never used."""
        k = len(self.saved)
        self.saved.append(saved)
        self.builds.append(build)
        call = (tuple(y.shape), y.dtype)
        self.calls.append(call)
        if self.zs is None or k >= len(self.zs):
            return y
        z = self.zs[k]
        if (tuple(z.shape), z.dtype) != call:
            return y
        return y + z


class Plan(NamedTuple):
    """What :func:`discover` found: the tapped calls' output shapes and dtypes (one example),
    in order, the leaves to materialise, and whether torch functions go to their rules
    (``ops``; else only psgfunc layers are tapped)."""

    calls: list[tuple[tuple[int, ...], torch.dtype]]
    materialized: list[int]
    ops: bool = True


class Traced(NamedTuple):
    """What one pass of :func:`traced_pieces` gives.

    Attributes:
        leaves: per params leaf its pieces, or None where the pass was off its plan.
        calls: the tapped layer calls this pass made (output shape and dtype per example),
            in order; the plan's ``calls`` where the pass followed it.
        unplanned: ``[n_leaves]`` bool, True for a leaf the plan taps that a plain op also
            reached in this batch (its sum and norm miss that part: plan again), or None.
    """

    leaves: list[LeafPieces] | None
    calls: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    unplanned: torch.Tensor | None


def _run(prep: Any, tap: Tap, leaves: list[torch.Tensor], example: list[Any], ops: bool) -> torch.Tensor:
    prev = _rules.set_tap(tap)
    try:
        if not ops:
            return prep.loss(leaves, *example)
        with _torch_ops.tapping(tap):  # torch functions on the leaves reach their rules too
            return prep.loss(leaves, *example)
    finally:
        _rules.set_tap(prev)


def discover(prep: Any, excluded: Iterable[int] = (), ops: bool = True) -> Plan:
    """Run ``fn`` on the first example to plan the tapped pass (eagerly, outside any graph).

    A leaf whose gradient reaches it through an op without a tap is materialised, and is not
    tapped anywhere else either (a layer that sees it then runs plainly); this repeats until
    the set is stable (a layer taps only when all of its params are tappable). ``excluded``:
    leaves to materialise whatever this run finds (those a traced pass saw plain ops reach).
    ``ops=False``: torch functions run plainly (only psgfunc layers are tapped).
    """
    example = [t[0] if d == 0 else t for t, d in zip(prep.b_leaves, prep.b_dims)]
    excluded = set(excluded)
    while True:
        leaves = [p.detach().requires_grad_(True) for p in prep.p_leaves]
        tap = Tap([None if i in excluded else p for i, p in enumerate(leaves)], None)
        with torch.enable_grad():
            loss = _run(prep, tap, leaves, example, ops)
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        else:
            grads = (None,) * len(leaves)
        reached = {i for i, g in enumerate(grads) if g is not None}
        if reached <= excluded:
            return Plan(list(tap.calls), sorted(excluded), ops)
        excluded |= reached


def _direction(p: torch.Tensor) -> torch.Tensor:
    """A fixed, dense, non-repeating direction shaped like ``p`` (made in the graph: no
    memory held between steps, no draw from the caller's random stream)."""
    work = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
    i = torch.arange(p.numel(), dtype=work, device=p.device)
    return torch.sin(i * 0.7548776662466927 + 0.5).reshape(p.shape).to(p.dtype)


def traced_pieces(prep: Any, plan: Plan, p_leaves: list[torch.Tensor],
                  b_leaves: list[Any]) -> Traced:
    """Per params leaf, its pieces for the batch ``b_leaves``, by one ``vmap(grad)``, with the
    pass's report on its plan (:class:`Traced`). Raises nothing on a difference from the plan
    (see the module docstring).

    ``p_leaves``/``b_leaves`` replace ``prep``'s (so that they are the inputs of a traced
    graph); ``plan`` comes from :func:`discover` on inputs of the same signature.
    """
    size = next(t.shape[0] for t, d in zip(b_leaves, prep.b_dims) if d is not None)
    dense_idx = list(plan.materialized)
    probed = [i for i in range(len(p_leaves)) if i not in plan.materialized]
    directions = [_direction(p_leaves[i]) for i in probed]

    traced: list[Tap] = []  # this pass's tap: its calls, and builds with its leaf indices

    def example_loss(zs: list[torch.Tensor], dense: list[torch.Tensor], probes: list[torch.Tensor],
                     *example: Any) -> Any:
        leaves = list(p_leaves)
        for i, d in zip(dense_idx, dense):
            leaves[i] = d
        for i, e, r in zip(probed, probes, directions):
            leaves[i] = p_leaves[i] + e * r  # equal to p_leaves[i]; tapped layers detach it
        candidates: list[torch.Tensor | None] = list(leaves)
        for i in dense_idx:
            candidates[i] = None
        tap = Tap(candidates, zs)
        loss = _run(prep, tap, leaves, list(example), plan.ops)
        traced.append(tap)
        return loss, [tuple(t) for t in tap.saved]

    device = p_leaves[0].device if p_leaves else None
    zs = [torch.zeros((size, *shape), dtype=dtype, device=device) for shape, dtype in plan.calls]
    probes = [p_leaves[i].new_zeros(()) for i in probed]
    per_example = grad(example_loss, argnums=(0, 1, 2), has_aux=True)
    (g_z, g_dense, g_probe), saved = vmap(per_example, in_dims=(0, None, None, *prep.b_dims),
                                          randomness=prep.randomness)(
        zs, [p_leaves[i] for i in dense_idx], probes, *b_leaves
    )
    tap = traced[-1]
    calls = tuple(tap.calls)
    if calls != tuple(plan.calls):
        return Traced(None, calls, None)
    flags = [torch.zeros((), dtype=torch.bool, device=device)] * len(p_leaves)
    for i, g in zip(probed, g_probe):
        flags[i] = g.ne(0).any()  # NaN counts: a NaN reached the leaf through a plain op
    unplanned = torch.stack(flags) if flags else torch.zeros(0, dtype=torch.bool)
    records: list[list[tuple[Any, tuple[Any, ...]]]] = [[] for _ in p_leaves]
    for build, s, g in zip(tap.builds, saved, g_z):
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
    return Traced(leaves, calls, unplanned)


def tap_pieces(prep: Any, plan: Plan, p_leaves: list[torch.Tensor], b_leaves: list[Any]) -> list[LeafPieces]:
    """:func:`traced_pieces`, eagerly: the pieces, or ValueError where the pass was off its
    plan (other layer calls, or a plain op reaching a tapped leaf)."""
    out = traced_pieces(prep, plan, p_leaves, b_leaves)
    if out.leaves is None:
        raise ValueError(
            "psgfunc fast clipping (compiled): fn made the psgfunc layer calls "
            f"{_describe(out.calls)}, the planning run {_describe(plan.calls)}; fn must call "
            "the same layers with the same shapes for every example"
        )
    if bool(out.unplanned.any()):
        raise ValueError(
            "psgfunc fast clipping (compiled): plain ops reached the params leaves "
            f"{out.unplanned.nonzero().flatten().tolist()}, which the planning run saw used by "
            "tapped layers only; fn must use its params the same way for every example (plan again)"
        )
    return out.leaves


def _describe(calls: Any) -> str:
    return f"{len(calls)} (outputs {[shape for shape, _ in calls][:6]})"
