"""Whose examples a parameter's per-sample gradient rows belong to: one forward pass each.

Row ``b`` of ``p.grad_sample`` (or of a fast-clipping record) is example ``b``'s gradient.
Adding the rows that a second, unrelated forward pass brings would merge two different
examples into one, which DP-SGD would then clip as one (sensitivity ``2C``). Adding the
rows of several uses of ``p`` in ONE forward pass is right: tied weights, a cell looped
over time, several losses of one batch. This module tells the two apart and checks that
the rows cover every use of the parameter.

**What a forward pass is.** Every :func:`~psgfunc.per_sample.module_call` (one layer on
one batch) is a :class:`Call`. The calls whose gradients arrive in one backward pass (one
autograd graph task) are linked: they feed one loss, so they are one forward pass. Links
are transitive (union-find over the calls). During a backward pass the gradients are not
added at once: they are held until the pass ends (a callback queued on the autograd
engine), and then, for each parameter that already holds rows (earlier backward passes):

* the rows are added only if one of this backward's calls is linked to the calls those
  rows came from (e.g. ``l1.backward(retain_graph=True); l2.backward()`` on one forward
  pass: ``l2``'s graph reaches calls ``l1``'s did); otherwise ``ValueError``: a different
  forward pass (call ``DPOptimizer.accumulate()`` or clear with ``zero_grad`` between
  micro-batches);
* rows held in a ``grad_sample`` that the hooks did not build (``set_grad_sample``, set by
  hand) are never added to: ``ValueError`` too;
* a forward pass whose rows :meth:`DPOptimizer.accumulate` already clipped cannot deliver
  rows again (its examples would be counted twice): ``ValueError``.

On error nothing is added (``p.grad``, filled by autograd itself, may have been).

Rows follow ``.grad``: a backward pass that adds into no ``p.grad`` (``autograd.grad``, or
``backward(inputs=...)`` without ``p``) delivers no rows for ``p`` (:func:`_accumulates`).

Known false positives (all raise, none adds wrongly): two backward passes of one forward
pass whose graphs share no psgfunc layer call while some parameter gets rows from both
(a tied weight whose two uses feed two losses backpropagated separately, or truncated
BPTT with a detached state): backpropagate such losses together (``(l1 + l2).backward()``).
A reentrant checkpoint (``use_reentrant=True``) around a layer whose parameter is also
used outside the checkpoint is the same case. The converse is by definition: a loss that
adds outputs of two forward passes in one graph makes them one forward pass.

**Every use.** A parameter that went through a psgfunc layer also gets a hook on itself,
which sees the total gradient autograd sends it in the backward pass. In the dense mode
that total must equal the sum of the rows bit for bit (the rows' own sums are what
autograd adds, in the same order; only a use outside any psgfunc layer can make a
difference); in fast-clipping mode rules send the parameter nothing, so any nonzero total
beyond the dense rows is such a use. It raises ``ValueError``: a ``grad_sample`` without it
would train on a different gradient. A backward pass that brings such a use and no rows
(the use backpropagated on its own, before or after the layers' loss, or inside a
reentrant checkpoint) flags the rows the parameter holds, and those that come while that
gradient is still in ``p.grad`` (:func:`_flag_plain`); ``DPOptimizer`` refuses flagged rows.
Calls without gradients (a reentrant checkpoint's first forward) give the hook too.

**Fast-clipping records.** A ``DPOptimizer(fast_clipping=True)`` owns one
:class:`PieceLog` per parameter; the registry holds it weakly, so recording stops when
that optimizer is garbage collected, and a newer ``DPOptimizer`` on the same parameter
takes it over (:func:`claim`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any, Callable

import torch

__all__ = ["Call", "PieceLog", "claim", "log_of", "rows_view", "recorder", "watch", "consume", "pad_rows",
           "plain_use_error", "describe", "watched", "mark_clean", "marked_clean"]

_LOCK = threading.RLock()
# graph task id -> the rows held until that backward pass ends (dies with the graph task,
# whose queued callback is the only strong reference: a failed backward leaves nothing)
_PENDING: weakref.WeakValueDictionary[int, _Backward] = weakref.WeakValueDictionary()
# id(p) -> p, for the parameters that carry the total-gradient hook
_WATCHED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
# id(p) -> the PieceLog of the fast-clipping DPOptimizer that records for p
_LOGS: weakref.WeakValueDictionary[int, PieceLog] = weakref.WeakValueDictionary()


def _execution_engine() -> Any:
    return torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]


class Call:
    """One layer call on one batch; a node of the union-find whose classes are forward passes.

    Attributes:
        parent: the node this one was merged into (None: a class representative).
        consumed: (representatives) whether ``DPOptimizer.accumulate`` clipped this pass.
    """

    __slots__ = ("parent", "consumed")

    def __init__(self) -> None:
        self.parent: Call | None = None
        self.consumed = False


def _find(c: Call) -> Call:
    root = c
    while root.parent is not None:
        root = root.parent
    while c.parent is not None and c.parent is not root:  # path compression
        c.parent, c = root, c.parent
    return root


def consume(tag: Any) -> None:
    """Mark the forward pass of rows tagged ``tag`` (a :class:`Call` or None) as clipped."""
    if isinstance(tag, Call):
        _find(tag).consumed = True


class PieceLog:
    """The fast-clipping record of one parameter, owned by one ``DPOptimizer``.

    Attributes:
        pieces: ``(kind, data, n)``: a rule's pieces for a call on ``n`` examples.
        batch: the batch size ``B`` of the recorded rows (the largest ``n``).
        group: the :class:`Call` the rows came from (their forward pass), or None.
        plain: whether a later backward pass sent the parameter a gradient outside any
            psgfunc layer (see :func:`_flag_plain`).
    """

    __slots__ = ("pieces", "batch", "group", "plain", "param", "__weakref__")

    def __init__(self, p: torch.Tensor) -> None:
        self.pieces: list[tuple[Any, tuple[Any, ...], int]] = []
        self.batch = 0
        self.group: Call | None = None
        self.plain = False  # a later backward sent the parameter a gradient outside psgfunc
        self.param = weakref.ref(p)

    def clear(self) -> None:
        self.pieces, self.batch, self.group, self.plain = [], 0, None, False

    def records(self) -> list[tuple[Any, tuple[Any, ...]]]:
        """``(kind, data)`` pieces, each padded with zero rows to ``batch`` examples."""
        return [(kind, pad_rows(data, n, self.batch)) for kind, data, n in self.pieces]

    def attached(self) -> bool:
        """Whether this log still records for its parameter (no newer DPOptimizer took it)."""
        p = self.param()
        return p is not None and _LOGS.get(id(p)) is self


def claim(params: Iterable[torch.Tensor], fast: bool) -> dict[int, PieceLog]:
    """Make a new ``DPOptimizer`` the recorder of ``params`` (the newest one wins).

    Args:
        params: the optimizer's trainable parameters.
        fast: fast clipping (new logs) or not (the parameters' logs are detached, so that
            backward builds ``grad_sample`` for them again).

    Returns:
        ``id(p) -> PieceLog``: the optimizer must keep these (the registry holds them weakly).
    """
    logs: dict[int, PieceLog] = {}
    with _LOCK:
        for p in params:
            if fast:
                logs[id(p)] = _LOGS[id(p)] = PieceLog(p)
            elif id(p) in _LOGS:
                del _LOGS[id(p)]
    return logs


def log_of(p: torch.Tensor) -> PieceLog | None:
    """The live fast-clipping log recording for ``p``, or None (dense ``grad_sample``)."""
    log = _LOGS.get(id(p))
    return log if log is not None and log.param() is p else None


def pad_rows(data: tuple[Any, ...], n: int, size: int) -> tuple[Any, ...]:
    """A call's pieces on ``n`` examples as pieces on ``size >= n``: zero rows at the end.

    Every tensor of a piece is batch-first (the :func:`~psgfunc.per_sample._kinds.emit`
    contract) and every kind is linear in the output gradient, so zero rows contribute
    nothing: the call's examples are the first ``n`` of the batch (a packed step).
    """
    if n == size:
        return data
    out = []
    for t in data:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n:
            t = torch.cat([t, t.new_zeros((size - n, *t.shape[1:]))])
        out.append(t)
    return tuple(out)


# ------------------------------------------------------------------------ backward passes


def _add_rows(total: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
    """``total + g``; of different batch sizes (top-aligned calls), into the first rows."""
    if total is None:
        return g.contiguous() if g.dim() > 0 and g.stride(0) == 0 else g
    if total.shape == g.shape:
        return total + g
    big, small = (total, g) if total.shape[0] >= g.shape[0] else (g, total)
    out = big.clone()
    out[: small.shape[0]] += small
    return out


class _Entry:
    """What one backward pass brought one parameter (its rows added up as they come, so a
    cell looped over T steps holds one ``[B, *shape]``, not T of them)."""

    __slots__ = ("p", "name", "rows", "size", "aligned", "rowsum", "pieces", "total")

    def __init__(self, p: torch.Tensor, name: str) -> None:
        self.p, self.name = p, name
        self.rows: torch.Tensor | None = None  # the per-sample gradients [n, *shape]
        self.size: int | None = None
        self.aligned = False  # rows of calls on fewer examples go to the first rows
        self.rowsum: torch.Tensor | None = None  # sum of each call's g.sum(0), in order
        self.pieces: list[tuple[PieceLog, Any, tuple[Any, ...], int, bool]] = []
        self.total: torch.Tensor | None = None  # what autograd sent p itself

    def add(self, g: torch.Tensor, aligned: bool, s: torch.Tensor) -> None:
        """Rows ``g [n, *shape]`` of one call, whose sum ``s`` (``g.sum(0)``) the call sent ``p``."""
        self.size = _merge_sizes(self.size, g.shape[0], aligned, self.name)
        self.aligned = aligned
        # a copy, never the sum itself: that goes on to p, where a hook may change it in
        # place, also without a version bump (.data, numpy, dlpack, all_reduce), and the
        # check of p's total (_check_total) must see such a change
        self.rowsum = s.clone() if self.rowsum is None else self.rowsum + s
        self.rows = _add_rows(self.rows, g)


class _Backward:
    """The rows of one backward pass, held until it ends (:meth:`finish`)."""

    def __init__(self, task: int) -> None:
        self.task = task
        self.calls: dict[int, Call] = {}
        self.entries: dict[int, _Entry] = {}

    def entry(self, p: torch.Tensor, name: str) -> _Entry:
        e = self.entries.get(id(p))
        if e is None:
            e = self.entries[id(p)] = _Entry(p, name)
            # (before this pass adds to p.grad: its first event for p precedes p's accumulation)
            if getattr(p, "_psg_plain_pending", False) and _grad_is_clean(p):
                p._psg_plain_pending = False  # what the plain use left in p.grad was cleared
        return e

    def finish(self) -> None:
        with _LOCK:
            if _PENDING.get(self.task) is self:
                del _PENDING[self.task]
            entries = list(self.entries.values())
            for e in entries:
                _check_total(e)
            roots = {id(r): r for r in (_find(c) for c in self.calls.values())}
            if any(r.consumed for r in roots.values()):
                names = ", ".join(sorted({e.name for e in entries if e.size is not None or e.pieces})[:5])
                raise ValueError(
                    f"psgfunc: this backward pass brings per-sample gradients for {names} from a "
                    "forward pass whose examples DPOptimizer.accumulate() already clipped and "
                    "summed; adding them again would count those examples twice. Backpropagate "
                    "all losses of a forward pass before accumulate() (e.g. (l1 + l2).backward()), "
                    "then run a new forward pass"
                )
            plans = [_plan(e, roots) for e in entries]
            root = None
            for r in roots.values():
                if root is None:
                    root = r
                elif r is not root:
                    r.parent = root
            for e, plan in zip(entries, plans):
                _commit(e, plan, root)


def _deliver(add: Callable[[_Backward], None]) -> None:
    """``add`` to the current backward pass's :class:`_Backward` (its first hook queues the
    check-and-commit at its end; outside the engine, checked and committed at once)."""
    task = torch._C._current_graph_task_id()
    if task < 0:  # pragma: no cover - hooks run inside the engine
        pend = _Backward(task)
        add(pend)
        pend.finish()
        return
    with _LOCK:
        pend = _PENDING.get(task)
        if pend is None:
            pend = _Backward(task)
            _PENDING[task] = pend
            _execution_engine().queue_callback(pend.finish)
        add(pend)


def _check_total(e: _Entry) -> None:
    """ValueError if autograd sent ``e.p`` more than its rows: a use outside psgfunc layers."""
    total = e.total
    if total is None:
        return
    if total.layout != torch.strided:
        total = total.to_dense()
    rowsum = e.rowsum
    if rowsum is None:
        if not e.pieces and bool(total.ne(0).any()):
            _flag_plain(e.p)  # a backward without psgfunc layers: see _flag_plain
            return
        bad = bool(total.ne(0).any())
    else:
        # bit for bit: autograd adds the calls' sums that the rows' sum adds, in the same
        # order (each call's backward hands its sum over as it returns it), so any difference
        # is a use the rows miss; a tolerance would let such a use through at its size (16
        # eps of the total was 12% in bfloat16)
        if not total.is_floating_point():
            bad = not torch.equal(total, rowsum)
        elif torch.equal(total, rowsum) and bool(torch.isfinite(rowsum).all()):
            return
        else:  # a difference, or infinities (inf + c is inf, NaN is not NaN)
            bad = not _same_non_finite(e, total, rowsum)
    if bad:
        raise plain_use_error(f"psgfunc: {e.name}")


def _same_non_finite(e: _Entry, total: torch.Tensor, rowsum: torch.Tensor) -> bool:
    """:func:`_check_total` where the total differs from the rows' sum or either is not
    finite: equal where both are, or both NaN, at positions where a row is non-finite itself
    (rows of +inf and -inf; DPOptimizer then refuses those examples by name). Where the rows
    are finite but their sum is not (float16 overflow), nothing can be compared: refused."""
    open_ = ~torch.isfinite(e.rows).all(0)
    finite = torch.isfinite(rowsum)
    same = (total == rowsum) | (total.isnan() & rowsum.isnan())
    if bool((same & (finite | open_)).all()):
        return True
    if bool((same & ~finite & ~open_).any()):
        raise ValueError(
            f"psgfunc: {e.name}: the sum of its per-sample gradients overflows {rowsum.dtype} "
            "(finite rows, an infinite sum), so whether a use outside psgfunc layers adds to it "
            "cannot be checked; scale the loss down or train the parameter in float32 or bfloat16"
        )
    return False


def _flag_plain(p: torch.Tensor) -> None:
    """A backward pass sent ``p`` a gradient through no psgfunc layer: a separately
    backpropagated plain use of the same forward pass (a tied head's own loss, before or
    after the layers' loss; or inside a reentrant checkpoint), or an unrelated computation
    with the same tensor (a reference model). Rows ``p`` holds now, and rows a later pass
    brings while that gradient is still in ``p.grad`` (``_psg_plain_pending``, see
    :func:`_grad_is_clean`), are flagged, not refused: ``DPOptimizer`` refuses flagged rows
    (:func:`plain_use_error`), a plain ``grad_sample`` reader keeps them."""
    p._psg_plain_pending = "seen"
    gs = getattr(p, "grad_sample", None)
    if gs is not None and isinstance(getattr(gs, "_psg_call", None), Call):
        gs._psg_plain = True
    log = log_of(p)
    if log is not None and log.pieces:
        log.plain = True


def marked_clean(p: torch.Tensor) -> bool:
    """Whether ``p.grad`` is what :func:`mark_clean` saw (a DPOptimizer's update, its zeros,
    or what ``p.grad`` held when the optimizer was built), unchanged since: a backward pass
    that adds to it changes its version."""
    g, mark = p.grad, getattr(p, "_psg_clean_grad", None)
    return g is not None and mark is not None and mark[0]() is g and g._version == mark[1]


def _grad_is_clean(p: torch.Tensor) -> bool:
    """Whether ``p.grad`` holds no gradient of a backward pass: None, zeros, or
    :func:`marked_clean`."""
    g = p.grad
    if g is None or marked_clean(p):
        return True
    values = g.coalesce().values() if g.layout == torch.sparse_coo else g
    return not bool(values.ne(0).any())


def mark_clean(p: torch.Tensor, replaced: bool = False) -> None:
    """``p.grad`` as it stands is not a gradient of this step's backward passes: rows that
    come while it is there are not flagged for it (:func:`_flag_plain`). ``replaced``: a
    DPOptimizer's update took the place of whatever ``p.grad`` held. Else (what ``p.grad``
    held when the optimizer was built or got ``p``, e.g. a public pretraining's gradient)
    a plain use a backward pass was seen to bring stays flagged: that is this step's."""
    if not replaced and getattr(p, "_psg_plain_pending", False) == "seen":
        return
    p._psg_plain_pending = False
    g = p.grad
    p._psg_clean_grad = None if g is None else (weakref.ref(g), g._version)


def plain_use_error(where: str) -> ValueError:
    """The error for per-sample gradients that miss a use of the parameter."""
    return ValueError(
        f"{where} is used outside any psgfunc layer (e.g. a tied output head "
        "`h @ emb.weight.T`, or a penalty term on the weight), and its per-sample gradients "
        "(grad_sample, or DPOptimizer's fast-clipping record) miss that use. Route every use "
        "through a psgfunc layer (e.g. share the Parameter with a psgfunc.nn.Linear: "
        "head.weight = emb.weight), untie the weights, or put a weight penalty in the "
        "optimizer (weight_decay). A loss that differentiates a gradient again (create_graph="
        "True: a gradient penalty) uses the weights in the layers' backward, where psgfunc "
        "cannot tell the examples apart: compute its per-sample gradients with "
        "psgfunc.per_sample_grads(fn, params, *batch, method='vmap')"
    )


def _merge_sizes(current: int | None, n: int, aligned: bool, name: str) -> int:
    if current is None or n == current:
        return n
    if aligned:  # DPLSTMCell / LSTMLinear: a call on fewer examples adds to the first rows
        return max(current, n)
    raise ValueError(
        f"psgfunc: {name} holds per-sample gradients for a batch of {current} examples and now "
        f"gets one for {n}; use one batch per forward pass, and clear between batches with "
        "DPOptimizer.accumulate() / zero_grad() or psgfunc.nn.zero_grad(model) (a plain "
        "torch optimizer's zero_grad clears .grad only)"
    )


def _different_pass(name: str, what: str) -> ValueError:
    return ValueError(
        f"psgfunc: {name} already holds {what} from an earlier forward pass, and this backward "
        "pass brings rows of another forward pass; rows are examples, so adding them would "
        "merge different examples into one. Call DPOptimizer.accumulate() after each "
        "micro-batch's backward (or clear with DPOptimizer.zero_grad() / "
        "psgfunc.nn.zero_grad(model)) before the next forward pass. Several losses of ONE "
        "forward pass can be backpropagated together: (l1 + l2).backward()"
    )


def _plan(e: _Entry, roots: dict[int, Call]) -> dict[int, int]:
    """Check what ``e`` brings against what its parameter holds (ValueError); returns the
    batch size of each fast-clipping log it records into, after the commit."""
    if e.rows is not None:
        prev = getattr(e.p, "grad_sample", None)
        if prev is not None:
            tag = getattr(prev, "_psg_call", None)
            if not isinstance(tag, Call):
                raise ValueError(
                    f"psgfunc: {e.name} has a grad_sample that psgfunc's layers did not build "
                    "(set_grad_sample, or set by hand), and a backward pass through a psgfunc "
                    "layer now brings rows for it; clear it first (p.grad_sample = None, or "
                    "zero_grad) or let one of the two provide the per-sample gradients"
                )
            if id(_find(tag)) not in roots:
                raise _different_pass(e.name, "grad_sample")
            _merge_sizes(prev.shape[0], e.rows.shape[0], e.aligned, e.name)
    batches: dict[int, int] = {}
    for log, _, _, n, aligned in e.pieces:
        if not log.attached():
            continue
        if id(log) not in batches:
            if log.pieces:
                if log.group is None or id(_find(log.group)) not in roots:
                    raise _different_pass(e.name, "DPOptimizer's fast-clipping record")
                batches[id(log)] = log.batch
            else:
                batches[id(log)] = None  # type: ignore[assignment]
        batches[id(log)] = _merge_sizes(batches[id(log)], n, aligned, e.name)
    return batches


def _commit(e: _Entry, batches: dict[int, int], root: Call | None) -> None:
    # a plain use's gradient still in p.grad (_flag_plain): these rows miss it too
    pending = getattr(e.p, "_psg_plain_pending", False)
    if e.rows is not None:
        total = _add_rows(getattr(e.p, "grad_sample", None), e.rows)
        if pending or getattr(getattr(e.p, "grad_sample", None), "_psg_plain", False):
            total._psg_plain = True
        total._psg_call = root
        e.p.grad_sample = total
    for log, kind, data, n, _ in e.pieces:
        if log.attached():  # a log a newer DPOptimizer took over records nothing more
            log.pieces.append((kind, data, n))
            log.batch = batches[id(log)]
            log.group = root
            log.plain = log.plain or pending


# ------------------------------------------------------------------------------ the hooks


def rows_view(p: torch.Tensor, n: int, call: Call, name: str, aligned: bool) -> torch.Tensor:
    """``p [*shape] -> [n, *shape]``, the stride-0 expansion ``call``'s layer reads, whose
    gradient ``g [n, *shape]`` (the per-sample gradients) goes to ``p.grad_sample`` when the
    backward pass ends (top-aligned if ``aligned``) and whose sum over the rows goes to ``p``
    (:class:`_Rows`)."""

    def add(pend: _Backward, g: torch.Tensor | None, s: torch.Tensor | None) -> None:
        pend.calls[id(call)] = call
        if g is not None:  # None: a fast-clipping rule recorded pieces and passed nothing on
            pend.entry(p, name).add(g.detach(), aligned, s.detach())

    def hook(g: torch.Tensor | None, s: torch.Tensor | None) -> None:
        if _accumulates(p):
            _deliver(lambda pend: add(pend, g, s))

    # (Function.apply without its Python wrapper, which binds the arguments to forward's
    # signature on every call: no torch.func transform is active here, see expanded_call)
    return super(torch.autograd.Function, _Rows).apply(p, n, hook)  # type: ignore[misc]


class _Rows(torch.autograd.Function):
    """``(p [*shape], n, hook) -> p.expand(n, *shape)``; the backward sends ``p`` the sum of
    the rows ``g [n, *shape]`` (as the expansion's own backward does) and hands ``hook`` both
    ``g`` and that sum, so that the check of ``p``'s total (:func:`_check_total`) need not
    sum the rows again. ``g`` None (a fast-clipping rule recorded pieces): ``hook(None, None)``.
    """

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor, n: int, hook: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.hook = hook
        return p.expand(n, *p.shape)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None) -> tuple[Any, None, None]:  # type: ignore[override]
        s = None if g is None else g.sum(0)  # (differentiable under create_graph=True)
        ctx.hook(g, s)
        return s, None, None


