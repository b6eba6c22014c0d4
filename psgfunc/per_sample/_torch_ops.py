"""Torch functions with per-sample handling: a registry ``torch function -> rule``.

psgfunc's own layers (``psgfunc.functional``) reach their per-sample rules through
:mod:`psgfunc._rules`. A model written with ``torch.nn`` modules or ``torch.nn.functional``
calls torch's functions instead, and inside ``fn`` those run under ``torch.func.vmap``: with
``method="vmap"`` over the example's inputs, with ``method="expanded"`` also over the stride-0
``[B, *shape]`` expanded params. For most functions that is exact. For a few it is not, or it
fails with an error that does not say what to do:

* ``F.embedding(padding_idx=p)`` with a batched weight (the expanded params) and batched
  indices: torch's batching rule for ``aten::embedding`` (functorch's BatchRulesModules)
  looks up ONE flattened ``[B*V, D]`` table with example b's indices offset by ``b*V`` but
  keeps ``padding_idx = p``, so its backward zeroes row p of the flattened table, the FIRST
  example's padding row only; every later example that holds a padding token gets a nonzero
  gradient there. It also copies the stride-0 table B times in the forward. Under ``"expanded"`` the call is routed to
  psgfunc's embedding rule (shared-table lookup, per-sample gradient in one ``index_add_``,
  fast-clipping pieces), elsewhere the padding positions' output is detached (exact zeros).
* ``max_norm=`` (F.embedding, F.embedding_bag) renormalises rows of the weight IN PLACE during
  the forward: refused (each example would change the table that the others read).
* ``sparse=True``: the per-sample gradients are dense ``[B, V, D]`` tensors anyway, so the
  lookup runs with ``sparse=False`` (same values; torch's vmap has no sparse batching).
* out-of-range indices: ``ValueError`` naming the layer, the bad index and ``V``.
* ``F.batch_norm`` in training mode (running statistics updated in place, or one value per
  channel because the example is alone) and ``F.instance_norm`` with running statistics:
  ``ValueError`` with the fix.

While ``per_sample_grads`` (every method) and ``clipped_grad_sum`` run ``fn``, a
:class:`torch.overrides.TorchFunctionMode` (:func:`active`) hands every torch function that
``fn`` calls and that is registered here to its rule; everything else runs untouched. The
compiled fast-clipping route (``psgfunc.per_sample._tap``) runs ``fn`` under the same mode
(:func:`tapping`, method ``"expanded"``), traced by ``torch.compile``: there the parameters
are the tap's leaves, known by identity and their views by ``_base``, and the rules' psgfunc
layers take their ``tapped`` paths. The
mode is suspended while psgfunc's own rules run (:func:`suspend`), so it costs one Python
call (~3 us) per torch function called directly by ``fn``, none inside psgfunc layers.

Extending: ``@register(F.some_function)`` on ``rule(method, func, args, kwargs)``, which
returns the result, or ``NotImplemented`` to run ``func`` unchanged. ``method`` is
``"vmap"`` (params unbatched, inputs batched), ``"expanded"`` (params are batched stride-0
expansions: a per-sample rule may replace the op) or ``"loop"`` (one example, no transform:
used to explain a failure). Inside a rule the mode is off, so calling ``func`` does not
recurse.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import types
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from psgfunc.functional.embedding import _normalize_padding_idx, _values

try:
    import torch._C._functorch as _functorch

    for _name in ("is_functorch_wrapped_tensor", "is_batchedtensor", "get_unwrapped"):
        getattr(_functorch, _name)
except (ImportError, AttributeError):  # pragma: no cover - then values under vmap stay hidden
    _functorch = None

__all__ = ["register", "register_layer", "rule_for", "active", "tapping", "suspend", "resume", "param_of", "METHODS"]

METHODS = ("vmap", "expanded", "loop")

Rule = Callable[[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]

_RULES: dict[Callable[..., Any], Rule] = {}


def register(*torch_fns: Callable[..., Any]) -> Callable[[Rule], Rule]:
    """Register ``rule(method, func, args, kwargs)`` for the torch functions ``torch_fns``.

    The key is the function object torch passes to ``__torch_function__`` (the public one,
    e.g. ``torch.nn.functional.embedding``). A later registration replaces an earlier one.
    """

    def decorate(rule: Rule) -> Rule:
        for fn in torch_fns:
            _RULES[fn] = rule
            name = getattr(fn, "__name__", None)
            _BY_NAME[name] = tuple((f, r) for f, r in _BY_NAME.get(name, ()) if f is not fn) + ((fn, rule),)
        return rule

    return decorate


_BY_NAME: dict[Any, tuple[tuple[Callable[..., Any], Rule], ...]] = {}
"""``_RULES`` by the functions' ``__name__``, for :func:`_rule_of` under ``torch.compile``."""


def _rule_of(func: Any) -> Rule | None:
    """``_RULES.get(func)``; under ``torch.compile`` by name, then identity: the compiler
    guards a dict lookup keyed by some Python-level Tensor methods (``Tensor.__rsub__``,
    ``__rdiv__``) wrongly and fails its own guard."""
    if not torch.compiler.is_compiling():
        return _RULES.get(func)
    for fn, rule in _BY_NAME.get(getattr(func, "__name__", None), ()):
        if fn is func:
            return rule
    return None


def rule_for(torch_fn: Callable[..., Any]) -> Rule | None:
    """The rule registered for ``torch_fn``, or None."""
    return _RULES.get(torch_fn)


class _Mode(TorchFunctionMode):
    """Hands registered torch functions to their rules (torch pops the mode meanwhile).

    ``params``: the parameters ``fn`` differentiates (under ``"expanded"`` the ``[B, *shape]``
    views, as the transforms wrap them); their views by transposition are tracked too
    (:func:`param_of`). An op without a rule that takes one of them warns once, naming it.
    """

    def __init__(self, method: str, params: Any = (), tap: Any = None):
        super().__init__()
        self.method = method
        self.params: dict[int, Any] = {id(p): (p, None) for p in params}
        self.keep: list[Any] = []  # views whose ids are in params: alive while the mode is
        self.tap = tap  # a tapped pass (psgfunc.per_sample._tap): its leaves, by identity
        # whether a torch function was handed a parameter (or a view of one), a rule served
        # one, or a transparent function ran: what the mode is for (see _clip._OPS_UNUSED)
        self.saw_param = False

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        # metadata (shape, dim, ...): the most frequent calls, never a rule (not while the
        # compiler traces: it guards lookups keyed by Tensor methods wrongly, see _rule_of)
        if not torch.compiler.is_compiling() and func in _QUIET:
            return func(*args, **kwargs)
        rule = _rule_of(func)
        if rule is not None:
            _STACK.append(self)
            try:
                out = rule(self.method, func, args, kwargs)
            finally:
                _STACK.pop()
            if out is _PLAIN:
                return func(*args, **kwargs)
            self.saw_param = True  # (also for NotImplemented: a rule that declined a call)
            if out is not NotImplemented:
                return out
        if torch.compiler.is_compiling():
            # a tapped pass: nothing to track or warn about (views: _tapped_param), and no
            # lookups keyed by func (see _rule_of). Transparent functions run plainly: the
            # compiler fails on Python-level Tensor methods inside them under the mode, so
            # where the eager planning run saw rules inside, the step plans without the mode
            return func(*args, **kwargs)
        if func in _TRANSPARENT and self.method != "loop" and (
                self.tap is not None or torch._C._are_functorch_transforms_active()):
            self.saw_param = True
            return _run_transparent(self, func, args, kwargs)
        if not self.params and self.tap is None:
            return func(*args, **kwargs)
        _STACK.append(self)
        try:
            used = [t for t in _tensors(args, kwargs) if param_of(t) is not None]
        finally:
            _STACK.pop()
        if not used:
            return func(*args, **kwargs)
        self.saw_param = True
        out = func(*args, **kwargs)
        view = _VIEWS.get(func)
        if view is not None and isinstance(out, torch.Tensor) and len(used) == 1:
            _STACK.append(self)
            try:
                leaf, perm = param_of(used[0])
            finally:
                _STACK.pop()
            if perm is None:
                leaf = used[0]  # the parameter as fn sees it (wrapped by the transforms)
            if self.tap is None:  # (a tapped pass reads views from the tensor: _tapped_param)
                self.params[id(out)] = (leaf, view(perm, used[0], args, kwargs))
                self.keep.append(out)
            return out
        # (a tapped pass's leaves that such ops reach are materialised by the compiled route,
        # which says so itself)
        if self.method == "expanded" and self.tap is None and _differentiable(out) and not torch.compiler.is_compiling():
            _warn_fallback(func)
        return out


