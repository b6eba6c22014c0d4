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
example ``[T, D]`` without ``lengths``: the tap sits on the gate pre-activations) are tapped,
and so are the torch functions with per-sample rules that a plain-torch model calls
(``functional_call`` of ``nn.Linear``, ``nn.Conv2d``, ``nn.LayerNorm``, ``nn.GroupNorm``,
``nn.Embedding``, HF ``Conv1D``'s ``addmm``, ``x @ W``, ``einsum``, ``weight * x``, a tied
head ``F.linear(h, emb.weight)``...); params of other calls (``lstm`` with ``lengths``,
``lstm_cell``, torch ops without a rule) are differentiated per example inside the graph,
with a warning. Which calls are tapped is
planned by one eager run of ``fn`` on the first example, per input signature (shapes, dtypes,
structure): each new signature plans and compiles again, and so does a pass that finds ``fn``
no longer doing what was planned (see :func:`compiled_clipped_grad_sum`). The batch size is
not part of the plan, but each new batch size compiles again (``vmap`` traces with a concrete
size): with Poisson sampling expect one compilation per distinct batch size (the graphs are
kept, and sizes near the expected one recur; ``step.compile_seconds`` says what each cost),
and prefer the eager :func:`clipped_grad_sum` where compilation is slow (seconds for the MLP
and the digits CNN here, about two minutes for the Embedding+LSTM model).

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
call, and a call whose norms are not all finite is run again by the eager
:func:`~psgfunc.dp.clipped_grad_sum` (the graph's float32 squares overflow on finite
gradients above about 1e19, which the eager route handles), which raises ``ValueError``
where a gradient itself is NaN or Inf.
"""

from __future__ import annotations

import functools
import itertools
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

import optree
import torch
from torch._dynamo.utils import counters
from torch.func import grad, vmap

from psgfunc import _rules
from psgfunc.dp._clip import _check_positive_finite, clip_factor, rounding_floor
from psgfunc.dp._clipped import clipped_grad_sum
from psgfunc.per_sample._api import _prepare
from psgfunc.per_sample._kinds import _acc, _up, certified_norm, dense_bound
from psgfunc.per_sample._tap import Plan, discover, traced_pieces

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

    ``method="fast"`` plans each input signature (which layer calls are tapped, which leaves
    some plain torch op also uses) by an eager run on the first example, and every compiled
    pass checks its plan: the compiler retraces when Python state that ``fn`` reads changes
    (a flag in a closure, a global, a dict), the retraced pass reports the layer calls it made,
    and every pass reports, per tapped leaf, whether a plain op also reached it in this batch
    (a probe costing one elementwise op per tapped leaf, see :mod:`psgfunc.per_sample._tap`;
    one more host sync per call). A pass that differs
    from its plan gives no sum: the step plans again from the current ``fn`` and reruns (plans
    and graphs are kept, so a flag that goes back and forth does not compile again). A pass
    still off a plan made in the same call, or a pass the compiler cannot trace under the
    torch-function rules' mode (``Tensor.unflatten`` in ``fn``),
    plans once more with that mode off: psgfunc layers tapped, other leaves materialised. A pass
    that swaps which params a layer uses is followed as it is (the pieces come from the
    traced pass). Each compiled graph has a code object of its own, so steps, signatures and
    batch sizes do not share the compiler's cache or its recompile limit
    (``torch._dynamo.config.recompile_limit``) and a step that failed leaves nothing behind
    that breaks another.

    The step reports what compiling cost: ``step.compile_seconds`` maps each batch size to
    the wall time of the calls that compiled a graph for it (tracing and backend compilation,
    plus that one run), and ``step.stats`` counts ``"compiles"`` (graphs the compiler built),
    ``"plans"`` (eager planning runs, ``method="fast"``) and ``"eager_runs"`` (calls the
    compiler ran without a graph).

    Returns:
        ``step(params, *batch) -> (clipped_sum, norms [B])``, equal to
        ``psgfunc.dp.clipped_grad_sum(fn, params, *batch, max_norm=C)`` up to float rounding.

    Raises:
        ValueError: an unknown ``method`` or invalid ``max_norm``; (from ``step``) mismatched
            batch sizes, an empty batch, an example whose gradient holds NaN or Inf (found by
            the eager rerun of a call with a non-finite norm, see below), ``fn`` whose layer
            calls or plain uses of params still differ from a fresh plan after planning again
            (they change from call to call, e.g. with a counter), or a step that the compiler
            cannot trace (it runs eagerly without error: a graph break, e.g. ``print`` or
            ``.item()`` in ``fn``; an error that ``fn`` raises eagerly is raised as it is).

    Warns:
        UserWarning: leaves materialised in the graph (``method="fast"``); the compiler ran a
            graph eagerly (its recompile limit was hit because the Python state ``fn`` reads
            kept changing, or compilation is disabled): that result is exact, and the next
            call starts a fresh cache; (once per step) a call whose norms were not all finite
            although its gradients are (the graph squares in float32, which overflows for
            entries above about 1e19) was run again through the eager
            :func:`~psgfunc.dp.clipped_grad_sum`, whose exact result it returns. A NaN or
            Inf gradient is rerun the same way, which raises the ``ValueError`` above.
    """
    if method not in _METHODS:
        raise ValueError(f"compiled_clipped_grad_sum: unknown method {method!r}; use one of {_METHODS}")
    c = _check_positive_finite(max_norm, "compiled_clipped_grad_sum: max_norm")
    if method != "materialize":
        return _fast_step(fn, c, compile_kwargs)
    return _materialize_step(fn, c, compile_kwargs)


