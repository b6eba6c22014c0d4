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
from typing import Any, Callable, Iterator

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

__all__ = ["register", "rule_for", "active", "suspend", "resume", "METHODS"]

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
        return rule

    return decorate


def rule_for(torch_fn: Callable[..., Any]) -> Rule | None:
    """The rule registered for ``torch_fn``, or None."""
    return _RULES.get(torch_fn)


class _Mode(TorchFunctionMode):
    """Hands registered torch functions to their rules (torch pops the mode meanwhile)."""

    def __init__(self, method: str):
        super().__init__()
        self.method = method

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None:
            out = rule(self.method, func, args, kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def active(method: str) -> Iterator[None]:
    """Within this block, torch functions that ``fn`` calls go through the registered rules.

    Off while ``torch.compile`` traces (the compiled paths trace ``fn`` their own way).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if torch.compiler.is_compiling():
        yield
        return
    with _Mode(method):
        yield


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


@functools.lru_cache(maxsize=None)
def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(fn)


def _bind(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """All of ``fn``'s arguments by name, defaults filled in."""
    bound = _signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


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
    if method == "expanded" and not scale_grad_by_freq and _is_batched(weight):
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
    if (method == "expanded" and not a["scale_grad_by_freq"] and _is_batched(a["weight"])
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