_STACK: list[_Mode] = []
"""The mode whose rule runs now (torch pops the mode itself while a rule runs)."""


def param_of(t: Any) -> tuple[Any, tuple[int, ...] | None] | None:
    """``(param, perm)`` when ``t`` is a parameter of the running ``fn`` (``perm`` None;
    ``param`` then as the transforms hold it, use ``t`` itself) or a transposition of one
    (``t = param.permute(perm)``, ``param`` as ``fn`` saw it; ``perm`` ``()``: another view);
    None otherwise. Only valid inside a rule or the mode."""
    if not _STACK or not isinstance(t, torch.Tensor):
        return None
    mode = _STACK[-1]
    if mode.tap is not None:
        return _tapped_param(mode, t)
    params = mode.params
    hit = params.get(id(t))
    if hit is not None:
        return hit
    while _functorch is not None and _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
        hit = params.get(id(t))
        if hit is not None:
            return hit
    return None


def _tapped_param(mode: _Mode, t: torch.Tensor) -> tuple[Any, tuple[int, ...] | None] | None:
    """:func:`param_of` in a tapped pass, by identity (``is`` is what ``torch.compile``
    traces; ``id()`` and functorch's unwrapping are not): a leaf of the tap, or a view of one
    (``t._base``; the compiler does not show the mode ``.T``/``.mT``, so views are read from
    the tensor, not tracked), a transposition where its layout is one."""
    tap = mode.tap
    if tap.index(t) is not None:
        return t, None
    base = t._base
    if base is None or tap.index(base) is None:
        return None
    return base, _permutation(t, base)


def _permutation(t: torch.Tensor, base: torch.Tensor) -> tuple[int, ...]:
    """``perm`` with ``t`` laid out as ``base.permute(perm)`` (``t`` a view of ``base``), or
    ``()`` where it is another view. Read from sizes and strides (each of ``t``'s dims is one
    of ``base``'s: the same elements in the same places; size-1 dims, whose strides mean
    nothing, pair up in order)."""
    if t.dim() != base.dim() or t.numel() != base.numel() or t.numel() == 0:
        return ()
    if not torch.compiler.is_compiling() and t.storage_offset() != base.storage_offset():
        return ()  # (the compiler cannot read it: a traced pass that differs is not used)
    free = list(range(base.dim()))
    perm = []
    for size, stride in zip(t.shape, t.stride()):
        match = next((d for d in free if base.shape[d] == size and (size == 1 or base.stride(d) == stride)), None)
        if match is None:
            return ()
        free.remove(match)
        perm.append(match)
    return tuple(perm)


def _transformed() -> bool:
    """Whether ``fn`` runs as one example of a batch: under a functorch transform, or in a
    tapped pass (whose eager planning run makes the same calls as its traced pass)."""
    return (bool(_STACK) and _STACK[-1].tap is not None) or torch._C._are_functorch_transforms_active()


def _per_sample_weight(weight: Any) -> bool:
    """Whether a lookup's ``weight`` goes to psgfunc's rule: a tapped leaf in a tapped pass,
    else the expanded params (batched)."""
    if _STACK and _STACK[-1].tap is not None:
        return _direct(weight)
    return _is_batched(weight)


def _tensors(args: Any, kwargs: Any) -> list[torch.Tensor]:
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def _differentiable(out: Any) -> bool:
    leaves = out if isinstance(out, (list, tuple)) else (out,)
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in leaves)


_WARNED: set[str] = set()


def _name(func: Any) -> str:
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None) or ""
    if qual.startswith(("TensorBase.", "_TensorBase.")):
        return "torch.Tensor." + qual.split(".", 1)[1]
    if qual.startswith("_VariableFunctionsClass."):
        return "torch." + qual.split(".", 1)[1]
    if module.startswith("torch._C._nn") or module == "torch.nn.functional":
        return "torch.nn.functional." + qual
    return f"{module}.{qual}" if module and not qual.startswith(module) else qual