_ATTEMPTS = 3
"""Passes one call of a fast step may take (each one after a pass off its plan plans again)."""

_NAMES = itertools.count()


class _Dense:
    """A materialised ``[B, *shape]`` leaf as :func:`certified_norm` reads it."""

    def __init__(self, g: torch.Tensor):
        self.bound, self.dtype = dense_bound(g), g.dtype


def _empty_error() -> ValueError:
    return ValueError(
        "compiled_clipped_grad_sum: the batch is empty; use clipped_grad_sum for B = 0 "
        "(a pure-noise step) rather than compiling a graph for it"
    )


def _finite_or_eager(step: Any, summed: Any, norms: torch.Tensor, fn: Callable[..., torch.Tensor],
                     c: float, method: str, params: Any, batch: tuple[Any, ...]) -> tuple[Any, torch.Tensor]:
    """``(summed, norms)`` where every norm is finite; else the call again through the eager
    :func:`~psgfunc.dp.clipped_grad_sum` (same ``method``), which is exact where the
    gradients are finite but too large for the graph's float32 squares (entries above about
    1e19: the squared norms overflow to Inf) and raises a ``ValueError`` naming the
    examples whose gradient is NaN or Inf. Warns once per step (where the rerun returns)."""
    if bool(torch.isfinite(norms).all()):
        return summed, norms
    out = clipped_grad_sum(fn, params, *batch, max_norm=c, method=method)  # raises for NaN/Inf
    if not step.warned_overflow:
        step.warned_overflow = True
        warnings.warn(
            "compiled_clipped_grad_sum: the compiled step's norms overflowed (finite "
            "gradients too large to square in float32, entries above about 1e19); this call "
            "ran again eagerly with psgfunc.dp.clipped_grad_sum, whose result is exact",
            stacklevel=4,
        )
    return out


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


def _own_code(body: Callable[..., Any]) -> Callable[..., Any]:
    """``body`` as a function with a code object of its own.

    The compiler keys its cache, its recompile limit and its automatic-dynamic state on the
    code object (and on its name and line): closures made by one ``def`` share one, so every
    step, signature and batch size would count towards one limit (after which the compiler
    silently runs eagerly), and a broken entry left by a failed trace would serve them all.
    """
    name = f"psgfunc_clipped_step_{next(_NAMES)}"
    code = body.__code__.replace(co_name=name, co_qualname=name)
    out = types.FunctionType(code, body.__globals__, name, body.__defaults__, body.__closure__)
    out.__kwdefaults__ = body.__kwdefaults__
    return out


