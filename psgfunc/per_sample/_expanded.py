"""Expanded weights: per-example parameter copies as stride-0 views, one forward, one backward.

Every parameter ``W`` is replaced by ``W.expand(B, *W.shape)``: a view, no copy. Whatever
consumes that view as example b's weight gets the gradient of example b's loss alone, so a
single backward pass leaves the per-sample gradients ``[B, *W.shape]`` in it.

How a layer consumes the view is decided by a :class:`Rule`, registered for the functional
layer it serves (ARCHITECTURE.md rule 5). A rule computes the layer with the ordinary shared-weight
op (no per-example weight copies in the forward) and produces the per-sample gradient in its
backward, in one contraction. Two drivers use the same rules:

* ``per_sample_grads(method="expanded")`` runs the per-example ``fn`` under ``torch.func.vmap``
  with the expanded params; the rule's entry point is the ``vmap`` staticmethod of an
  ``autograd.Function`` (:class:`_VmapDispatch`), which sees the whole batch at once.
* the ``psgfunc.nn`` shells call :func:`module_call`, which expands each ``nn.Parameter``
  (a differentiable view) and hooks the view to store the per-sample gradient on
  ``p.grad_sample`` while autograd's sum over the batch goes to ``p.grad``.

A layer without a rule, or a parameter that is not a stride-0 expansion (e.g. a weight the
user's ``fn`` computes from the params), falls back to an ordinary vmap of the layer over the
expanded views: correct first, just without the shared-weight shortcut.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import Any, Callable

import optree
import torch
from torch.func import vmap

from psgfunc import _rules
from psgfunc.per_sample import _rows, _torch_ops

try:
    import torch._C._functorch as _functorch

    for _name in ("peek_interpreter_stack", "TransformType", "CVmapInterpreterPtr", "_unwrap_batched",
                  "is_batchedtensor", "pop_dynamic_layer_stack", "push_dynamic_layer_stack", "_add_batch_dim",
                  "RandomnessType"):
        getattr(_functorch, _name)
except (ImportError, AttributeError):  # pragma: no cover - the generic route still works
    _functorch = None

__all__ = ["Rule", "call_rule", "apply_function", "module_call", "is_shared", "shared", "first", "vmap_randomness"]

_RANDOMNESS: contextvars.ContextVar[str] = contextvars.ContextVar("psgfunc_vmap_randomness", default="different")


def vmap_randomness() -> str:
    """``randomness`` of the vmap whose batch a rule is computing (``"error"``, ``"same"`` or
    ``"different"``); ``"different"`` in batch mode (shells), as a batched forward draws.

    A rule that draws random numbers itself (the LSTM's dropout between layers) must follow
    it: ``"error"`` raises, ``"same"`` draws one mask for every example.
    """
    return _RANDOMNESS.get()


_RANDOMNESS_NAMES: dict[Any, str] = {}

_VMAP = _functorch.TransformType.Vmap if _functorch is not None else None
_DIFFERENT = _functorch.RandomnessType.Different if _functorch is not None else None


def _randomness_name(value: Any) -> str:
    """``"error"``/``"same"``/``"different"`` from functorch's enum (its ``.name`` lookup is
    slow enough to show on every layer call, so the names are remembered)."""
    if isinstance(value, str):
        return value
    name = _RANDOMNESS_NAMES.get(value)
    if name is None:
        name = _RANDOMNESS_NAMES[value] = str(value.name).lower()
    return name


class Rule:
    """Batch-level computation of one functional layer with per-example parameters.

    Subclasses implement :meth:`batched`; ``plain`` is the functional layer itself (the
    undecorated function), used for fallbacks.
    """

    def __init__(self, plain: Callable[..., Any]):
        self.plain = plain

    def batched(self, params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """The layer on a batch, in the layer's own batched convention.

        ``params`` leaves are ``[B, *shape]`` views (stride 0 over B when shared). Called with
        ordinary autograd on: it must give each params leaf the per-sample gradient.
        """
        raise NotImplementedError

    def vmapped(self, params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """The layer on per-example args stacked along a new dim 0; outputs batched at dim 0.

        Returns ``NotImplemented`` to ask for the generic fallback. By default the same as
        :meth:`batched`, which is right for layers whose batch dim is dim 0.
        """
        return self.batched(params, *args, **kwargs)

    def tapped(self, tap: Any, params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """The layer on ONE example with its output tapped (``psgfunc.per_sample._tap``).

        Computes the plain layer with the params detached and returns ``tap.out(y, saved,
        build)``; ``build(saved, g)`` later turns the batched ``saved`` tensors and the output
        gradient ``g`` into ``(leaf index, kind, data)`` pieces, those a backward would
        :func:`~psgfunc.per_sample._kinds.emit`. Returns ``NotImplemented`` (the default) to
        run the plain layer with ordinary autograd: its params are then materialised.
        """
        return NotImplemented


def shared(t: torch.Tensor) -> torch.Tensor:
    """The one tensor a ``[B, *shape]`` stride-0 expansion repeats (also for ``B = 0``).

    With gradients enabled and ``t`` the expansion of a module's parameter
    (:func:`expanded_call`), the parameter itself: a rule that uses the shared weight in
    differentiable code (its backward under ``create_graph=True``, whose input gradient a
    gradient penalty differentiates again) cannot tell the examples apart, and a gradient
    through an ``as_strided`` view of the expansion would be spread evenly over its rows,
    silently not each example's own. Sent to the parameter directly, it is a use the rows
    miss, which the check on the parameter's total gradient refuses (``psgfunc.per_sample._rows``).
    """
    p = _differentiable_param(t)
    if p is not None:
        return p
    return t.as_strided(t.shape[1:], t.stride()[1:], t.storage_offset())


def _differentiable_param(t: torch.Tensor) -> torch.Tensor | None:
    """The module parameter ``t`` expands (:func:`expanded_call`), where gradients are on;
    else None (see :func:`shared`)."""
    return getattr(t, "_psg_param", None) if torch.is_grad_enabled() else None


def first(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t[0]`` of an expanded ``[B, *shape]`` param (zeros for ``B = 0``), as a rule's forward
    and backward read the weight; with gradients on, the parameter itself where ``t`` expands
    a module's parameter, as :func:`shared` (a backward under ``create_graph=True``: ``t[0]``
    would send every example's second-order gradient to row 0)."""
    if t is None:
        return None
    p = _differentiable_param(t)
    if p is not None:
        return p
    return t[0] if t.shape[0] > 0 else t.new_zeros(t.shape[1:])