def _accumulates(p: torch.Tensor) -> bool:
    """Whether the running backward pass adds into ``p.grad``: rows follow ``.grad``.

    ``backward()`` does (``backward(inputs=...)`` only for its inputs); ``autograd.grad``
    returns gradients and adds into none, so its rows are not delivered: a later
    ``backward()`` of the same forward pass would add them a second time (review h16:
    ``autograd.grad(loss, params)`` then ``loss.backward()`` left ``grad_sample`` at twice
    each example's gradient while ``.grad`` was right). torch refuses to say whether a
    leaf's accumulator runs under ``autograd.grad`` (a RuntimeError), which is how that case
    is told apart."""
    try:
        node = torch.autograd.graph.get_gradient_edge(p).node
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:
        return torch._C._current_graph_task_id() < 0  # (outside the engine: as before, deliver)


def recorder(p: torch.Tensor, log: PieceLog, call: Call, n: int, name: str,
             aligned: bool) -> Callable[[Any, tuple[Any, ...]], None]:
    """``_psg_record`` of ``p``'s expanded view for fast clipping (nothing where the backward
    pass does not accumulate into ``p.grad``, :func:`_accumulates`: autograd.grad, for ``p``
    or for other inputs, and ``backward(inputs=...)`` without ``p``)."""

    def record(kind: Any, data: tuple[Any, ...]) -> None:
        if not _accumulates(p):
            return
        def add(pend: _Backward) -> None:
            pend.calls[id(call)] = call
            pend.entry(p, name).pieces.append((log, kind, data, n, aligned))

        _deliver(add)

    return record


