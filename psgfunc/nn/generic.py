"""``Generic``: per-sample gradients for a module that no converter knows.

:func:`psgfunc.nn.expand_weights` turns the ``torch.nn`` layers it has a converter for into
dedicated shells. Any other module with trainable parameters of its own (HF GPT-2's
``Conv1D``, HF ``LlamaRMSNorm``, a user's ``LayerScale``) gets :func:`make_generic`: its
class is swapped, in place, for a subclass of ``(Generic, its class)``. The module stays the
same object with the same ``Parameter`` objects, attributes, hooks and ``state_dict`` keys;
only its ``forward`` changes:

* it reads the batch size ``B`` (dim 0 of its first tensor input, checked against the
  forward's record as every shell does, :mod:`psgfunc.nn._forward`);
* every trainable parameter of the module (its own and its children's) is expanded to a
  stride-0 ``[B, *shape]`` view and hooked exactly as :func:`~psgfunc.per_sample.module_call`
  hooks a shell's parameters (``.grad_sample``, or pieces for a fast-clipping ``DPOptimizer``);
* the module's own ``forward`` runs under ``torch.func.vmap`` over the examples, each example
  as a batch of one (``x_b.unsqueeze(0)``), with the expanded views as its parameters and the
  op-level rules of :mod:`psgfunc.per_sample._torch_ops` active. ``torch.addmm(bias, x, W)``,
  ``weight * x``, ``F.linear``, einsum, the norms, convolutions... reach psgfunc's per-sample
  rules, which compute the op once with the shared weight and give each example its own
  gradient (or its fast-clipping pieces) in the backward. An op without a rule that takes a
  parameter falls back to torch's vmap over the views (exact, materialised) and warns once
  naming the op, as in ``per_sample_grads(method="expanded")``.

Tensors in the input whose dim 0 is ``B`` are taken as batched (example ``b`` gets row ``b``,
with a leading 1); other tensors (e.g. ``[1, T, D]`` rotary tables shared by every example) go
to every example as they are, and so does a constant of the forward whose dim 0 happens to
be ``B`` (a ``[T, T]`` mask made by ``torch.full`` with ``T == B``: the forward follows which
tensors are the same for every example, :func:`psgfunc.nn._forward.is_shared`). Tensor
outputs must have the example's leading 1 (a module that keeps the batch dim); it is
removed and the examples are stacked back to ``[B, ...]``.

**Plain ops on the model's parameters, outside any shell.** A module WITHOUT parameters of
its own is no shell, yet its forward may use a child's parameter in a plain torch op: a
GPT-2 whose output head is tied to the token embedding by ``F.linear(h, self.tok.weight)``
(or ``h @ self.tok.weight.T``, ``self.tok.weight * x``) in the root's forward. While the
forward of a model converted by ``expand_weights`` runs, a torch-function mode
(:class:`_OutsideShells`, pushed by a forward pre-hook of the model and removed by its
forward hook, also after an exception) serves such an op the way a generic shell serves its
forward: when a torch function that has an op-level rule in
:mod:`psgfunc.per_sample._torch_ops` receives a trainable parameter of the model (or a view
of one taken in that forward: ``.T``, ``.t()``, ``transpose``, ``permute``, ``view``,
``reshape``, ``.to(dtype)``...), the parameters it takes are expanded and hooked by
:func:`~psgfunc.per_sample._expanded.expanded_call` and the op runs under vmap over the
examples with the rules active (:class:`_Runner`, the same runner as a generic shell's).
The op's per-sample gradient (or its fast-clipping pieces) then joins those of the shells
that use the same ``Parameter``, as two shells sharing one do. The batch is the op's first
tensor input (not a parameter) whose dim 0 is the forward's batch size and that is not a
constant of the forward with distinct rows (:func:`psgfunc.nn._forward.is_shared`) (checked against
the forward's record, :mod:`psgfunc.nn._forward`); an op with no such input, and an op
without a rule, runs unchanged, and the check on the parameter's total gradient
(:mod:`psgfunc.per_sample._rows`) then raises the ValueError that names the fix. Shells
pause the mode while they run (``ExpandedModule.__call__``), so their own calls are never
re-routed; so do torch.func transforms (a generic shell's vmap) and ``torch.no_grad()``.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Mapping
from typing import Any

import optree
import torch
from torch import nn
from torch.func import vmap
from torch.nn.utils.stateless import _reparametrize_module
from torch.overrides import TorchFunctionMode, resolve_name

from psgfunc import _rules
from psgfunc.nn import _forward
from psgfunc.nn._base import ExpandedModule, check_max_batch_size
from psgfunc.per_sample import _torch_ops
from psgfunc.per_sample._expanded import expanded_call, watch_params

__all__ = ["Generic", "make_generic"]

_TYPES: dict[type, type] = {}


class Generic(ExpandedModule):
    """Base of the generic shells: a module of any class run with expanded parameters.

    Not built directly: :func:`make_generic` (called by ``expand_weights``) swaps a module's
    class for ``type(f"Generic{name}", (Generic, cls), {})``. Shapes: whatever the module's
    own forward takes and returns, with the batch at dim 0 of its first tensor input and of
    every tensor output.
    """

    _psg_generic_base: type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        plain = super(Generic, self).forward  # the module's own forward (its class's)
        if torch._C._are_functorch_transforms_active():
            # inside torch.func transforms (functional_call under per_sample_grads, or an
            # enclosing Generic): the transforms give the per-sample gradients
            return plain(*args, **kwargs)
        first = _first_tensor(args, kwargs)
        size = None if first is None else self._batch_size(first, min_dim=1, expected="[B, ...]")
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        if not params or not torch.is_grad_enabled():
            # nothing to expand, so no batch needed (a weight-norm parametrization, which
            # takes no input, evaluated under no_grad)
            watch_params(params, self)
            return _forward.produce(self, plain(*args, **kwargs), 0)
        if size is None:
            raise ValueError(
                f"{type(self).__name__}: the forward needs a tensor input whose dim 0 is the "
                "batch (a psgfunc generic shell reads the batch size from it), got none"
            )
        runner = _Runner(f"{type(self).__name__}.forward", functools.partial(_module_body, self, plain),
                         size, f"{type(self).__name__}: psgfunc's generic shell runs the forward",
                         "return batch-first outputs, or give the module a converter in "
                         "psgfunc.nn.convert.CONVERTERS")
        out = expanded_call(runner, params, size, (args, kwargs), {})
        return _forward.produce(self, out, 0)


    def __reduce_ex__(self, protocol: Any) -> Any:
        # the generated class is not importable by name: pickle (torch.save of the whole
        # model) and deepcopy rebuild it from the module's own class
        return _restore, (self._psg_generic_base,), self.__dict__


def _generic_type(cls: type) -> type:
    """``Generic{cls.__name__}``: a subclass of :class:`Generic` and ``cls`` (one per ``cls``)."""
    new = _TYPES.get(cls)
    if new is None:
        new = _TYPES[cls] = type(f"Generic{cls.__name__}", (Generic, cls), {"_psg_generic_base": cls})
        new.__module__ = __name__
    return new


def _restore(cls: type) -> nn.Module:
    """An empty generic shell of ``cls`` (unpickling; the state is set after)."""
    module = cls.__new__(cls)
    module.__class__ = _generic_type(cls)
    return module


def _first_tensor(args: Any, kwargs: Any) -> torch.Tensor | None:
    for leaf in optree.tree_leaves((args, kwargs), none_is_leaf=True):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf
    return None


class _Runner:
    """The layer ``expanded_call`` calls: ``body`` vmapped over the examples.

    ``body(views, args, kwargs)`` computes ONE example, given as a batch of one: ``views``
    maps each parameter name to that example's copy (a row of the expanded view), the
    tensors of ``args``/``kwargs`` whose dim 0 is ``size`` are the example's row with a
    leading 1, the others as they are. It runs with the op-level rules of
    :mod:`psgfunc.per_sample._torch_ops` active. Serves both a generic shell's forward
    (:func:`_module_body`) and one torch op on the model's parameters outside any shell
    (:class:`_OutsideShells`). ``what`` and ``fix`` complete the error for an output
    without the example's leading 1.
    """

    def __init__(self, name: str, body: Any, size: int, what: str, fix: str):
        self.body, self.size, self.what, self.fix = body, size, what, fix
        self.__name__ = name

    def __call__(self, expanded: dict[str, torch.Tensor], args: Any, kwargs: Any) -> Any:
        size = self.size
        names = list(expanded)
        views = [expanded[n] for n in names]
        leaves, spec = optree.tree_flatten((args, kwargs), none_is_leaf=True)
        # (a constant of the forward whose dim 0 happens to be B, e.g. a [T, T] mask with
        # T == B, is shared, not batched: psgfunc.nn._forward.is_shared)
        batched = [
            isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size and not _forward.is_shared(t, 0)
            for t in leaves
        ]
        b_leaves = [t for t, b in zip(leaves, batched) if b]
        out_info: dict[str, Any] = {}

        def one(p_views: list[torch.Tensor], *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
            it = iter(rows)
            full = [next(it).unsqueeze(0) if b else t for t, b in zip(leaves, batched)]
            a, k = optree.tree_unflatten(spec, full)
            out = self.body(dict(zip(names, p_views)), a, k)
            o_leaves, o_spec = optree.tree_flatten(out, none_is_leaf=True)
            tensors = []
            for o in o_leaves:
                if not isinstance(o, torch.Tensor) and _holds_tensors(o):
                    raise ValueError(
                        f"{self.what} on each example as a batch of one and gives its outputs "
                        "back as tensors, tuples, lists and dicts; got a "
                        f"{type(o).__name__} holding tensors, which would leave the per-example "
                        f"call unfinished. Return a tuple or a dict (HF models: return_dict=False); {self.fix}"
                    )
                if isinstance(o, torch.Tensor):
                    if o.dim() == 0 or o.shape[0] != 1:
                        raise ValueError(
                            f"{self.what} on each example as a batch of one and needs every "
                            "tensor output to keep that batch dim at dim 0, got an output of "
                            f"per-example shape {tuple(o.shape)}; {self.fix}"
                        )
                    tensors.append(o.squeeze(0))
            out_info["spec"], out_info["leaves"] = o_spec, o_leaves
            return tuple(tensors)

        with _rules.expanded_mode("vmap"), _torch_ops.active("expanded", views):
            stacked = vmap(one, in_dims=(0, *([0] * len(b_leaves))), randomness="different")(
                views, *b_leaves
            )
        it = iter(stacked)
        o_leaves = [next(it) if isinstance(o, torch.Tensor) else o for o in out_info["leaves"]]
        return optree.tree_unflatten(out_info["spec"], o_leaves)


def _holds_tensors(o: Any) -> bool:
    """Whether ``o`` (an output leaf optree does not open: a dataclass, a dict subclass such
    as HF's ``ModelOutput``) holds tensors."""
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        values = [getattr(o, f.name) for f in dataclasses.fields(o)]
    elif isinstance(o, Mapping):
        values = list(o.values())
    else:
        return False
    return any(isinstance(v, torch.Tensor) or _holds_tensors(v) for v in values)


def _module_body(module: nn.Module, plain: Any, views: dict[str, torch.Tensor], args: Any, kwargs: Any) -> Any:
    """A generic shell's own forward on one example, with ``views`` as its parameters."""
    with _reparametrize_module(module, views, tie_weights=True):  # (a parameter also held by a child)
        return plain(*args, **kwargs)


def make_generic(module: nn.Module, max_batch_size: int) -> nn.Module:
    """Turn ``module`` into a generic shell, in place (its class swapped); returns it.

    The module keeps its identity, ``Parameter`` objects, attributes, hooks and
    ``state_dict`` keys; its class becomes a subclass of :class:`Generic` and of its own class
    (cached per class). A module that is already a shell only gets ``max_batch_size``.

    Raises:
        ValueError: a non-positive ``max_batch_size``.
    """
    max_batch_size = check_max_batch_size(max_batch_size, "make_generic")
    if not isinstance(module, ExpandedModule):
        module.__class__ = _generic_type(type(module))
    module.max_batch_size = max_batch_size
    return module


# --------------------------------------------- plain ops on the model's parameters outside shells


class _Slot:
    """Where a parameter (or a view of it) sat in an op's arguments: ``name`` in the
    expanded params, and the view ops that made the argument from the parameter."""

    __slots__ = ("name", "chain")

    def __init__(self, name: str, chain: tuple[Any, ...]):
        self.name, self.chain = name, chain


def _view_functions() -> dict[Any, bool]:
    """Torch functions taking a tensor first and returning a view or a cast of it that the
    mode follows: function -> whether tensor arguments besides the first are allowed (only
    ``to``/``type_as``, which read nothing but their dtype and device). Not ``expand``/
    ``expand_as``, whose shapes may hold the batch."""
    fns: dict[Any, bool] = {torch.t: False, torch.transpose: False, torch.permute: False,
                            torch.reshape: False, torch.flatten: False, torch.squeeze: False,
                            torch.unsqueeze: False}
    for name in ("t", "transpose", "permute", "view", "reshape", "contiguous", "__getitem__",
                 "unsqueeze", "squeeze", "flatten", "unflatten", "float", "double", "half",
                 "bfloat16", "type", "to", "type_as"):
        fn = getattr(torch.Tensor, name, None)
        if fn is not None:
            fns[fn] = name in ("to", "type_as")
    for name in ("T", "mT"):
        prop = getattr(torch.Tensor, name, None)
        if prop is not None:
            fns[prop.__get__] = False
    return fns


_VIEW_FNS = _view_functions()


def _replace(args: tuple[Any, ...], kwargs: dict[str, Any], swap: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args``/``kwargs`` with each argument (and list/tuple element) ``v`` as ``swap(v)``."""

    def one(v: Any) -> Any:
        return type(v)(swap(e) for e in v) if type(v) is list or type(v) is tuple else swap(v)

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def _op_body(func: Any, views: dict[str, torch.Tensor], args: Any, kwargs: Any) -> Any:
    """One example of an op served outside shells: the slots filled from ``views``."""

    def fill(v: Any) -> Any:
        if not isinstance(v, _Slot):
            return v
        t = views[v.name]
        for fn, rest, kw in v.chain:
            t = fn(t, *rest, **kw)
        return t

    a, k = _replace(tuple(args), dict(kwargs), fill)
    return func(*a, **k)


class _OutsideShells(TorchFunctionMode):
    """Serves torch ops on ``root``'s trainable parameters outside any shell (see the module
    docstring), during one forward of ``root`` (its ``record``)."""

    _psg_outside_shells = True  # ExpandedModule.__call__ pauses it while a shell runs

    def __init__(self, root: nn.Module, record: Any):
        super().__init__()
        self.root, self.record = root, record
        self.params: dict[str, torch.Tensor] = {}  # trainable, by name (read at first use)
        # id(t) -> (t, parameter name, view ops from the parameter): the parameters, and
        # their views taken in this forward (alive with the mode, so no id is reused)
        self.known: dict[int, tuple[torch.Tensor, str, tuple[Any, ...]]] | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        data = self.record.data
        if data is None or torch._C._are_functorch_transforms_active():
            return self._dispatch(func, args, kwargs)
        if func is _ITER and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            # iterating a tensor unbinds it (inside torch's own call, where this mode sees
            # nothing): unbind here so that what is followed reaches the pieces
            return iter(self.__torch_function__(torch.Tensor.unbind, types, (args[0], 0), {}))
        const = _forward.judge(data, func, args, kwargs)  # before: an in-place op changes self
        out = self._dispatch(func, args, kwargs)
        _forward.follow(data, func, args, kwargs, out, const)  # which tensors are constants
        _forward.carry(self.record, func, args, kwargs, out)  # where shell outputs' batch goes
        return out

    def _dispatch(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        is_view = func in _VIEW_FNS
        if not is_view and _torch_ops.rule_for(func) is None:
            return func(*args, **kwargs)
        hit = (self._lookup(args[0]) if args else None) if is_view else self._first_hit(args, kwargs)
        if (hit is None or _rules.expanded_mode_kind() is not None or _rules.current_tap() is not None
                or torch._C._are_functorch_transforms_active() or not torch.is_grad_enabled()
                or _forward.current() is not self.record):
            return func(*args, **kwargs)  # no parameter; a rule's or a transform's own ops; no gradient
        if is_view:
            return self._view(func, args, kwargs, hit)
        return self._serve(func, args, kwargs)

    def _first_hit(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, tuple[Any, ...]] | None:
        """:meth:`_lookup` of the first argument (or list/tuple element) it knows."""
        for a in (*args, *kwargs.values()) if kwargs else args:
            if type(a) is list or type(a) is tuple:
                for v in a:
                    hit = self._lookup(v)
                    if hit is not None:
                        return hit
            elif isinstance(a, torch.Tensor):
                hit = self._lookup(a)
                if hit is not None:
                    return hit
        return None

    def _lookup(self, t: Any) -> tuple[str, tuple[Any, ...]] | None:
        """``(parameter name, view ops)`` when ``t`` is a trainable parameter of the model or
        a view of one followed by this mode; None otherwise."""
        known = self.known
        if known is None:  # first use: the model's parameters now (names deduplicated)
            self.params = {n: p for n, p in self.root.named_parameters() if p.requires_grad}
            known = self.known = {id(p): (p, n, ()) for n, p in self.params.items()}
        hit = known.get(id(t))
        if hit is None or hit[0] is not t:
            return None
        return hit[1], hit[2]

    def _view(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], hit: tuple[str, Any]) -> Any:
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out is args[0]:
            return out
        rest = args[1:]
        if not _VIEW_FNS[func] and _torch_ops._tensors(rest, kwargs):
            return out  # e.g. an index tensor: not followed (a use without a rule)
        self.known[id(out)] = (out, hit[0], (*hit[1], (func, rest, dict(kwargs))))  # type: ignore[index]
        return out

    def _serve(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        params: dict[str, torch.Tensor] = {}

        def swap(v: Any) -> Any:
            hit = self._lookup(v)
            if hit is None:
                return v
            params[hit[0]] = self.params[hit[0]]
            return _Slot(*hit)

        s_args, s_kwargs = _replace(args, kwargs, swap)
        inputs = [v for v in _torch_ops._tensors(s_args, s_kwargs) if v.dim() > 0]
        record = self.record
        batch = record.batch if record.batch is not None else record.hint
        first = next((t for t in inputs if (batch is None or t.shape[0] == batch) and not _forward.is_shared(t, 0)), None)
        if first is None:
            # no input batched like the forward: the op is left as is, and the parameter's
            # total-gradient check raises (a use outside psgfunc layers) if it gets a gradient
            return func(*args, **kwargs)
        size = first.shape[0]
        _forward.consume(self.root, first, size, 0)
        op = resolve_name(func) or getattr(func, "__name__", repr(func))
        names = ", ".join(repr(n) for n in params)
        runner = _Runner(
            op, functools.partial(_op_body, func), size,
            f"psgfunc: {op} takes the model's parameter(s) {names} outside any psgfunc layer; "
            "psgfunc runs that op",
            "give it batch-first inputs [B, ...], or route the parameter's use through a "
            "psgfunc layer (e.g. share the Parameter with a psgfunc.nn.Linear: head.weight = "
            "emb.weight)",
        )
        out = expanded_call(runner, params, size, (s_args, s_kwargs), {})
        return _forward.produce(self.root, out, 0)


_ITER = torch.Tensor.__iter__

_LOCAL = threading.local()
"""``entries``: ``(model, its mode or None)`` of the converted models whose forward runs in
this thread (the torch-function mode stack is per thread too)."""


def _entries() -> list[tuple[nn.Module, _OutsideShells | None]]:
    entries = getattr(_LOCAL, "entries", None)
    if entries is None:
        entries = _LOCAL.entries = []
    return entries


def _remove_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off this thread's torch-function mode stack, wherever it is."""
    above = []
    while torch._C._len_torch_function_stack():
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for m in reversed(above):  # the modes pushed after it (none, unless one was left open)
        torch._C._push_on_torch_function_stack(m)


def _enter_forward(model: nn.Module, args: Any, kwargs: Any) -> None:
    entries = _entries()
    record = _forward.current()
    if entries and record is not None and record.root is model and record.depth == 1:
        # the outermost converted forward of this thread starts while entries remain: a
        # forward interrupted by a KeyboardInterrupt (no forward hooks) left them
        for _, mode in entries:
            if mode is not None:
                _remove_mode(mode)
        entries.clear()
    mode = None
    if (record is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active() and _rules.expanded_mode_kind() is None):
        mode = _OutsideShells(model, record)
        if record.data is None and record.root is model:
            # the outermost forward: its parameters and buffers are constants of it (the same
            # for every example), and the mode follows what ops make from constants only
            record.data = {}
            _forward.mark(record, [*model.parameters(), *model.buffers()])
        mode.__enter__()
    elif (record is not None and record.root is model and record.depth == 1 and not torch.is_grad_enabled()
            and not torch._C._are_functorch_transforms_active()):
        # a forward without gradients (a reentrant checkpoint's first pass): parameters the
        # mode would serve are watched as the shells' are (watch_params)
        watch_params(dict(model.named_parameters()), model)
    entries.append((model, mode))


def _exit_forward(model: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
    entries = _entries()
    for i in range(len(entries) - 1, -1, -1):
        if entries[i][0] is model:
            for _, mode in entries[i:]:
                if mode is not None:
                    _remove_mode(mode)
            del entries[i:]
            return


def install_outside_shells(model: nn.Module) -> None:
    """Give ``model`` (once) the forward hooks that serve plain ops on its parameters while
    its forward runs (see the module docstring). Called by ``expand_weights`` after
    :func:`psgfunc.nn._forward.install`, whose record the mode reads."""
    if _enter_forward not in model._forward_pre_hooks.values():
        # first among the pre-hooks (after the record's): what the user's own pre-hooks make
        # (position ids added to the inputs) is followed too
        model.register_forward_pre_hook(_enter_forward, with_kwargs=True, prepend=True)
        hooks = model._forward_pre_hooks
        for key in [k for k, h in hooks.items() if h is _forward._open]:
            hooks.move_to_end(key, last=False)
        model.register_forward_pre_hook(_forward._refresh_hint, with_kwargs=True)
        model.register_forward_hook(_exit_forward, with_kwargs=True, always_call=True)