def expand_leaf(p: torch.Tensor, size: int) -> torch.Tensor:
    """``p [*shape] -> [B, *shape]``: a stride-0 view, a leaf that requires grad, which also
    remembers ``p`` (:func:`repeated`)."""
    view = p.expand(size, *p.shape).requires_grad_(True)
    view._psg_repeats = p
    return view


def repeated(t: torch.Tensor) -> torch.Tensor:
    """:func:`shared` of a stride-0 expansion, without an operation where it is an
    :func:`expand_leaf` view (its ``p``). For use where no gradient flows through the result
    (an ``autograd.Function``'s forward and backward): ``p`` carries no history to ``t``."""
    p = getattr(t, "_psg_repeats", None)
    return shared(t) if p is None else p


def versions(*params: torch.Tensor | None) -> tuple[int, ...] | None:
    """The version counters of the expanded ``params`` (None entries skipped) that an
    ``autograd.Function`` keeps by identity on ``ctx`` (not saved) and whose values its
    backward reads, for :func:`check_versions`; None while the compiler traces."""
    if torch.compiler.is_compiling():
        return None
    return tuple(p._version for p in params if p is not None)


def check_versions(kept: tuple[int, ...] | None, where: str, *params: torch.Tensor | None,
                   what: str = "a parameter") -> None:
    """RuntimeError if a parameter changed in place between the forward and this backward.

    A tensor saved with ``save_for_backward`` gets this check from autograd; a parameter kept
    on ``ctx`` by identity (packing the ``[B, *shape]`` expansion under saved-tensor hooks
    would copy it ``B`` times, and the unpacked copy lacks its recorder) needs it here, else
    the backward silently uses the new values (an optimizer step or a ``no_grad`` edit of
    the weight between ``loss = model(x)`` and ``loss.backward()``)."""
    if kept is None:
        return
    now = tuple(p._version for p in params if p is not None)
    if now != kept:
        raise RuntimeError(
            f"psgfunc {where}: {what} the backward pass needs was modified in place after "
            "the forward pass (an optimizer step or an in-place edit between the forward and "
            "the backward); run the forward pass again after the change, or make it out of "
            "place"
        )