class _Graph:
    """One compiled graph (a code object of its own) and its eager twin, for diagnosis."""

    def __init__(self, body: Callable[..., Any], compile_kwargs: dict[str, Any]):
        self.body = body
        self.compiled = torch.compile(_own_code(body), **compile_kwargs)
        self.disabled = bool(compile_kwargs.get("disable", False))  # asked to run eagerly


class _Untraceable(ValueError):
    """The compiler could not trace a step that runs eagerly without error."""


class _Runner:
    """Runs graphs for one step: counts compiles, times them, keeps the tap slot clean, and
    turns a failed trace into a clear error that leaves no broken graph behind."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.warned_eager = False

    def __call__(self, graph: _Graph, size: int, cache: dict[Any, _Graph], key: Any,
                 *args: Any) -> Any:
        """``graph(*args)``; ``cache[key]`` is ``graph``, dropped where it must not serve again."""
        stats = self.owner.stats
        prev = _rules.current_tap()
        before = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        try:
            out = graph.compiled(*args)
        except Exception as err:
            cache.pop(key, None)  # its cache may hold an entry that fails again: never reuse it
            _rules.set_tap(prev)
            self._diagnose(graph, err, args)
        finally:
            _rules.set_tap(prev)
        built = counters["stats"]["unique_graphs"] - before
        if built > 0:
            stats["compiles"] += built
            seconds = self.owner.compile_seconds
            seconds[size] = seconds.get(size, 0.0) + time.perf_counter() - start
        if not out[-1]:  # the compiler ran the body without a graph
            stats["eager_runs"] += 1
            cache.pop(key, None)
            if not self.warned_eager and not graph.disabled:
                self.warned_eager = True
                warnings.warn(
                    "compiled_clipped_grad_sum: torch.compile ran this step eagerly (exact, but "
                    "slow): its recompile limit (torch._dynamo.config.recompile_limit = "
                    f"{torch._dynamo.config.recompile_limit}) was hit because Python state that "
                    "fn reads kept changing, or compilation is disabled; the next call starts "
                    "a fresh cache",
                    stacklevel=4,
                )
        return out

    @staticmethod
    def _diagnose(graph: _Graph, err: Exception, args: tuple[Any, ...]) -> None:
        """Re-raise ``fn``'s own error where the eager body raises one, else a ValueError
        (the compiler cannot trace the step)."""
        try:
            graph.body(*args)
        except Exception as eager_err:
            raise eager_err from err
        raise _Untraceable(
            "compiled_clipped_grad_sum: torch.compile could not trace this step "
            f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}), which runs "
            "eagerly without error; fn must trace into one graph (no print, .item() or other "
            "graph break inside fn: fullgraph=True names the break), or use "
            "psgfunc.dp.clipped_grad_sum"
        ) from err


def _new_step(call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` as the public step, with its ``compile_seconds`` and ``stats``."""

    @functools.wraps(call)
    def step(params: Any, *batch: Any) -> tuple[Any, torch.Tensor]:
        return call(params, *batch)

    step.compile_seconds = {}  # type: ignore[attr-defined]
    step.stats = {"compiles": 0, "plans": 0, "eager_runs": 0}  # type: ignore[attr-defined]
    step.warned_overflow = False  # type: ignore[attr-defined]
    return step


