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
to every example as they are. Tensor outputs must have the example's leading 1 (a module that
keeps the batch dim); it is removed and the examples are stacked back to ``[B, ...]``.
"""

from __future__ import annotations

import functools
from typing import Any

import optree
import torch
from torch import nn
from torch.func import vmap
from torch.nn.utils.stateless import _reparametrize_module

from psgfunc import _rules
from psgfunc.nn import _forward
from psgfunc.nn._base import ExpandedModule, check_max_batch_size
from psgfunc.per_sample import _torch_ops
from psgfunc.per_sample._expanded import expanded_call

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
        if first is None:
            raise ValueError(
                f"{type(self).__name__}: the forward needs a tensor input whose dim 0 is the "
                "batch (a psgfunc generic shell reads the batch size from it), got none"
            )
        size = self._batch_size(first, min_dim=1, expected="[B, ...]")
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        if not params or not torch.is_grad_enabled():
            return _forward.produce(self, plain(*args, **kwargs), 0)
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
        batched = [
            isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size for t in leaves
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


def _module_body(module: nn.Module, plain: Any, views: dict[str, torch.Tensor], args: Any, kwargs: Any) -> Any:
    """A generic shell's own forward on one example, with ``views`` as its parameters."""
    with _reparametrize_module(module, views):
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