def _warn_fallback(func: Any) -> None:
    """Warn once per op that a parameter reached it without a per-sample rule."""
    name = _name(func)
    if name in _WARNED:
        return
    _WARNED.add(name)
    warnings.warn(
        f"psgfunc: {name} takes a parameter and has no per-sample rule, so that parameter's "
        "per-sample gradient comes from torch's vmap (exact, but materialised: B times its "
        "size in memory, also under fast clipping); register a rule with "
        "psgfunc.per_sample._torch_ops.register, or use a psgfunc.functional layer",
        UserWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def active(method: str, params: Any = ()) -> Iterator[_Mode | None]:
    """Within this block, torch functions that ``fn`` calls go through the registered rules.
    Yields the mode (None while the compiler traces): its ``saw_param`` says afterwards
    whether ``fn`` handed any of ``params`` to a torch function.

    ``params``: the tensors ``fn`` differentiates (as ``fn`` sees them, or the tensors a
    functorch transform wraps), so that rules recognise them (:func:`param_of`).
    Off while ``torch.compile`` traces (``id()`` lookups and functorch's unwrapping do not
    trace); the compiled fast-clipping route enters its own mode, :func:`tapping`, which does.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if torch.compiler.is_compiling():
        yield None
        return
    with _Mode(method, params) as mode:
        yield mode


def tapping(tap: Any) -> _Mode:
    """The mode for a tapped pass (``psgfunc.per_sample._tap``), entered as ``with
    tapping(tap):`` around ``fn``, also while ``torch.compile`` traces (which traces the
    mode: plain ``with``, no generator). Torch functions that take one of ``tap``'s leaves
    (or a view of one) go to the ``"expanded"`` rules, whose psgfunc rules then take their
    ``tapped`` path; leaves are recognised by identity (:meth:`Tap.index`)."""
    return _Mode("expanded", tap=tap)


def suspend() -> Any:
    """Pop the mode if it is the innermost torch-function mode; returns it for :func:`resume`.

    psgfunc's rules call it on entry: their own torch calls need no rules and should not pay
    the mode's per-call cost.
    """
    n = torch._C._len_torch_function_stack()
    if n and isinstance(torch._C._get_function_stack_at(n - 1), _Mode):
        return torch._C._pop_torch_function_stack()
    return None


def resume(mode: Any) -> None:
    """Push back what :func:`suspend` popped (None: nothing)."""
    if mode is not None:
        torch._C._push_on_torch_function_stack(mode)


# --- helpers ---------------------------------------------------------------------------------


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_EMPTY = inspect.Parameter.empty

_SPECS: dict[Any, Any] = {}
"""``fn -> ((name, kind, default), ...)`` or None (a signature with ``*args``/``**kwargs``):
read eagerly once, so that :func:`_bind` under ``torch.compile`` (a tapped pass, whose eager
planning run bound the same functions first) never traces ``inspect``, which dynamo gets
wrong for some of torch's signatures."""


def _spec(fn: Callable[..., Any]) -> Any:
    if fn in _SPECS:
        return _SPECS[fn]
    params = inspect.signature(fn).parameters.values()
    spec = None
    if all(p.kind in _POSITIONAL or p.kind == inspect.Parameter.KEYWORD_ONLY for p in params):
        spec = tuple((p.name, p.kind, p.default) for p in params)
    _SPECS[fn] = spec
    return spec


def _bind(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """All of ``fn``'s arguments by name, defaults filled in (``TypeError`` as a call would)."""
    spec = _spec(fn)
    if spec is None:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    given: dict[str, Any] = {}
    positional = [name for name, kind, _ in spec if kind in _POSITIONAL]
    if len(args) > len(positional):
        raise TypeError(f"{fn.__name__}() takes {len(positional)} positional arguments, got {len(args)}")
    for name, value in zip(positional, args):
        given[name] = value
    for name, value in kwargs.items():
        if name in given or not any(n == name and k != inspect.Parameter.POSITIONAL_ONLY for n, k, _ in spec):
            raise TypeError(f"{fn.__name__}() got an unexpected or repeated argument {name!r}")
        given[name] = value
    out = {}
    for name, _, default in spec:
        if name in given:
            out[name] = given[name]
        elif default is _EMPTY:
            raise TypeError(f"{fn.__name__}() missing argument {name!r}")
        else:
            out[name] = default
    return out


def _is_batched(t: Any) -> bool:
    """Whether ``t`` carries a vmap batch dim at some level (e.g. an expanded param)."""
    if _functorch is None or not isinstance(t, torch.Tensor):
        return False
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


def _out_of_range(idx: Any, size: int) -> int | None:
    """An index of ``idx`` outside ``[0, size)`` (read through vmap), or None."""
    if not isinstance(idx, torch.Tensor):
        return None
    values = _values(idx)  # under vmap: every example's indices
    if values.numel() == 0 or values.is_floating_point() or values.is_complex():
        return None
    try:
        lo, hi = int(values.min()), int(values.max())
    except RuntimeError:  # pragma: no cover - meta tensors and the like
        return None
    if lo < 0:
        return lo
    return hi if hi >= size else None


def _range_error(layer: str, bad: int, size: int) -> ValueError:
    return ValueError(
        f"{layer}: input holds index {bad}, outside [0, {size}) (num_embeddings = "
        f"weight.shape[0] = {size}); check that the token ids fit the table (e.g. the "
        "tokenizer's vocabulary size against the model's vocab_size) and are not negative"
    )


def _refuse_max_norm(layer: str, max_norm: Any) -> None:
    if max_norm is not None:
        raise ValueError(
            f"{layer}(max_norm={max_norm}) (an nn.Embedding/nn.EmbeddingBag built with "
            "max_norm) renormalises rows of the weight IN PLACE during the forward, so each "
            "example would change the table the other examples read; per-sample gradients "
            "refuse it. Build the layer without max_norm (renormalise the table between steps "
            "under torch.no_grad() if you need bounded rows)"
        )


# --- embeddings ------------------------------------------------------------------------------


def _embedding_lookup(
    method: str, idx: Any, weight: torch.Tensor, padding_idx: int | None, scale_grad_by_freq: bool, layer: str
) -> torch.Tensor:
    """``weight[idx]`` with ``padding_idx``'s row getting a zero gradient in every example."""
    size = weight.shape[0]
    padding_idx = _normalize_padding_idx(padding_idx, size, layer)
    if method == "expanded" and not scale_grad_by_freq and _per_sample_weight(weight):
        # the expanded params: psgfunc's rule looks up the shared table once and gives each
        # example its own gradient (and its pieces to fast clipping)
        from psgfunc.per_sample._expanded import call_rule
        from psgfunc.per_sample.rules.embedding import EMBEDDING

        return call_rule(EMBEDDING, {"weight": weight}, idx, padding_idx=padding_idx)
    try:
        out = F.embedding(idx, weight, None, None, 2.0, scale_grad_by_freq, False)
    except IndexError as err:
        bad = _out_of_range(idx, size)
        if bad is None:
            raise
        raise _range_error(layer, bad, size) from err
    if padding_idx is not None:
        # torch's padding_idx under vmap with a batched weight zeroes the padding row of the
        # first example only; stopping the gradient at the padding positions is exact for any
        # weight (values unchanged, the padding row gets a sum of exact zeros)
        out = torch.where((idx != padding_idx).unsqueeze(-1), out, out.detach())
    return out


@register(F.embedding)
def _embedding(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a = _bind(F.embedding, args, kwargs)
    _refuse_max_norm("F.embedding", a["max_norm"])
    return _embedding_lookup(
        method, a["input"], a["weight"], a["padding_idx"], bool(a["scale_grad_by_freq"]), "F.embedding"
    )


def _torch_embedding_signature(
    weight: Any, indices: Any, padding_idx: int = -1, scale_grad_by_freq: bool = False, sparse: bool = False
) -> None:  # pragma: no cover - signature only
    """``torch.embedding``'s arguments (a C function without an introspectable signature)."""


@register(torch.embedding)
def _torch_embedding(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a = _bind(_torch_embedding_signature, args, kwargs)
    weight, padding_idx = a["weight"], a["padding_idx"]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return NotImplemented  # torch's own error
    # torch.embedding: a negative padding_idx means none (F.embedding normalises before it)
    padding_idx = padding_idx if padding_idx is not None and padding_idx >= 0 else None
    return _embedding_lookup(
        method, a["indices"], weight, padding_idx, bool(a["scale_grad_by_freq"]), "torch.embedding"
    )


@register(F.embedding_bag)
def _embedding_bag(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # torch's vmap of embedding_bag (a per-example loop inside torch) is exact for every mode,
    # padding_idx and per_sample_weights: only max_norm, sparse and the error need handling
    a = _bind(F.embedding_bag, args, kwargs)
    _refuse_max_norm("F.embedding_bag", a["max_norm"])
    idx, offsets = a["input"], a["offsets"]
    if (method == "expanded" and not a["scale_grad_by_freq"] and _per_sample_weight(a["weight"])
            and isinstance(idx, torch.Tensor) and (idx.dim() == 2) == (offsets is None)):
        # the expanded params: psgfunc's rule (one call on the shared table, per-sample
        # gradients as an embedding scatter, fast-clipping pieces)
        from psgfunc.per_sample._expanded import call_rule
        from psgfunc.per_sample.rules.embedding_bag import EMBEDDING_BAG

        return call_rule(EMBEDDING_BAG, {"weight": a["weight"]}, idx, offsets, a["per_sample_weights"],
                         mode=a["mode"], padding_idx=a["padding_idx"],
                         include_last_offset=a["include_last_offset"])
    a["sparse"] = False
    try:
        return F.embedding_bag(**a)
    except RuntimeError as err:
        weight = a["weight"]
        size = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
        bad = None if size is None else _out_of_range(a["input"], size)
        if bad is None:
            raise
        raise _range_error("F.embedding_bag", bad, size) from err


# --- normalisation with batch statistics -----------------------------------------------------

_MIXES = (
    "per-sample gradients run fn on each example alone; use model.eval() (fixed running "
    "statistics), or replace BatchNorm by nn.GroupNorm(num_groups, num_channels) or "
    "nn.LayerNorm, which normalise each example on its own (psgfunc.nn.convert refuses "
    "BatchNorm for the same reason)"
)


@register(F.batch_norm)
def _batch_norm(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a = _bind(F.batch_norm, args, kwargs)
    if not a["training"]:
        return NotImplemented
    if a["running_mean"] is not None or a["running_var"] is not None:
        raise ValueError(
            "F.batch_norm(training=True) with running_mean/running_var (a BatchNorm layer in "
            "training mode): it would update the running statistics in place from every "
            "example, which per-sample gradients cannot do (and which would release "
            "statistics of the training data outside DP-SGD's accounting); " + _MIXES
        )
    x = a["input"]
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] > 0:
        if x.numel() // x.shape[1] == 1:  # torch: "Expected more than 1 value per channel"
            raise ValueError(
                f"F.batch_norm(training=True) got an input of shape {tuple(x.shape)}: one value "
                "per channel, because BatchNorm normalises over the batch and inside fn the "
                "example is alone (with a batch dim of 1); " + _MIXES
            )
    return NotImplemented


@register(F.instance_norm)
def _instance_norm(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a = _bind(F.instance_norm, args, kwargs)
    if a["use_input_stats"] and (a["running_mean"] is not None or a["running_var"] is not None):
        raise ValueError(
            "F.instance_norm with running_mean/running_var and use_input_stats=True (an "
            "InstanceNorm layer with track_running_stats=True in training mode) updates the "
            "running statistics in place from every example, which per-sample gradients cannot "
            "do; build it with track_running_stats=False, or call model.eval()"
        )
    return NotImplemented


# --- the generic machinery: transparent Python functions, views of parameters ---------------

_QUIET: set[Any] = set()
"""Functions that take a parameter but never need a rule (metadata)."""
for _f in ("size", "dim", "numel", "__len__", "is_floating_point", "is_complex", "element_size",
           "stride", "storage_offset", "is_contiguous", "data_ptr", "detach", "__format__",
           "__repr__", "__bool__", "__hash__", "__eq__", "__ne__", "__getattribute__"):
    if hasattr(torch.Tensor, _f):
        _QUIET.add(getattr(torch.Tensor, _f))
for _prop in ("shape", "dtype", "device", "requires_grad", "is_cuda", "layout", "ndim", "is_sparse",
              "grad_fn", "is_leaf", "is_meta", "names", "data"):
    _desc = getattr(torch.Tensor, _prop, None)
    if _desc is not None and hasattr(_desc, "__get__"):
        _QUIET.add(_desc.__get__)

_TRANSPARENT: set[Any] = {F.multi_head_attention_forward}
"""Python-level torch functions with no rule of their own whose body calls ops that have
rules: they run again with the mode on inside them (e.g. ``nn.MultiheadAttention``'s
projections reach the ``F.linear`` rule)."""

_NO_CHECK = {
    "has_torch_function": lambda *a, **k: False,
    "has_torch_function_unary": lambda *a, **k: False,
    "has_torch_function_variadic": lambda *a, **k: False,
}


@functools.lru_cache(maxsize=64)
def _unchecked(func: Any) -> Any:
    """``func`` (a Python function) whose own ``__torch_function__`` check is off, so that its
    body runs under the mode instead of handing the call back to it."""
    scope = dict(func.__globals__)
    scope.update(_NO_CHECK)
    clone = types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)
    clone.__kwdefaults__ = func.__kwdefaults__
    return clone


def _run_transparent(mode: _Mode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    with mode:
        return _unchecked(func)(*args, **kwargs)


def _compose(prev: tuple[int, ...] | None, t: torch.Tensor, q: Sequence[int]) -> tuple[int, ...]:
    """``perm`` of ``leaf.permute(prev).permute(q)`` relative to the leaf (``()``: not a permutation)."""
    if prev == ():
        return ()
    prev = tuple(range(t.dim())) if prev is None else prev
    q = [d % t.dim() for d in q]
    return tuple(prev[d] for d in q)


def _transpose_view(prev: Any, t: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a = dict(zip(("self", "dim0", "dim1"), args), **kwargs)
    d0, d1 = a.get("dim0", a.get("dim0")), a.get("dim1")
    if not isinstance(d0, int) or not isinstance(d1, int):
        return ()
    q = list(range(t.dim()))
    q[d0 % t.dim()], q[d1 % t.dim()] = q[d1 % t.dim()], q[d0 % t.dim()]
    return _compose(prev, t, q)


def _permute_view(prev: Any, t: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    dims = args[1:] if len(args) > 1 else kwargs.get("dims", ())
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if len(dims) != t.dim() or not all(isinstance(d, int) for d in dims):
        return ()
    return _compose(prev, t, dims)


def _t_view(prev: Any, t: torch.Tensor, args: Any, kwargs: Any) -> Any:
    return _compose(prev, t, range(t.dim())[::-1]) if t.dim() <= 2 else ()


def _mt_view(prev: Any, t: torch.Tensor, args: Any, kwargs: Any) -> Any:
    if t.dim() < 2:
        return ()
    q = list(range(t.dim()))
    q[-1], q[-2] = q[-2], q[-1]
    return _compose(prev, t, q)


def _other_view(prev: Any, t: torch.Tensor, args: Any, kwargs: Any) -> Any:
    return ()


_VIEWS: dict[Any, Callable[..., Any]] = {
    torch.Tensor.t: _t_view, torch.t: _t_view, torch.Tensor.T.__get__: _t_view,
    torch.Tensor.mT.__get__: _mt_view, torch.Tensor.transpose: _transpose_view,
    torch.transpose: _transpose_view, torch.Tensor.permute: _permute_view, torch.permute: _permute_view,
}
"""Views of a parameter that the contraction rules see through (others: a ``()`` perm)."""
for _f in ("view", "reshape", "to", "contiguous", "__getitem__", "unsqueeze", "squeeze", "flatten",
           "expand", "expand_as", "view_as", "reshape_as", "type_as", "float", "double", "half",
           "bfloat16", "type", "unflatten"):
    if hasattr(torch.Tensor, _f):
        _VIEWS.setdefault(getattr(torch.Tensor, _f), _other_view)


def _direct(t: Any) -> bool:
    """Whether ``t`` is a parameter itself (not a view of one)."""
    hit = param_of(t)
    return hit is not None and hit[1] is None


def _leaf_subscripts(t: torch.Tensor, sub: str) -> tuple[Any, str] | None:
    """``(param, its subscripts)`` for an operand ``t`` with subscripts ``sub``: ``t`` a
    parameter or a transposition of one; None otherwise."""
    hit = param_of(t)
    if hit is None or hit[1] == ():
        return None
    leaf, perm = hit
    if perm is None:
        return t, sub
    out = [""] * len(perm)
    for d, leaf_dim in enumerate(perm):
        out[leaf_dim] = sub[d]
    return leaf, "".join(out)


_UNCACHED: dict[str, Any] = {}
"""Cached functions without their cache, set eagerly (the planning run of a tapped pass)."""


def _contract(x: Any, w: Any, a: str, w_sub: str, y: str, bias: Any = None) -> Any:
    """``einsum(a, w_sub -> y)(x, w) (+ bias)`` through the contraction rule, or NotImplemented."""
    from psgfunc.per_sample._expanded import call_rule
    from psgfunc.per_sample.rules.matmul import CONTRACT, contract_plan

    if not isinstance(x, torch.Tensor) or param_of(x) is not None:
        return NotImplemented
    found = _leaf_subscripts(w, w_sub)
    if found is None:
        return NotImplemented
    leaf, sub = found
    if not torch.compiler.is_compiling():
        _UNCACHED.setdefault("contract_plan", getattr(contract_plan, "__wrapped__", contract_plan))
        plan = contract_plan(a, sub, y, tuple(leaf.shape))
    else:  # a tapped pass: the compiler warns about caches (it traces past them)
        plan = _UNCACHED.get("contract_plan", contract_plan)(a, sub, y, tuple(leaf.shape))
    if plan is None or x.dim() != len(a):
        return NotImplemented
    x_sizes = dict(zip(a, x.shape))
    if any(x_sizes.get(c, n) != n for c, n in zip(sub, leaf.shape)):
        return NotImplemented  # an index broadcast (size 1 on one side), or torch's own error
    params = {"weight": leaf}
    if bias is not None:
        if (plan.s or not _direct(bias) or tuple(bias.shape) != tuple(plan.o_sizes) or len(plan.o) != 1
                or not y.endswith(plan.o)):
            return NotImplemented
        params["bias"] = bias
    return call_rule(CONTRACT, params, x, plan)


_PLAIN = object()
"""What a rule returns for a call that takes no parameter of ``fn`` (nothing to track, view
or warn about): the mode then runs the function as it is, at once."""


def _takes_param(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a tensor argument is a parameter of ``fn`` or a view of one (see
    :func:`param_of`); inside a rule or the mode."""
    for t in _tensors(args, kwargs):
        if param_of(t) is not None:
            return True
    return False


def _expanded_only(rule: Rule) -> Rule:
    """``rule`` under ``"expanded"`` for calls that take a parameter (the only ones these
    rules serve: an op on activations alone, most of a model's, is passed on at once)."""
    @functools.wraps(rule)
    def wrapped(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if method != "expanded":
            return NotImplemented
        if _STACK and _STACK[-1].tap is None and not _takes_param(args, kwargs):
            return _PLAIN
        return rule(method, func, args, kwargs)

    return wrapped


# --- psgfunc layers serving torch functions --------------------------------------------------

Adapter = Callable[[dict[str, Any]], "tuple[Callable[..., Any], dict[str, Any], tuple[Any, ...], dict[str, Any]] | None"]


def register_layer(torch_fn: Callable[..., Any], signature: Callable[..., Any] | None = None) -> Callable[[Adapter], Adapter]:
    """Serve ``torch_fn`` by a psgfunc functional layer (whose own rule does the work).

    ``adapter(a)`` gets ``torch_fn``'s arguments by name (bound to ``signature``, default
    ``torch_fn``'s own) and returns ``(layer, params, args, kwargs)`` for
    ``layer(params, *args, **kwargs)``, or None to leave the call to torch. Used under
    ``"expanded"`` when a parameter of ``fn`` is among ``params``. E.g.::

        @register_layer(F.group_norm)
        def _(a):
            return PF.group_norm, {"weight": a["weight"], "bias": a["bias"]}, (a["input"],
                a["num_groups"]), {"eps": a["eps"]}
    """

    def decorate(adapter: Adapter) -> Adapter:
        def rule(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if method != "expanded":
                return NotImplemented
            try:
                a = _bind(signature or torch_fn, args, kwargs)
            except TypeError:
                return NotImplemented
            plan = adapter(a)
            if plan is None:
                return NotImplemented
            layer, params, l_args, l_kwargs = plan
            params = {k: v for k, v in params.items() if v is not None}
            if not params or not all(_direct(v) for v in params.values()):
                return NotImplemented
            return layer(params, *l_args, **l_kwargs)

        register(torch_fn)(rule)
        return adapter

    return decorate


def _pf() -> Any:
    import psgfunc.functional as PF

    return PF


def _linear_signature(input: Any, weight: Any, bias: Any = None) -> None:  # pragma: no cover
    """``F.linear``'s arguments."""


@register(F.linear)
@_expanded_only
def _linear(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a = _bind(_linear_signature, args, kwargs)
    x, w, b = a["input"], a["weight"], a["bias"]
    if _direct(w) and (b is None or _direct(b) or param_of(b) is None):
        if b is not None and param_of(b) is None:
            return NotImplemented if not isinstance(b, torch.Tensor) else _pf().linear({"weight": w}, x) + b
        return _pf().linear({"weight": w, "bias": b}, x)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(x, torch.Tensor) and x.dim() >= 1:
        lead = _LETTERS[: x.dim() - 1]
        return _contract(x, w, lead + "i", "oi", lead + "o", b)
    return NotImplemented


_LETTERS = "abcdefghjklmpqrstuvwxyABCDEFGHIJKLMNOPQRSTUVWXY"  # not i, o, n, z, Z


def _matmul_parts(x: Any, w: Any, w_right: bool) -> Any:
    """``x @ w`` (``w_right``) or ``w @ x`` through the contraction rule, or NotImplemented."""
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or w.dim() < 2 or x.dim() < 1:
        return NotImplemented
    if w.dim() > 2:
        subs = _broadcast_matmul_subscripts(tuple(x.shape), tuple(w.shape), w_right)
        return NotImplemented if subs is None else _contract(x, w, *subs)
    if w_right:
        lead = _LETTERS[: x.dim() - 1]
        return _contract(x, w, lead + "i", "io", lead + "o")
    if x.dim() == 1:
        return _contract(x, w, "i", "oi", "o")
    lead = _LETTERS[: x.dim() - 2]
    return _contract(x, w, lead + "in", "oi", lead + "on")


def _broadcast_matmul_subscripts(x_shape: tuple[int, ...], w_shape: tuple[int, ...], w_right: bool) -> Any:
    """``(a, w, y)`` subscripts of ``torch.matmul`` with a parameter ``w`` of 3 or more dims:
    ``x [*xb, M, K] @ w [*wb, K, N]`` (``w_right``) or ``w [*wb, M, K] @ x [*xb, K, N]``, the
    batch dims broadcast from the right (a 1-d ``x`` has none). A batch dim of both is a group
    index (``W``'s blocks, one per group) when the sizes agree, an index of ``w`` and ``y``
    alone where ``x`` has size 1 there; None where ``w`` is broadcast over ``x`` (size 1)."""
    if len(x_shape) == 1:
        wb = _LETTERS[: len(w_shape) - 2]
        return ("i", wb + "io", wb + "o") if w_right else ("i", wb + "oi", wb + "o")
    xb, wb = x_shape[:-2], w_shape[:-2]
    rank = max(len(xb), len(wb))
    out, spare = _LETTERS[:rank], iter(_LETTERS[rank:])
    x_sub, w_sub = "", ""
    for d in range(rank):
        j, k = d - rank + len(xb), d - rank + len(wb)
        if j >= 0 and k >= 0 and xb[j] != wb[k]:
            if xb[j] != 1:
                return None  # w broadcast over x's dim (a weight index summed alone), or an error
            x_sub += next(spare)  # x's size-1 dim: summed away; y takes w's
        elif j >= 0:
            x_sub += out[d]
        if k >= 0:
            w_sub += out[d]
    if w_right:
        return x_sub + "ni", w_sub + "io", out + "no"
    return x_sub + "in", w_sub + "oi", out + "on"


@register(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm)
@_expanded_only
def _matmul(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if len(args) != 2 or kwargs:
        return NotImplemented
    left, right = args
    if param_of(right) is not None and param_of(left) is None:
        return _matmul_parts(left, right, True)
    if param_of(left) is not None and param_of(right) is None:
        return _matmul_parts(right, left, False)
    return NotImplemented


@register(torch.Tensor.__rmatmul__)
@_expanded_only
def _rmatmul(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if len(args) != 2 or kwargs:
        return NotImplemented
    return _matmul(method, torch.matmul, (args[1], args[0]), {})


def _mm_parts(left: Any, right: Any, bias: Any = None) -> Any:
    """``left @ right (+ bias)`` of 2-d matrices, a parameter on one side."""
    if not isinstance(left, torch.Tensor) or not isinstance(right, torch.Tensor) or left.dim() != 2 or right.dim() != 2:
        return NotImplemented
    if param_of(right) is not None:
        return _contract(left, right, "ni", "io", "no", bias)
    return _contract(right, left, "in", "oi", "on", bias)


def _mv_parts(mat: Any, vec: Any, bias: Any = None) -> Any:
    """``mat [N, M] @ vec [M] (+ bias)``, a parameter on one side."""
    if not isinstance(mat, torch.Tensor) or not isinstance(vec, torch.Tensor) or mat.dim() != 2 or vec.dim() != 1:
        return NotImplemented
    if param_of(mat) is not None:
        return _contract(vec, mat, "i", "oi", "o", bias)
    return _contract(mat, vec, "ni", "i", "n", bias)


def _bmm_parts(left: Any, right: Any, bias: Any = None) -> Any:
    """``bmm(left, right)``: ``[G, M, K] @ [G, K, N]``, a parameter on one side (the group
    index ``g`` is in all three: the weight's blocks, one per group; a ``bias`` makes
    ``_contract`` decline, grouped plans take none: the caller adds it)."""
    if not isinstance(left, torch.Tensor) or not isinstance(right, torch.Tensor) or left.dim() != 3 or right.dim() != 3:
        return NotImplemented
    if param_of(right) is not None:
        return _contract(left, right, "gni", "gio", "gno", bias)
    return _contract(right, left, "gin", "goi", "gon", bias)


def _add_input(method: str, out: torch.Tensor, b: Any, beta: Any) -> Any:
    """``out + beta * b``: the ``input`` term of ``addmm``/``baddbmm``/``addmv`` (ignored for
    ``beta = 0``, NaN and inf included, as torch does); a parameter ``b`` through the
    elementwise rule."""
    if param_of(b) is not None:
        if beta == 0:
            return NotImplemented  # b then gets no gradient at all: torch's own op
        return _elementwise(method, torch.add, (out, b), {} if beta == 1 else {"alpha": beta})
    if beta == 0:
        return out
    return out + b if beta == 1 else torch.add(out, b, alpha=beta)


def _scaled_product(method: str, b: Any, left: Any, right: Any, beta: Any, alpha: Any,
                    parts: Callable[..., Any]) -> Any:
    """``beta * b + alpha * parts(left, right)`` with one of ``left``, ``right`` a parameter:
    ``alpha`` scales the other operand (exact per-sample gradients, the kinds' pieces see it),
    a parameter ``b`` is the bias of the contraction rule (``beta = 1``) or an elementwise add."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (beta, alpha)):
        return NotImplemented
    if not isinstance(left, torch.Tensor) or not isinstance(right, torch.Tensor):
        return NotImplemented
    on_right = param_of(right) is not None
    if on_right == (param_of(left) is not None):
        return NotImplemented
    if alpha != 1:
        if on_right:
            left = left * alpha
        else:
            right = right * alpha
    if beta == 1 and _direct(b):
        out = parts(left, right, b)
        if out is not NotImplemented:
            return out
    out = parts(left, right)
    return out if out is NotImplemented else _add_input(method, out, b, beta)


def _addmm_signature(input: Any, mat1: Any, mat2: Any, *, beta: Any = 1, alpha: Any = 1) -> None:  # pragma: no cover
    """``torch.addmm``'s arguments."""


def _addmv_signature(input: Any, mat: Any, vec: Any, *, beta: Any = 1, alpha: Any = 1) -> None:  # pragma: no cover
    """``torch.addmv``'s arguments."""


def _baddbmm_signature(input: Any, batch1: Any, batch2: Any, *, beta: Any = 1, alpha: Any = 1) -> None:  # pragma: no cover
    """``torch.baddbmm``'s arguments."""


@register(torch.addmm, torch.Tensor.addmm)
@_expanded_only
def _addmm(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        a = _bind(_addmm_signature, args, kwargs)
    except TypeError:
        return NotImplemented
    return _scaled_product(method, a["input"], a["mat1"], a["mat2"], a["beta"], a["alpha"], _mm_parts)


@register(torch.addmv, torch.Tensor.addmv)
@_expanded_only
def _addmv(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        a = _bind(_addmv_signature, args, kwargs)
    except TypeError:
        return NotImplemented
    return _scaled_product(method, a["input"], a["mat"], a["vec"], a["beta"], a["alpha"], _mv_parts)


@register(torch.bmm, torch.Tensor.bmm)
@_expanded_only
def _bmm(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if len(args) != 2 or kwargs:
        return NotImplemented
    left, right = args
    if (param_of(left) is None) == (param_of(right) is None):
        return NotImplemented
    return _bmm_parts(left, right)


@register(torch.baddbmm, torch.Tensor.baddbmm)
@_expanded_only
def _baddbmm(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        a = _bind(_baddbmm_signature, args, kwargs)
    except TypeError:
        return NotImplemented
    return _scaled_product(method, a["input"], a["batch1"], a["batch2"], a["beta"], a["alpha"], _bmm_parts)


def _bilinear_signature(input1: Any, input2: Any, weight: Any, bias: Any = None) -> None:  # pragma: no cover
    """``F.bilinear``'s arguments."""


@register(F.bilinear)
@_expanded_only
def _bilinear(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``y_o = x1 W_o x2^T + b_o`` as the contraction of ``x1 (x) x2 [*, I1, I2]`` with the
    parameter ``W [O, I1, I2]``: its pieces are that outer product and the output gradient."""
    try:
        a = _bind(_bilinear_signature, args, kwargs)
    except TypeError:
        return NotImplemented
    x1, x2, w, b = a["input1"], a["input2"], a["weight"], a["bias"]
    if not all(isinstance(t, torch.Tensor) for t in (x1, x2, w)) or w.dim() != 3 or x1.dim() < 1:
        return NotImplemented
    if param_of(x1) is not None or param_of(x2) is not None or param_of(w) is None:
        return NotImplemented
    if x1.shape[:-1] != x2.shape[:-1] or (x1.shape[-1], x2.shape[-1]) != tuple(w.shape[1:]):
        return NotImplemented  # torch's own error
    x = x1.unsqueeze(-1) * x2.unsqueeze(-2)
    lead = _LETTERS[: x1.dim() - 1]
    if b is not None and _direct(b):
        out = _contract(x, w, lead + "ij", "oij", lead + "o", b)
        if out is not NotImplemented:
            return out
    out = _contract(x, w, lead + "ij", "oij", lead + "o")
    if out is NotImplemented or b is None:
        return out
    return _add_input(method, out, b, 1)


def _parse_einsum(equation: str, operands: Sequence[torch.Tensor]) -> tuple[list[str], str] | None:
    """Subscripts of each operand and of the output, ellipses spelled out; None if unusual."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    subs = lhs.split(",")
    if len(subs) != len(operands):
        return None
    used = set(eq) - set(".,->")
    spare = [c for c in _LETTERS if c not in used]
    ell = None
    out_subs = []
    for s, t in zip(subs, operands):
        if "..." in s:
            k = t.dim() - (len(s) - 3)
            if k < 0 or (ell is not None and len(ell) != k):
                return None
            ell = "".join(spare[:k]) if ell is None else ell
            s = s.replace("...", ell)
        if len(s) != t.dim():
            return None
        out_subs.append(s)
    if arrow:
        rhs = rhs.replace("...", ell or "")
    else:
        counts: dict[str, int] = {}
        for s in out_subs:
            for c in s:
                counts[c] = counts.get(c, 0) + 1
        rhs = (ell or "") + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in (ell or "")))
    return out_subs, rhs


@register(torch.einsum)
@_expanded_only
def _einsum(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if kwargs or not args or not isinstance(args[0], str):
        return NotImplemented
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if len(operands) != 2 or not all(isinstance(t, torch.Tensor) for t in operands):
        return NotImplemented
    parsed = _parse_einsum(args[0], operands)
    if parsed is None:
        return NotImplemented
    (s0, s1), y = parsed
    if param_of(operands[1]) is not None and param_of(operands[0]) is None:
        return _contract(operands[0], operands[1], s0, s1, y)
    if param_of(operands[0]) is not None and param_of(operands[1]) is None:
        return _contract(operands[1], operands[0], s1, s0, y)
    return NotImplemented


# --- elementwise ops with a parameter operand ------------------------------------------------


def _elementwise(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from psgfunc.per_sample._expanded import call_rule
    from psgfunc.per_sample.rules.matmul import ELEMENTWISE

    slots = [i for i, t in enumerate(args) if param_of(t) is not None]
    if len(slots) != 1 or not _direct(args[slots[0]]) or any(param_of(v) is not None for v in kwargs.values()):
        return NotImplemented
    if not all(isinstance(t, (torch.Tensor, int, float, bool)) for t in args):
        return NotImplemented
    if kwargs.get("rounding_mode") is not None or "out" in kwargs:
        return NotImplemented
    slot = slots[0]
    rest = args[:slot] + args[slot + 1:]
    return call_rule(ELEMENTWISE, {"p": args[slot]}, *rest, op=func, slot=slot, kwargs=dict(kwargs))


_ELEMENTWISE_FNS = [torch.mul, torch.add, torch.sub, torch.div, torch.true_divide, torch.subtract,
                    torch.multiply]
for _f in ("mul", "add", "sub", "div", "true_divide", "multiply", "subtract", "__mul__", "__rmul__",
           "__add__", "__radd__", "__sub__", "__rsub__", "__truediv__", "__rtruediv__", "__div__",
           "__rdiv__"):
    if hasattr(torch.Tensor, _f):
        _ELEMENTWISE_FNS.append(getattr(torch.Tensor, _f))
register(*_ELEMENTWISE_FNS)(_expanded_only(_elementwise))


# --- layers ---------------------------------------------------------------------------------


def _conv_signature(input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                    dilation: Any = 1, groups: int = 1) -> None:  # pragma: no cover
    """``torch.convNd``'s arguments."""


def _conv_adapter(name: str) -> Adapter:
    def adapter(a: dict[str, Any]) -> Any:
        kwargs = {"stride": a["stride"], "padding": a["padding"], "dilation": a["dilation"], "groups": a["groups"]}
        return getattr(_pf(), name), {"weight": a["weight"], "bias": a["bias"]}, (a["input"],), kwargs

    return adapter


for _n in (1, 2, 3):
    register_layer(getattr(torch, f"conv{_n}d"), _conv_signature)(_conv_adapter(f"conv{_n}d"))


@register_layer(F.layer_norm)
def _layer_norm(a: dict[str, Any]) -> Any:
    shape = a["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return _pf().layer_norm, {"weight": a["weight"], "bias": a["bias"]}, (a["input"], shape), {"eps": a["eps"]}


# --- torch's fused recurrent ops --------------------------------------------------------------


def _rnn_names(n_layers: int, bidirectional: bool, has_biases: bool, count: int) -> list[str] | None:
    per = 4 if has_biases else 2
    dirs = 2 if bidirectional else 1
    if count != n_layers * dirs * per:
        return None  # e.g. an LSTM with proj_size
    names = []
    for layer in range(n_layers):
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            names += [f"weight_ih{sfx}", f"weight_hh{sfx}"] + ([f"bias_ih{sfx}", f"bias_hh{sfx}"] if has_biases else [])
    return names


def _rnn_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The dense (not packed) form ``(input, hx, params, has_biases, num_layers, dropout,
    train, bidirectional, batch_first)`` by name; None for the packed form."""
    if kwargs or len(args) != 9 or not isinstance(args[2], (list, tuple)):
        return None
    keys = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train", "bidirectional", "batch_first")
    return dict(zip(keys, args))


@register(torch.lstm)
def _lstm(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``nn.LSTM`` through functional_call: psgfunc's scan-based LSTM (its rule under
    ``"expanded"``; under ``"vmap"`` it batches, where torch's fused op has no batching rule)."""
    a = _rnn_args(args, kwargs)
    if a is None or method == "loop" or not _transformed():
        return NotImplemented
    names = _rnn_names(a["num_layers"], a["bidirectional"], a["has_biases"], len(a["params"]))
    if names is None:
        return NotImplemented
    params = dict(zip(names, a["params"]))
    x, (h0, c0) = a["input"], a["hx"]
    bdim = 0 if a["batch_first"] else 1
    one = x.dim() == 3 and x.shape[bdim] == 1 and h0.dim() == 3  # fn's example as a batch of one
    if one:  # the rule's per-example layout: x [T, D], state [L*P, H]
        x, h0, c0 = x.squeeze(bdim), h0.squeeze(1), c0.squeeze(1)
    out, (h_n, c_n) = _pf().lstm(
        params, x, (h0, c0), num_layers=a["num_layers"], bidirectional=a["bidirectional"],
        batch_first=a["batch_first"], dropout=a["dropout"], training=a["train"],
    )
    if one:
        out, h_n, c_n = out.unsqueeze(bdim), h_n.unsqueeze(1), c_n.unsqueeze(1)
    return out, h_n, c_n


def _cell_step(kind: str, p: dict[str, Any], sfx: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    gi = F.linear(x, p[f"weight_ih{sfx}"], p.get(f"bias_ih{sfx}"))
    gh = F.linear(h, p[f"weight_hh{sfx}"], p.get(f"bias_hh{sfx}"))
    if kind == "gru":
        ir, iz, in_ = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h
    return torch.tanh(gi + gh) if kind == "rnn_tanh" else torch.relu(gi + gh)


def _unrolled_rnn(kind: str, a: dict[str, Any], names: list[str]) -> Any:
    """torch's fused GRU / Elman RNN as ordinary ops over time (one example or a batch in
    torch's layout), so that vmap batches it. Same values as ``torch.gru``/``torch.rnn_*``."""
    p = dict(zip(names, a["params"]))
    x, hx = a["input"], a["hx"]
    batched = x.dim() == 3
    if not batched:
        x, hx = x.unsqueeze(1), hx.unsqueeze(1)
    elif a["batch_first"]:
        x = x.transpose(0, 1)  # [T, N, D]
    dirs = 2 if a["bidirectional"] else 1
    layer_in, finals = x, []
    for layer in range(a["num_layers"]):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            h = hx[layer * dirs + d]
            steps = range(layer_in.shape[0] - 1, -1, -1) if d else range(layer_in.shape[0])
            ys = [None] * layer_in.shape[0]
            for t in steps:
                h = _cell_step(kind, p, sfx, layer_in[t], h)
                ys[t] = h
            outs.append(torch.stack(ys))
            finals.append(h)
        layer_in = torch.cat(outs, -1) if dirs == 2 else outs[0]
        if a["dropout"] and a["train"] and layer < a["num_layers"] - 1:
            layer_in = F.dropout(layer_in, a["dropout"], True)
    out, h_n = layer_in, torch.stack(finals)
    if not batched:
        return out.squeeze(1), h_n.squeeze(1)
    return (out.transpose(0, 1) if a["batch_first"] else out), h_n


_RNN_LAYERS: dict[str, str] = {"gru": "gru", "rnn_tanh": "rnn", "rnn_relu": "rnn"}
"""torch op name -> psgfunc functional layer name serving it, once that layer exists
(``"gru"``: ``PF.gru``); until then the unrolled ops above."""


def _fused_rnn(kind: str) -> Rule:
    def rule(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        a = _rnn_args(args, kwargs)
        if a is None or method == "loop" or not _transformed():
            return NotImplemented
        names = _rnn_names(a["num_layers"], a["bidirectional"], a["has_biases"], len(a["params"]))
        if names is None:
            return NotImplemented
        layer = getattr(_pf(), _RNN_LAYERS.get(kind, ""), None) if kind in _RNN_LAYERS else None
        if layer is not None:
            extra = {} if kind == "gru" else {"nonlinearity": "tanh" if kind == "rnn_tanh" else "relu"}
            x, h0 = a["input"], a["hx"]
            bdim = 0 if a["batch_first"] else 1
            one = x.dim() == 3 and x.shape[bdim] == 1 and h0.dim() == 3  # fn's example, a batch of one
            if one:  # the rule's per-example layout: x [T, D], state [L*P, H] (as torch.lstm above)
                x, h0 = x.squeeze(bdim), h0.squeeze(1)
            out, h_n = layer(dict(zip(names, a["params"])), x, h0, num_layers=a["num_layers"],
                             bidirectional=a["bidirectional"], batch_first=a["batch_first"],
                             dropout=a["dropout"], training=a["train"], **extra)
            return (out.unsqueeze(bdim), h_n.unsqueeze(1)) if one else (out, h_n)
        return _unrolled_rnn(kind, a, names)

    return rule


for _kind in ("gru", "rnn_tanh", "rnn_relu"):
    register(getattr(torch, _kind))(_fused_rnn(_kind))


# --- attention ------------------------------------------------------------------------------


def _sdpa_signature(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                    is_causal: bool = False, scale: Any = None, enable_gqa: bool = False) -> None:  # pragma: no cover
    """``F.scaled_dot_product_attention``'s arguments."""


@register(F.scaled_dot_product_attention)
def _sdpa(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Under a transform, attention on the whole batch with torch's own kernel where our vmap
    is the innermost transform (:func:`~psgfunc.per_sample.rules.attention.batched_sdpa`),
    else as ordinary ops: torch's fused CPU kernel has no batching rule (vmap would loop
    over the examples and warn)."""
    if method == "loop" or not _transformed():
        return NotImplemented
    a = _bind(_sdpa_signature, args, kwargs)
    from psgfunc.per_sample.rules.attention import batched_sdpa  # the rules import this module

    tapped = bool(_STACK) and _STACK[-1].tap is not None
    # the whole batch through torch's own (fused) kernel; not in a tapped pass (one example,
    # and the compiler cannot trace the unwrapping from psgfunc's vmap)
    fused = NotImplemented if tapped or torch.compiler.is_compiling() else batched_sdpa(a)
    if fused is not NotImplemented:
        return fused
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    if a["enable_gqa"] and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    s = (q @ k.transpose(-2, -1)) * scale
    if a["is_causal"]:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    w = torch.softmax(s, -1)
    if a["dropout_p"] > 0:
        w = F.dropout(w, a["dropout_p"], True)
    return w @ v


# --- layers other families provide (served as soon as psgfunc.functional has them) ----------


def _when(name: str) -> Any:
    return getattr(_pf(), name, None)


@register_layer(F.group_norm)
def _group_norm(a: dict[str, Any]) -> Any:
    layer = _when("group_norm")
    if layer is None:
        return None
    return layer, {"weight": a["weight"], "bias": a["bias"]}, (a["input"], a["num_groups"]), {"eps": a["eps"]}


def _rms_norm_signature(input: Any, normalized_shape: Any, weight: Any = None,
                       eps: Any = None) -> None:  # pragma: no cover
    """``torch.rms_norm``'s arguments."""


@register_layer(torch.rms_norm, _rms_norm_signature)  # what torch.compile shows the mode for F.rms_norm
@register_layer(F.rms_norm)
def _rms_norm(a: dict[str, Any]) -> Any:
    layer = _when("rms_norm")
    if layer is None:
        return None
    shape = a["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return layer, {"weight": a["weight"]}, (a["input"], shape), {"eps": a["eps"]}


def _conv_transpose_signature(input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                              output_padding: Any = 0, groups: int = 1, dilation: Any = 1) -> None:  # pragma: no cover
    """``torch.conv_transposeNd``'s arguments."""


def _conv_transpose_adapter(name: str) -> Adapter:
    def adapter(a: dict[str, Any]) -> Any:
        layer = _when(name)
        if layer is None:
            return None
        kwargs = {k: a[k] for k in ("stride", "padding", "output_padding", "groups", "dilation")}
        return layer, {"weight": a["weight"], "bias": a["bias"]}, (a["input"],), kwargs

    return adapter


for _n in (1, 2, 3):
    register_layer(getattr(torch, f"conv_transpose{_n}d"), _conv_transpose_signature)(
        _conv_transpose_adapter(f"conv_transpose{_n}d"))


@register(F.multi_head_attention_forward)
def _multi_head_attention(method: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """In a tapped pass (the compiled route), ``nn.MultiheadAttention`` as psgfunc's
    ``multi_head_attention`` layer, whose tap serves all its weights: the compiler cannot
    follow torch's Python implementation back through the mode (the eager planning run and
    the traced pass would make different calls). Elsewhere torch's implementation runs with
    its projections reaching the ``F.linear`` rule (``_TRANSPARENT``)."""
    if not (_STACK and _STACK[-1].tap is not None):
        return NotImplemented
    try:
        a = _bind(F.multi_head_attention_forward, args, kwargs)  # a Python function: its own signature
    except TypeError:
        return NotImplemented
    if a["static_k"] is not None or a["static_v"] is not None:
        return NotImplemented
    names = {"in_proj_bias": "in_proj_bias", "out_proj_weight": "out_proj.weight",
             "out_proj_bias": "out_proj.bias", "bias_k": "bias_k", "bias_v": "bias_v"}
    if a["use_separate_proj_weight"]:
        names.update(q_proj_weight="q_proj_weight", k_proj_weight="k_proj_weight", v_proj_weight="v_proj_weight")
    else:
        names["in_proj_weight"] = "in_proj_weight"
    params = {ours: a[theirs] for theirs, ours in names.items() if a[theirs] is not None}
    if not all(_direct(p) for p in params.values()):
        return NotImplemented
    # with the weights: the attention as ordinary ops (torch's fused SDPA kernel, which the
    # layer runs otherwise, has no batching rule: one example at a time, with a warning)
    out, weights = _pf().multi_head_attention(
        params, a["query"], a["key"], a["value"], a["num_heads"], key_padding_mask=a["key_padding_mask"],
        attn_mask=a["attn_mask"], is_causal=a["is_causal"], dropout=a["dropout_p"], training=a["training"],
        need_weights=True, batch_first=False, average_attn_weights=a["average_attn_weights"],
        add_zero_attn=a["add_zero_attn"],
    )
    return out, weights if a["need_weights"] else None