def _materialize_step(fn: Callable[..., torch.Tensor], c: float, compile_kwargs: dict[str, Any]) -> Callable[..., Any]:
    """``step`` of ``method="materialize"``: one compiled graph per input signature (the
    compiler recompiles for a new batch size, and may make it dynamic)."""

    def graph(params: Any, *batch: Any) -> tuple[Any, torch.Tensor, bool]:
        in_dims = tuple(optree.tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, b) for b in batch)
        grads = vmap(grad(fn), in_dims=(None, *in_dims))(params, *batch)
        leaves, spec = optree.tree_flatten(grads)
        norms = certified_norm([_Dense(g) for g in leaves])
        factor = clip_factor(norms, c, rounding_floor([(g.dtype, g[0].numel()) for g in leaves]))
        sums = [(factor.to(_acc(g.dtype)) @ _up(g.reshape(g.shape[0], -1))).to(g.dtype).reshape(g.shape[1:])
                for g in leaves]
        return optree.tree_unflatten(spec, sums), norms.to(_acc(leaves[0].dtype)), torch.compiler.is_compiling()

    graphs: dict[Any, _Graph] = {}

    def call(params: Any, *batch: Any) -> tuple[Any, torch.Tensor]:
        prep = _prepare(fn, params, batch, None, "different")
        if prep.size == 0:
            raise _empty_error()
        key = _signature(prep)
        g = graphs.get(key)
        if g is None:
            g = graphs[key] = _Graph(graph, compile_kwargs)
        detached = prep.unflatten(prep.p_leaves)
        summed, norms, _ = run(g, prep.size, graphs, key, detached, *batch)
        return _finite_or_eager(step, summed, norms, fn, c, "materialize", params, batch)

    step = _new_step(call)
    run = _Runner(step)
    return step