def is_shared(t: torch.Tensor) -> bool:
    """Whether ``t``'s dim 0 holds copies of one tensor (stride 0, or size 1)."""
    return t.dim() > 0 and (t.shape[0] <= 1 or t.stride(0) == 0)


def call_rule(rule: Rule, params: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    """Entry point of a registered rule, in whichever expanded mode is active.

    The torch-function rules (:mod:`psgfunc.per_sample._torch_ops`) are off meanwhile: a
    rule's own torch calls need none of them.
    """
    ops = _torch_ops.suspend()
    try:
        return _call_rule(rule, params, args, kwargs)
    finally:
        _torch_ops.resume(ops)


def _call_rule(rule: Rule, params: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    tap = _rules.current_tap()
    if tap is not None:
        out = rule.tapped(tap, params, *args, **kwargs)
        return rule.plain(params, *args, **kwargs) if out is NotImplemented else out
    mode = _rules.expanded_mode_kind()
    if mode == "batch":
        return rule.batched(params, *args, **kwargs)
    out = _call_batched(rule, params, args, kwargs)
    if out is not NotImplemented:
        return out
    names = [k for k, v in params.items() if v is not None]
    arg_leaves, arg_spec = optree.tree_flatten(args, none_is_leaf=True)
    flat = [params[k] for k in names] + arg_leaves
    meta = _Meta(rule, names, arg_spec, kwargs)
    out = _VmapDispatch.apply(meta, *flat)
    return optree.tree_unflatten(meta.out_spec, list(out)) if meta.out_spec is not None else out


def _call_batched(rule: Rule, params: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The rule on the whole batch when the innermost transform is our vmap; else NotImplemented.

    What ``_VmapDispatch``'s vmap staticmethod does, without torch's generic
    ``autograd.Function``-under-vmap machinery (pytree passes over every operand and a
    signature bind per call: about 0.3 ms per layer call, several times the layer's own cost
    on small layers). The tensors are unwrapped from the current vmap level, the rule runs
    with that level popped (plain tensors, ordinary autograd) and its outputs are wrapped
    back. Anything unusual (no vmap on top, nothing batched, a non-shared parameter, a rule
    declining) returns NotImplemented and takes the ``_VmapDispatch`` route.
    """
    if _functorch is None:  # pragma: no cover - torch without the functorch C API
        return NotImplemented
    interpreter = _functorch.peek_interpreter_stack()
    if interpreter is None or interpreter.key() != _VMAP:
        return NotImplemented
    level = interpreter.level()
    vmap_info = _functorch.CVmapInterpreterPtr(interpreter)
    size = vmap_info.batchSize()
    batch_params, batched = {}, False
    for name, t in params.items():
        if t is None:
            continue
        got = _unwrapped(t, level, size)
        if got is None:
            return NotImplemented
        value, b = got
        batched = batched or b
        # (an expand_leaf view is shared by construction)
        if getattr(value, "_psg_repeats", None) is None and not is_shared(value):
            return NotImplemented
        batch_params[name] = value
    # args of tensors only (a layer's usual call): no pytree pass
    flat = all(isinstance(a, torch.Tensor) for a in args)
    arg_leaves, arg_spec = (args, None) if flat else optree.tree_flatten(args, none_is_leaf=True)
    moved = []
    for t in arg_leaves:
        if isinstance(t, torch.Tensor):
            got = _unwrapped(t, level, size)
            if got is None:
                return NotImplemented
            t, b = got
            batched = batched or b
        moved.append(t)
    if not batched:
        return NotImplemented
    batch_args = tuple(moved) if flat else optree.tree_unflatten(arg_spec, moved)
    randomness = vmap_info.randomness()
    token = None
    if randomness != _DIFFERENT or _RANDOMNESS.get() != "different":
        randomness = _randomness_name(randomness)
        token = _RANDOMNESS.set(randomness) if randomness != _RANDOMNESS.get() else None
    try:
        out = _below_level(rule.vmapped, batch_params, *batch_args, **kwargs)
    finally:
        if token is not None:
            _RANDOMNESS.reset(token)
    if out is NotImplemented:
        return NotImplemented
    if isinstance(out, torch.Tensor):
        return _functorch._add_batch_dim(out, 0, level)
    return optree.tree_map(
        lambda o: _functorch._add_batch_dim(o, 0, level) if isinstance(o, torch.Tensor) else o,
        out, none_is_leaf=True,
    )


def call_collected(layer: Callable[..., Any], params: dict[str, Any], x: Any) -> Any:
    """``layer(x, params)`` on the whole batch, for eager fast clipping's own pass
    (:func:`psgfunc.per_sample._clip.grad_pieces`), where every non-None param is an
    :func:`expand_leaf` view its :class:`~psgfunc.per_sample._kinds.Collector` tracks with
    ``outputs=True``, batched at dim 0 of the innermost vmap, and ``x`` is one tensor batched
    there; else NotImplemented (the caller takes :func:`call_rule`).

    :func:`_call_batched` for that one case, without its generic passes (a dict of params,
    the args' pytree, the randomness of the vmap level): on a small MLP those cost about as
    much per layer call as the layer's own glue. ``layer(x [B, ...], params)`` runs with the
    level popped (plain tensors, ordinary autograd) and must draw no random numbers; it
    returns the batched output, or None to decline (then NotImplemented).
    """
    if _functorch is None or _rules.current_tap() is not None or _rules.expanded_mode_kind() != "vmap":
        return NotImplemented
    interpreter = _functorch.peek_interpreter_stack()
    if interpreter is None or interpreter.key() != _VMAP or not isinstance(x, torch.Tensor):
        return NotImplemented
    level = interpreter.level()
    views = {}
    for name, t in params.items():
        if t is not None:
            t, dim = _functorch._unwrap_batched(t, level)
            if dim != 0 or getattr(t, "_psg_outputs", None) is None:
                return NotImplemented
        views[name] = t
    x, dim = _functorch._unwrap_batched(x, level)
    if dim is None or _functorch.is_batchedtensor(x):
        return NotImplemented
    x = x if dim == 0 else x.movedim(dim, 0)
    ops = _torch_ops.suspend()
    try:
        out = _below_level(layer, x, views)
    finally:
        _torch_ops.resume(ops)
    return NotImplemented if out is None else _functorch._add_batch_dim(out, 0, level)


def _below_level(run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``run(*args, **kwargs)`` with the innermost vmap level popped (plain tensors,
    ordinary autograd) and the expanded mode ``"batch"``, both restored afterwards: how
    :func:`_call_batched` and :func:`call_collected` run a rule on the whole batch."""
    saved = _functorch.pop_dynamic_layer_stack()
    mode = _rules.enter_mode("batch")
    try:
        return run(*args, **kwargs)
    finally:
        _rules.exit_mode(mode)
        _functorch.push_dynamic_layer_stack(saved)


def _unwrapped(t: torch.Tensor, level: int, size: int) -> tuple[torch.Tensor, bool] | None:
    """``(t`` at vmap ``level`` with its batch dim first, whether it had one``)`` for
    :func:`_call_batched`: a tensor the examples share (a closure weight) expanded to
    ``[size, ...]``; None where it is batched at an outer level too."""
    value, dim = _functorch._unwrap_batched(t, level)
    if _functorch.is_batchedtensor(value):
        return None
    if dim is None:
        return value.unsqueeze(0).expand(size, *value.shape), False
    return (value if dim == 0 else value.movedim(dim, 0)), True  # dim 0: the same object


def apply_function(cls: type[torch.autograd.Function], *args: Any) -> Any:
    """``cls.apply(*args)`` for a rule's ``autograd.Function`` (positional args only).

    Outside functorch transforms this skips ``Function.apply``'s Python wrapper, which binds
    the arguments to ``forward``'s signature on every call (``inspect.signature``: a few
    times the cost of a small layer); inside one, the ordinary ``apply``.
    """
    if torch._C._are_functorch_transforms_active():
        return cls.apply(*args)
    return super(torch.autograd.Function, cls).apply(*args)  # type: ignore[misc]


class _Meta:
    """Non-tensor context passed through ``_VmapDispatch.apply``."""

    def __init__(self, rule: Rule, names: list[str], arg_spec: Any, kwargs: dict[str, Any]):
        self.rule, self.names, self.arg_spec, self.kwargs = rule, names, arg_spec, kwargs
        self.out_spec: Any = None

    def split(self, flat: tuple[Any, ...]) -> tuple[dict[str, Any], tuple[Any, ...]]:
        n = len(self.names)
        params = dict(zip(self.names, flat[:n]))
        args = optree.tree_unflatten(self.arg_spec, list(flat[n:]))
        return params, args

    def flatten_out(self, out: Any) -> tuple[Any, ...]:
        if isinstance(out, torch.Tensor):
            self.out_spec = None
            return out
        leaves, self.out_spec = optree.tree_flatten(out, none_is_leaf=True)
        return tuple(leaves)


class _VmapDispatch(torch.autograd.Function):
    """Runs a rule on the whole batch when a dispatchable layer is called under vmap."""

    @staticmethod
    def forward(meta: _Meta, *flat: Any) -> Any:  # type: ignore[override]
        # Reached only outside vmap (an expanded-mode call on one example): the plain layer.
        params, args = meta.split(flat)
        return meta.flatten_out(meta.rule.plain(params, *args, **meta.kwargs))

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # pragma: no cover - never recorded
        raise RuntimeError(
            "psgfunc: an expanded-mode layer was differentiated outside vmap; use "
            "per_sample_grads(method='expanded') rather than calling the layer in expanded mode"
        )

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], meta: _Meta, *flat: Any) -> Any:
        size = info.batch_size
        dims = in_dims[1:]
        moved = []
        for t, d in zip(flat, dims):
            if not isinstance(t, torch.Tensor):
                moved.append(t)
            elif d is None:
                # unbatched: a constant the example shares (params: a closure weight)
                moved.append(t.unsqueeze(0).expand(size, *t.shape))
            else:
                moved.append(t if d == 0 else t.movedim(d, 0))  # d == 0: keep the object (emit reads its attributes)
        params, args = meta.split(tuple(moved))
        out = NotImplemented
        nested = _functorch is not None and any(
            isinstance(t, torch.Tensor) and _functorch.is_batchedtensor(t) for t in moved
        )  # a vmap inside fn: tensors still batched at the outer level reach the plain layer
        if not nested and all(is_shared(p) for p in params.values()):
            # layers the rule calls on the batch run their own rules in batch mode
            token = _RANDOMNESS.set(_randomness_name(info.randomness))
            try:
                with _rules.expanded_mode("batch"):
                    out = meta.rule.vmapped(params, *args, **meta.kwargs)
            finally:
                _RANDOMNESS.reset(token)
        if out is NotImplemented:
            plain, kwargs = meta.rule.plain, meta.kwargs

            def one(*row: Any) -> Any:
                p, a = meta.split(row)
                return plain(p, *a, **kwargs)

            row_dims = tuple(0 if isinstance(t, torch.Tensor) else None for t in moved)
            out = vmap(one, in_dims=row_dims)(*moved)
        flat_out = meta.flatten_out(out)
        if isinstance(flat_out, torch.Tensor):
            return flat_out, 0
        return flat_out, tuple(None if o is None else 0 for o in flat_out)


def module_call(
    layer: Callable[..., Any],
    params: dict[str, torch.Tensor],
    size: int,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Call ``layer`` on a batch of ``size`` examples, leaving ``.grad_sample`` on ``params``.

    Each parameter ``p`` that requires grad is expanded to ``[size, *p.shape]`` (a view,
    :func:`~psgfunc.per_sample._rows.rows_view`); the view's backward hands the per-sample
    gradients over, added to ``p.grad_sample`` when the backward pass ends, and sends ``p``
    their sum over the batch, which gives ``p.grad`` as usual. A parameter that a
    fast-clipping ``DPOptimizer`` records for gets the rules' pieces recorded instead, and
    neither ``grad_sample`` nor ``grad`` from them.

    Rows are examples: a backward pass adds rows only to rows of the same forward pass, and
    a parameter's rows must cover all its uses in the backward pass; see
    :mod:`psgfunc.per_sample._rows` for what raises ``ValueError`` and when.
    """
    return expanded_call(layer, params, size, args, kwargs)


def watch_params(params: Mapping[str, torch.Tensor | None], layer: Any) -> None:
    """Give the trainable ``params`` of ``layer``'s call made without gradients the hook on
    their total gradient (:func:`psgfunc.per_sample._rows.watch`), as a call with gradients
    does: a reentrant checkpoint's first forward runs so, and its backward reruns the call,
    whose own watch would come after a use of the parameter outside the checkpoint had sent
    it its gradient, unseen."""
    for name, p in params.items():
        if p is not None and p.requires_grad and not _rows.watched(p):
            _rows.watch(p, _rows.describe(p, name, layer))


def expanded_call(
    layer: Callable[..., Any],
    params: dict[str, torch.Tensor | None],
    size: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    top_aligned: bool = False,
) -> Any:
    """:func:`module_call` with its arguments as a tuple and a dict.

    ``top_aligned=True``: calls of one forward pass on different batch sizes add up, a call
    on ``n`` examples to rows ``0..n-1`` (a packed sequence's steps, whose batch shrinks to
    the first ``batch_sizes[t]`` sequences): ``DPLSTMCell``, ``LSTMLinear``.
    """
    if torch._C._are_functorch_transforms_active():
        # a shell inside torch.func transforms (functional_call under vmap/grad, per_sample_grads):
        # the transforms give the per-sample gradients; the layer (its rule, in expanded mode) runs as is
        return layer(params, *args, **kwargs)
    if not torch.is_grad_enabled():
        watch_params(params, layer)
    expanded: dict[str, torch.Tensor | None] = {}
    call = None
    for name, p in params.items():
        if p is None:
            expanded[name] = None
            continue
        if p.requires_grad and torch.is_grad_enabled():
            call = _rows.Call() if call is None else call
            where = _rows.describe(p, name, layer)
            # (its backward hands the rows over: ops without a rule give them too)
            e = _rows.rows_view(p, size, call, where, top_aligned)
            _rows.watch(p, where)
            log = _rows.log_of(p)
            if log is not None:  # fast clipping (DPOptimizer): record pieces, build nothing
                if log.pieces and log.batch != size and not top_aligned:
                    raise ValueError(
                        f"psgfunc: {where} was used on batches of {log.batch} and {size} "
                        "examples in one step; use one batch per forward pass and call "
                        "DPOptimizer.accumulate(), step() or zero_grad() in between"
                    )
                e._psg_record = _rows.recorder(p, log, call, size, where, top_aligned)
            e._psg_param = p  # shared(e) with gradients on: p, never a view spreading over the rows
        else:
            e = p.expand(size, *p.shape)
        expanded[name] = e
    with _rules.expanded_mode("batch"):
        return layer(expanded, *args, **kwargs)