def watch(p: torch.Tensor, name: str) -> None:
    """Give ``p`` (once) the hook that reports the total gradient autograd sends it (a
    gradient already in ``p.grad`` came from a backward pass the hook did not see: rows
    that come while it is there are flagged, see :func:`_flag_plain`)."""
    if _WATCHED.get(id(p)) is p:
        return
    if not _grad_is_clean(p):
        p._psg_plain_pending = "held"  # (of unknown origin: see mark_clean)
    ref = weakref.ref(p)

    def hook(g: torch.Tensor | None) -> None:
        q = ref()
        if q is None or g is None or not _accumulates(q):
            return
        def add(pend: _Backward) -> None:
            e = pend.entry(q, name)
            e.total = g.detach() if e.total is None else e.total + g.detach()

        _deliver(add)

    p.register_hook(hook)
    with _LOCK:
        _WATCHED[id(p)] = p


def watched(p: torch.Tensor) -> bool:
    """Whether a psgfunc layer call has used ``p`` (it carries the total-gradient hook)."""
    return _WATCHED.get(id(p)) is p


def describe(p: torch.Tensor, name: str, layer: Any) -> str:
    """How errors name a parameter: its name in the layer, the layer, its shape."""
    fn = getattr(layer, "__name__", type(layer).__name__)
    return f"parameter {name!r} of the psgfunc layer call {fn}(...) (shape {tuple(p.shape)})"