def _fast_step(fn: Callable[..., torch.Tensor], c: float, compile_kwargs: dict[str, Any]) -> Callable[..., Any]:
    """``step`` of ``method="fast"``: plans per input signature (the current one first, others
    kept), and one compiled graph per plan and batch size (``vmap`` traces with a concrete
    batch size)."""
    plans: dict[Any, Plan] = {}  # signature -> the plan in use
    graphs: dict[Any, _Graph] = {}  # (signature, plan, batch size) -> its graph
    warned: set[Any] = set()

    def plan(prep: Any, key: Any, excluded: Any = (), ops: bool = True) -> Plan:
        if not ops:
            new = discover(prep, excluded, ops=False)
        else:
            new = discover(prep, excluded) if excluded else discover(prep)
        plans[key] = new
        step.stats["plans"] += 1
        if new.materialized and (key, tuple(new.materialized)) not in warned:
            warned.add((key, tuple(new.materialized)))
            warnings.warn(
                f"psgfunc fast clipping (compiled): {len(new.materialized)} of "
                f"{len(prep.p_leaves)} parameter leaves are used by functions without a tap "
                "(psgfunc's layers and the torch functions with per-sample rules have one: "
                "F.linear, conv, norms, embeddings, matmul/einsum, elementwise ops with a "
                "parameter...)" + ("" if new.ops else ", or by torch functions whose compiled "
                "calls differ from their eager ones or that the compiler cannot trace under "
                "those rules (only psgfunc layers are tapped here)")
                + ", so their per-sample gradients are materialised in the graph",
                stacklevel=4,
            )
        return new

    def build(p: Plan) -> Callable[..., Any]:
        def graph(params: Any, *batch: Any) -> Any:
            # flattened inside: the compiler traces optree with its own tree specs
            inner = _prepare(fn, params, batch, None, "different")
            traced = traced_pieces(inner, p, inner.p_leaves, inner.b_leaves)
            if traced.leaves is None:  # off its plan (a constant of this trace): no sum
                return None, None, None, traced.calls, torch.compiler.is_compiling()
            leaves = traced.leaves
            norms = certified_norm(leaves)  # covers the norms' and the sums' rounding
            factor = clip_factor(norms, c, rounding_floor([(leaf.dtype, q.numel()) for leaf, q in zip(leaves, inner.p_leaves)]))
            sums = [leaf.weighted_sum(factor) for leaf in leaves]
            return sums, norms.to(leaves[0].sq_norm.dtype), traced.unplanned, traced.calls, torch.compiler.is_compiling()

        return graph

    def call(params: Any, *batch: Any) -> tuple[Any, torch.Tensor]:
        prep = _prepare(fn, params, batch, None, "different")
        if prep.size == 0:
            raise _empty_error()
        if not prep.p_leaves:
            raise ValueError("compiled_clipped_grad_sum: params has no tensor leaves; nothing to differentiate")
        key = _signature(prep)
        current = plans.get(key)
        fresh = current is None  # planned in this call
        current = current or plan(prep, key)
        detached = prep.unflatten(prep.p_leaves)
        why = ""
        for _ in range(_ATTEMPTS):
            gkey = (key, _plan_key(current), prep.size)
            g = graphs.get(gkey)
            if g is None:
                g = graphs[gkey] = _Graph(build(current), _graph_kwargs(step, current, compile_kwargs))
            try:
                summed, norms, unplanned, calls, _ = run(g, prep.size, graphs, gkey, detached, *batch)
            except _Untraceable:
                if not current.ops:
                    raise
                # the compiler fails on some Python-level Tensor methods (Tensor.unflatten)
                # under the torch-function rules' mode: plan
                # without it (psgfunc layers tapped), as the compiler traced before
                why = "the compiler could not trace the torch-function rules"
                current = plan(prep, key, ops=False)
                fresh = True
                continue
            if summed is None:
                why = f"it made {len(calls)} tapped layer calls, the plan {len(current.calls)}"
                # a plan made from the current fn first; a pass off that one too may be the
                # torch-function rules' doing (a call that the compiler shows them otherwise
                # than the eager planning run): then tap psgfunc layers only
                current = plan(prep, key, ops=current.ops and not fresh)
                fresh = True
                continue
            reached = unplanned.nonzero().flatten().tolist() if bool(unplanned.any()) else []
            if reached:
                why = f"plain ops reached the tapped params leaves {reached}"
                current = plan(prep, key, set(reached) | set(current.materialized), current.ops)
                fresh = True
                continue
            return _finite_or_eager(step, prep.unflatten(summed), norms, fn, c, "fast", params, batch)
        raise ValueError(
            f"compiled_clipped_grad_sum: after planning {_ATTEMPTS} times, the compiled pass of "
            f"fn still differs from its plan ({why}): fn must make the same psgfunc layer calls "
            "and the same plain uses of params whenever its inputs' shapes and the Python state "
            "it reads are the same (no counters or random choices in Python); use "
            "method=\"materialize\" or psgfunc.dp.clipped_grad_sum for such an fn"
        )

    step = _new_step(call)
    run = _Runner(step)
    return step


def _graph_kwargs(step: Any, p: Plan, compile_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``compile_kwargs`` for a graph of plan ``p``: without ``dynamic=True`` where ``p``
    materialises leaves. Traced with dynamic shapes, such a graph computed wrong numbers
    (review h17, torch 2.13: ``(sin(W) @ x).pow(2).sum()`` gave norms ``[0, 0, 0]`` for
    ``[10.44, 1.83, 0.097]``, and flags that no leaf could have raised); the step's checks
    caught it and raised a misleading error, but they come from the same graph. Each graph
    serves one signature and one batch size anyway, so static shapes recompile nothing more.
    Warns once per step."""
    if not p.materialized or not compile_kwargs.get("dynamic"):
        return compile_kwargs
    if not getattr(step, "warned_dynamic", False):
        step.warned_dynamic = True
        warnings.warn(
            "compiled_clipped_grad_sum(method='fast'): dynamic=True is not used for this step, "
            "whose plan materialises parameters (traced with dynamic shapes, that part of the "
            "graph computed wrong per-sample gradients); its graphs are compiled with static "
            "shapes, one per input signature and batch size, as they are anyway",
            stacklevel=5,
        )
    return {**compile_kwargs, "dynamic": False}


def _plan_key(p: Plan) -> tuple[Any, ...]:
    return (tuple(p.calls), tuple(p.materialized), p.ops)
