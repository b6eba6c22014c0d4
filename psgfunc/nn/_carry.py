"""Rule B, followed: where each shell output's batch dim goes through the ops between shells.

While a converted model's forward runs with gradients on, the torch-function mode of
:mod:`psgfunc.nn.generic` calls :func:`carry` after every torch op. For each tensor that
derives from a shell's output, :attr:`psgfunc.nn._forward.Record.moved` keeps where its batch
is: a dim (``>= 0``), ``-1`` (none to trust: tensors of different layouts combined, or an op
that mixes entries along the batch), :data:`PACKED` (a ``PackedSequence``'s data) or
:data:`SINGLE` (one example); which example each of its rows holds (``None``: in order;
a LongTensor; a tuple ``(inner, outer)`` for a batch merged with another dim by a reshape);
and the shell whose output it derives from. :func:`psgfunc.nn._forward.consume` checks a
shell's input against it. An output derived from a followed tensor that no rule here
places (dims added or dropped before the batch's, the batch dim's size changed, a
reduction over it) gets ``-1``: a shell reading it is refused rather than left to the
sizes check, which a moved batch can pass by chance. Tensors derived from no shell output
(the model's inputs, constants) and ops the mode does not see (under ``torch.vmap``,
TorchScript) are not followed: the shell reading them falls back on the sizes and memory
layout checks of :mod:`psgfunc.nn._forward`.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils.rnn import PackedSequence

if TYPE_CHECKING:
    from psgfunc.nn._forward import Record

__all__ = ["carry", "packed_rows", "in_order", "PACKED", "SINGLE"]


def _properties() -> dict[Any, str]:
    """The tensor properties that permute dims (their getters reach the torch-function mode)."""
    return {getattr(torch.Tensor, n): n for n in ("T", "mT", "H", "mH") if hasattr(torch.Tensor, n)}


_PROPERTIES = _properties()
_SWAPS = frozenset(("transpose", "transpose_", "swapaxes", "swapaxes_", "swapdims", "swapdims_"))


def _norm(dim: Any, ndim: int) -> int:
    return int(dim) + ndim if int(dim) < 0 else int(dim)


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, *names: str, default: Any = None) -> Any:
    """Argument ``i`` (after ``self``), given by position or by one of ``names``."""
    if len(args) > i:
        return args[i]
    return next((kwargs[k] for k in names if k in kwargs), default)


def _index_order(idx: Any, n: int) -> list[int | None] | None:
    """``x[idx]``'s order (see :func:`_order`) for basic indexing (ints, slices, None,
    Ellipsis); None for advanced indexing (tensors, lists, booleans)."""
    items = idx if type(idx) is tuple else (idx,)
    if any(not (type(v) in (int, slice) or v is None or v is Ellipsis) for v in items):
        return None
    used = sum(1 for v in items if type(v) in (int, slice))
    order: list[int | None] = []
    dim = 0
    for v in items:
        if v is None:
            order.append(None)
        elif v is Ellipsis:
            order += range(dim, dim + n - used)
            dim += n - used
        elif type(v) is slice:
            order.append(dim)
            dim += 1
        else:  # an int drops its dim
            dim += 1
    return order + list(range(dim, n))


_STRUCTURAL = frozenset((
    "stack", "__get__", "transpose", "transpose_", "swapaxes", "swapaxes_", "swapdims", "swapdims_", "t", "t_",
    "adjoint", "permute", "movedim", "moveaxis", "unsqueeze", "unsqueeze_", "squeeze", "squeeze_", "select",
    "unbind", "__getitem__",
))  # the ops _order places


def _order(func: Any, name: str, t: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[int | None] | None:
    """For an op that only moves, drops or adds dims of ``t`` (its argument): ``order[i]``,
    the dim of ``t`` at output dim ``i`` (None: a new dim); None for any other op."""
    if name not in _STRUCTURAL:
        return None
    n = t.dim()
    if name == "stack" and args and type(args[0]) in (list, tuple) and any(v is t for v in args[0]):
        d = _norm(_arg(args, kwargs, 1, "dim", default=0), n + 1)
        return [*range(d), None, *range(d, n)]
    if not args or args[0] is not t:
        return None
    if name == "__get__":
        prop = _PROPERTIES.get(getattr(func, "__self__", None))
        if prop in ("T",):
            return list(range(n - 1, -1, -1))
        if prop in ("mT", "mH") or (prop == "H" and n == 2):
            return [*range(n - 2), n - 1, n - 2]
        return None
    if name in _SWAPS:
        a = _norm(_arg(args, kwargs, 1, "dim0", "axis0"), n)
        b = _norm(_arg(args, kwargs, 2, "dim1", "axis1"), n)
        order = list(range(n))
        order[a], order[b] = b, a
        return order  # type: ignore[return-value]
    if name in ("t", "t_", "adjoint"):
        return list(range(n)) if n < 2 else [*range(n - 2), n - 1, n - 2]
    if name == "permute":
        dims = args[1:] if len(args) > 2 or not isinstance(args[1] if len(args) > 1 else None, (tuple, list)) else args[1]
        dims = dims if dims else kwargs.get("dims", ())
        return [_norm(d, n) for d in dims]
    if name in ("movedim", "moveaxis"):
        source, dest = (_arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination"))
        source, dest = ([v] if isinstance(v, int) else list(v) for v in (source, dest))
        source, dest = [_norm(d, n) for d in source], [_norm(d, n) for d in dest]
        moved: list[int | None] = [None] * n
        for sd, dd in zip(source, dest):
            moved[dd] = sd
        others = iter(d for d in range(n) if d not in source)
        return [next(others) if o is None else o for o in moved]
    if name in ("unsqueeze", "unsqueeze_"):
        d = _norm(_arg(args, kwargs, 1, "dim"), n + 1)
        return [*range(d), None, *range(d, n)]
    if name in ("squeeze", "squeeze_"):
        dims = _arg(args, kwargs, 1, "dim")
        dims = range(n) if dims is None else [dims] if isinstance(dims, int) else dims
        gone = {_norm(d, n) for d in dims if t.shape[_norm(d, n)] == 1}
        return [d for d in range(n) if d not in gone]
    if name in ("select", "unbind"):
        d = _norm(_arg(args, kwargs, 1, "dim", default=0), n)
        return [i for i in range(n) if i != d]
    if name == "__getitem__" and len(args) > 1:
        return _index_order(args[1], n)
    return None


def _einsum_dim(args: tuple[Any, ...], src: torch.Tensor, at: int) -> int | None:
    """The output dim of ``torch.einsum``'s where ``src``'s dim ``at`` goes; None when the
    equation does not say (an implicit output, a summed index)."""
    eq = args[0] if args and isinstance(args[0], str) else None
    ops = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    if eq is None:
        return None
    eq = eq.replace(" ", "")
    if "->" not in eq:  # implicit output: the letters used once, in alphabetical order
        letters = eq.replace(",", "").replace("...", "")
        eq += "->" + ("..." if "..." in eq else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    ins, out = eq.split("->")
    specs = ins.split(",")
    if len(specs) != len(ops):
        return None
    # an ellipsis stands for the dims no letter names, broadcast right-aligned across operands
    spans = [getattr(op, "ndim", 0) - len(spec.replace("...", "")) if "..." in spec else 0
             for spec, op in zip(specs, ops)]
    width = max(spans, default=0)
    unnamed = [chr(0x100 + k) for k in range(width)]
    out = out.replace("...", "".join(unnamed))
    for spec, op, span in zip(specs, ops, spans):
        if op is src:
            letters = spec.replace("...", "".join(unnamed[width - span:]))
            if len(letters) != src.dim():
                return None
            pos = out.find(letters[at])
            return None if pos < 0 else pos
    return None


_MATMULS = frozenset(("matmul", "mm", "bmm", "__matmul__", "__rmatmul__"))


def _matmul_dim(name: str, args: tuple[Any, ...], t: torch.Tensor, at: int, out: torch.Tensor) -> int | None:
    """Where ``t``'s dim ``at`` goes in ``out = a @ b`` (``t`` is ``a`` or ``b``); None when
    the product sums over it (``a``'s last dim, ``b``'s second-to-last) or a vector drops it."""
    first = args[1] if name == "__rmatmul__" else args[0]
    n, m = t.dim(), out.dim()
    if n < 2 or (at == n - 1 if t is first else at == n - 2):
        return None
    return m - 1 if at == n - 1 else at + m - n


_RESHAPES = frozenset(("view", "reshape", "view_as", "reshape_as", "unflatten", "_unsafe_view", "flatten", "ravel"))
# ops that mix, pick or move entries along a dim in ways not followed here: along the batch dim
# (or any dim, for as_strided), their output has no batch dim to trust (-1)
_SCRAMBLES = frozenset((
    "as_strided", "rot90", "gather", "take_along_dim", "scatter", "scatter_add", "scatter_reduce",
    "sort", "argsort", "msort", "topk", "kthvalue", "unique", "unique_consecutive", "take", "put",
    "index_add", "index_copy", "index_fill", "index_put", "masked_select", "masked_scatter",
    "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "diff", "fft_fft",
))
_ALIASES = {"concat": "cat", "concatenate": "cat", "unsafe_split": "split", "unsafe_split_with_sizes": "split",
            "split_with_sizes": "split", "row_stack": "vstack"}
_FIXED_DIM = {"vstack": ("cat", 0), "hstack": ("cat", 1), "vsplit": ("tensor_split", 0), "hsplit": ("tensor_split", 1)}
_FACTORIES = frozenset(("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
                        "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"))
_REDUCTIONS = frozenset((
    "sum", "mean", "nansum", "nanmean", "prod", "amax", "amin", "max", "min", "median", "nanmedian", "mode",
    "std", "var", "std_mean", "var_mean", "norm", "logsumexp", "any", "all", "count_nonzero", "argmax", "argmin",
    "aminmax", "quantile", "nanquantile", "linalg_vector_norm",
))


def _reduced(base: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The dims a reduction reduces (a list; ``"all"``: every dim), None for other ops."""
    if base not in _REDUCTIONS or not args or not isinstance(args[0], torch.Tensor):
        return None
    i = 2 if base in ("quantile", "nanquantile", "norm", "linalg_vector_norm") else 1
    dims = _arg(args, kwargs, i, "dim", "axis")
    if base in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return None  # (elementwise max of two tensors)
    if dims is None:
        return "all"
    return [dims] if type(dims) is int else list(dims)


_ROW_OPS = frozenset(("flip", "fliplr", "flipud", "roll", "index_select", "split", "chunk", "tensor_split",
                      "narrow", "unbind", "select"))
_LAST_DIM = frozenset(("sort", "argsort", "topk", "kthvalue", "diff", "fft_fft"))  # dim defaults to -1


def _reshaped(t: torch.Tensor, at: int, rows: Any, o: torch.Tensor) -> tuple[int, Any] | None:
    """For a row-major reshape of ``t`` (batch at ``at``) into ``o``: ``(dim, rows)`` of the
    batch in ``o``. A batch merged with other dims (``[B, T, D] -> [B * T, D]``, or
    ``[T, B, D] -> [T * B, D]``) is kept as ``rows = (inner, outer)``: along ``dim``, index
    ``i = (o_ * B + b) * inner + r``; ``(1, 1)`` is the batch as a whole dim (``rows`` then
    ``None``), to which a reshape back returns. None: not followed (reordered rows merged)."""
    inner, outer = rows if type(rows) is tuple else (1, 1)
    if rows is not None and type(rows) is not tuple:
        return None  # (reordered rows: not followed through a merge)
    size = t.shape[at] // (inner * outer)
    if size == 0:
        return None  # (an empty batch: nothing to misread)
    stride = inner * math.prod(t.shape[at + 1:])  # entries between consecutive examples
    for d in range(o.dim()):
        after = math.prod(o.shape[d + 1:])
        if after == 0 or stride % after:
            continue
        f = stride // after
        if o.shape[d] % (f * size) == 0 and (o.shape[d] > 0 or size == 0):
            g = o.shape[d] // (f * size)
            return d, None if (f, g) == (1, 1) else (f, g)
    return None


def _rows(rows: torch.Tensor | None, size: int) -> torch.Tensor:
    return torch.arange(size) if rows is None else rows


def _item_index(items: tuple[Any, ...], at: int) -> int | None:
    """The position in ``items`` (a :func:`_plain_index`: ints, slices, None, tensors; no
    Ellipsis) of the item that indexes dim ``at``; None when none does."""
    dim = 0
    for k, v in enumerate(items):
        if v is None or type(v) is bool:
            continue
        if dim == at:
            return k
        dim += 1
    return None


def _item_at(items: tuple[Any, ...], at: int) -> Any:
    """The item of ``items`` (a :func:`_plain_index`) that indexes dim ``at``
    (``slice(None)`` when none does)."""
    k = _item_index(items, at)
    return slice(None) if k is None else items[k]


def _plain_index(idx: Any, n: int) -> tuple[Any, ...]:
    """``idx`` as a tuple of ints, slices, None and 1-D-or-more index tensors: numpy arrays,
    ranges and lists become tensors, numpy and 0-dim integer tensors ints, ``True`` None,
    and an Ellipsis the slices it stands for (``...`` then gone)."""
    items = []
    for v in idx if type(idx) is tuple else (idx,):
        if type(v) in (list, range) or type(v).__module__ == "numpy":
            v = torch.as_tensor(v) if not hasattr(v, "item") or getattr(v, "ndim", 1) else v.item()
        if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point() and v.dtype != torch.bool:
            v = int(v)
        if v is True:
            v = None
        items.append(v)
    if any(v is Ellipsis for v in items):
        k = items.index(Ellipsis)
        used = sum(1 for v in items if v is not None and v is not Ellipsis)
        items[k:k + 1] = [slice(None)] * max(n - used, 0)
    return tuple(items)


def _index_rows(idx: Any, t: torch.Tensor, at: int, rows: Any) -> tuple[int, Any] | None:
    """``t[idx]``: ``(at, rows)`` after it, for basic indexing (ints, slices, None, Ellipsis:
    an int on the batch dim leaves :data:`SINGLE`, the one example it picks) and for 1-D
    index tensors among slices; None (no batch dim to trust) for other advanced indexing."""
    n = t.dim()
    items = _plain_index(idx, n)
    order = _index_order(items, n)
    item = _item_at(items, at)
    if order is not None:  # basic
        if at not in order:  # an int picked one example
            return SINGLE, _rows(rows, t.shape[at])[item].reshape(1) if type(item) is int else None
        if type(item) is slice and item != slice(None):
            return order.index(at), _rows(rows, t.shape[at])[item]
        return order.index(at), rows
    if any(v is None for v in items) or len(items) > n:
        return None
    items = (*items, *[slice(None)] * (n - len(items)))
    picks = [k for k, v in enumerate(items) if type(v) is not slice]
    # (an int among index tensors is one more index, broadcast: h[torch.arange(B), -1])
    tensors = [torch.tensor(items[k]) if type(items[k]) is int else items[k] for k in picks]
    if any(not isinstance(v, torch.Tensor) or v.dim() > 1 for v in tensors):
        return None
    if len(picks) > 1 and (any(v.dtype == torch.bool for v in tensors)
                           or len({v.shape[0] for v in tensors if v.dim() == 1}) > 1):
        return None  # (masks among several indices, or indices that broadcast: not followed)
    full = _rows(rows, t.shape[at])
    adjacent = picks == list(range(picks[0], picks[0] + len(picks)))
    block = picks[0] if adjacent else 0  # where the indexed dims' one result dim goes
    if at in picks:
        pick = tensors[picks.index(at)].cpu()
        if pick.dim() == 0:  # one example picked (the others' indices select within it)
            return SINGLE, full[pick.long()].reshape(1)
        return block, full[pick if pick.dtype == torch.bool else pick.long()]
    kept = [d for d in range(n) if d not in picks]
    new = (at if at < picks[0] else at - len(picks) + 1) if adjacent else 1 + kept.index(at)
    item = items[at]
    return new, (rows if item == slice(None) else full[item])


SINGLE = -4
"""The batch "dim" of one example picked by an int index (``h[i]``, ``h.select(0, i)``,
``h.unbind(0)``): no batch dim; the entry's rows name the example, for a ``torch.stack``
that rebuilds the batch."""


_FIRST = ("input", "self", "tensors", "tensor", "data", "x")


def _positional(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` with the op's main tensor (and a matmul's second one) moved there from
    ``kwargs`` when given by keyword (``torch.transpose(input=h, dim0=0, dim1=1)``)."""
    if not kwargs or (args and not (name in _MATMULS and len(args) == 1)):
        return args, kwargs
    kwargs = dict(kwargs)
    if not args:
        key = next((k for k in _FIRST if k in kwargs), None)
        if key is None:
            return args, kwargs
        args = (kwargs.pop(key),)
    if name in _MATMULS and len(args) == 1:
        key = next((k for k in ("other", "mat2") if k in kwargs), None)
        if key is not None:
            args = (*args, kwargs.pop(key))
    return args, kwargs


def _carry_base(moved: dict[int, Any], view: torch.Tensor) -> None:
    """After a write into ``view`` of another tensor (``out[p].copy_(h[i])``, ``v =
    out.view(B, -1); v[p] = ...``): what ``view`` now holds, said of its base. A batch dim
    of the view maps to the base's dim of the same stride and size; a single example, rows
    out of order, or a dim that maps nowhere leave the base no batch dim to trust."""
    entry = moved.get(id(view))
    if entry is None or entry[0]() is not view:
        return
    base = view._base
    at, producer, rows = entry[1], entry[2], entry[3]
    own = moved.get(id(base))
    own = own if own is not None and own[0]() is base else None
    lands = -1
    if at == SINGLE and rows is not None:
        k, p = _selected(base, view)
        if k is not None and (own is None or (own[1] == k and type(own[3]) is not tuple)):
            filled = _rows(own[3], base.shape[k]).clone() if own is not None else torch.full((base.shape[k],), -1)
            if filled[p] < 0 or filled[p] == rows[0]:
                filled[p] = rows[0]
                moved[id(base)] = (weakref.ref(base), k, producer, filled)
                return
    if at >= 0 and type(rows) is not tuple and in_order(rows, view.shape[at]):
        match = [k for k in range(base.dim())
                 if base.stride(k) == view.stride(at) and base.shape[k] == view.shape[at]]
        if (len(match) == 1 and _starts_at_zero(base, view, match[0])
                and (own is None or (own[1] == match[0] and in_order(own[3], base.shape[match[0]])))):
            lands = match[0]
    if lands < 0 or own is None:
        moved[id(base)] = (weakref.ref(base), lands, producer, None)


def _starts_at_zero(base: torch.Tensor, view: torch.Tensor, k: int) -> bool:
    """Whether ``view`` (whose batch dim has ``base``'s dim ``k``'s stride and size) starts
    at coordinate 0 of dim ``k``: its offset into ``base``, spelled in ``base``'s strides
    from the largest, has no part along ``k`` (a view through a reshape may start one row
    into it and run into the next slice, the rows then shifted)."""
    offset = view.storage_offset() - base.storage_offset()
    for d in sorted(range(base.dim()), key=lambda d: -base.stride(d)):
        stride = base.stride(d)
        if stride <= 0:
            continue
        coord, offset = divmod(offset, stride)
        if d == k and coord != 0:
            return False
        if coord >= base.shape[d]:
            return False
    return offset == 0


def _selected(base: torch.Tensor, view: torch.Tensor) -> tuple[int | None, int]:
    """``(k, p)`` when ``view`` is ``base.select(k, p)`` (same storage, base's strides and
    sizes without dim ``k``, offset ``p`` strides of ``k``); ``(None, 0)`` otherwise."""
    if view.dim() != base.dim() - 1:
        return None, 0
    offset = view.storage_offset() - base.storage_offset()
    for k in range(base.dim()):
        rest = [d for d in range(base.dim()) if d != k]
        if ([base.stride(d) for d in rest] == list(view.stride()) and [base.shape[d] for d in rest] == list(view.shape)
                and base.stride(k) > 0 and offset % base.stride(k) == 0 and 0 <= offset // base.stride(k) < base.shape[k]):
            return k, offset // base.stride(k)
    return None, 0


def _found(moved: dict[int, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[Any, ...]]:
    """``(tensor, batch dim, shell, rows)`` of each argument (or list or tuple element)
    :func:`carry` follows."""
    found = []
    for a in (*args, *kwargs.values()) if kwargs else args:
        for t in (a,) if isinstance(a, torch.Tensor) else a if type(a) in (list, tuple) else ():
            entry = moved.get(id(t)) if isinstance(t, torch.Tensor) else None
            if entry is not None and entry[0]() is t:
                found.append((t, *entry[1:]))
    return found


def carry(record: Record, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    """After a torch function ran in a followed forward: where the batch of its outputs is,
    and in which order its rows are, when an argument derives from a shell's output
    (:attr:`Record.moved`). An op that only moves, drops or adds dims (``transpose``,
    ``permute``, ``movedim``, ``.T``/``.mT``, ``unsqueeze``, ``squeeze``, ``select``,
    ``unbind``, ``flatten``, ``stack``, basic indexing, row-major ``view``/``reshape``) moves it
    as it moves that dim (one example picked: :data:`SINGLE`; merged with another dim: rows
    ``(inner, outer)``), as do ``einsum`` and matmuls (a summed batch: ``-1``) and
    reductions over other dims. Ops that reorder or pick rows
    along the batch dim (``flip``, ``roll``, ``index_select``, one index tensor, ``split``/
    ``chunk``/``narrow`` and ``cat`` back) carry which example each row holds; ops that mix
    entries along it in ways not followed (``gather``, ``sort``, ``as_strided``, ``cumsum``,
    ...) give ``-1``. Any other output with an argument's number of dims and the same size at
    that argument's batch dim keeps it (elementwise ops, slicing other dims,
    ``contiguous``). Arguments whose batch lands at different dims, or whose rows differ,
    give ``-1`` (no batch dim), as does an output no rule places."""
    moved = record.moved
    found = _found(moved, args, kwargs) if moved else None
    if not found:
        return  # (nothing here derives from a shell's output: the common case, kept cheap)
    name = getattr(func, "__name__", "")
    args, kwargs = _positional(name, args, kwargs)
    if name == "__setitem__":
        _carry_write(moved, *args[:3])
        if args and isinstance(args[0], torch.Tensor) and args[0]._base is not None:
            _carry_base(moved, args[0])
        return
    target = args[0] if args and name.endswith("_") and not name.endswith("__") else kwargs.get("out")
    if name == "copy_" and args:  # self takes the batch dim of what is written into it
        moved.pop(id(args[0]), None)
        found = [f for f in found if f[0] is not args[0]]
        args = args[1:]
    if name in _FACTORIES:  # (shape and dtype only: a constant, no example in it)
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                moved.pop(id(o), None)
        return
    if not found:
        return
    if name in ("_pack_padded_sequence", "_pad_packed_sequence") and isinstance(out, (tuple, list)) and out:
        _carry_packing(moved, name, args, kwargs, found[0], out[0])
        return
    base = _ALIASES.get(name.rstrip("_"), name.rstrip("_"))
    if base in _FIXED_DIM:  # (vstack, hstack, vsplit, hsplit: cat or split along a fixed dim)
        base, kwargs = _FIXED_DIM[base][0], {**kwargs, "dim": _FIXED_DIM[base][1]}
        args = args[:1] if base == "cat" else args[:2]
    # (torch.return_types of max, sort, topk, ... are tuples too)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    single = isinstance(out, torch.Tensor)
    reduced = _reduced(base, args, kwargs)
    orders = [_order(func, name, t, args, kwargs) for t, _, _, _ in found]
    offset = 0  # (split/chunk/tensor_split/unbind along the batch dim: rows of each part)
    for o in outs:
        if not isinstance(o, torch.Tensor):
            continue
        states, producer = [], found[0][2]
        for (t, at, who, rows), order in zip(found, orders):
            new, new_rows = None, rows
            if at == PACKED:
                new = PACKED if o.shape == t.shape else -1  # (elementwise ops on packed data)
            elif at == SINGLE:  # one example: what ops make from it alone is that example's
                if base == "stack":  # (in order: a batch again)
                    new, new_rows = _stacked(moved, base, args, kwargs, o)
                elif base == "cat":  # (in order: a batch merged with the cat dim)
                    new, new_rows = _stacked(moved, base, args, kwargs, o)
                    if new >= 0:
                        if new_rows is None or not in_order(new_rows, new_rows.numel()):
                            new, new_rows = -1, None
                        else:
                            parts = args[0] if args and type(args[0]) in (list, tuple) else ()
                            sizes = {p.shape[new] if p.dim() > new else -1 for p in parts if isinstance(p, torch.Tensor)}
                            inner = o.shape[new] // new_rows.numel()
                            if len(sizes) != 1:  # (examples of different lengths: no batch layout)
                                new, new_rows = -1, None
                            else:
                                new_rows = None if inner == 1 else (inner, 1)
                elif order is not None and t is args[0] and order.count(None) == 1 and len(order) == o.dim():
                    new, new_rows = order.index(None), rows  # (unsqueeze, x[None]: a batch of one)
                else:
                    new, new_rows = SINGLE, rows
            elif at < 0:
                new = -1
            elif type(rows) is tuple and (base in _ROW_OPS or name == "__getitem__") and t is args[0] or (
                    type(rows) is tuple and base == "cat"):
                new = -1  # (a merged batch picked or reordered: not followed)
            elif base in _SCRAMBLES or base == "rot90":
                if base in ("as_strided", "take", "put"):
                    dims: Any = [at]
                elif base == "rot90":
                    dims = _arg(args, kwargs, 2, "dims", default=(0, 1))
                elif base in ("topk", "kthvalue", "diff", "fft_fft"):  # (k or n first)
                    dims = [_arg(args, kwargs, 2, "dim", default=-1)]
                else:
                    dims = [_arg(args, kwargs, 1, "dim", default=-1 if base in _LAST_DIM else 0 if base == "msort" else None)]
                hit = any(type(d) is not int or _norm(d, t.dim()) == at for d in dims)
                new = -1 if hit else at if o.dim() == t.dim() and o.shape[at] == t.shape[at] else None
            elif base in ("flip", "fliplr", "flipud", "roll") and t is args[0]:
                dims = _arg(args, kwargs, 1, "dims") if base == "flip" else (
                    [1] if base == "fliplr" else [0] if base == "flipud" else _arg(args, kwargs, 2, "dims"))
                dims = [dims] if type(dims) is int else dims
                if dims is None:  # (roll of the flattened tensor)
                    new = -1
                else:
                    new = at
                    if at in {_norm(d, t.dim()) for d in dims}:
                        r = _rows(rows, t.shape[at])
                        if base == "roll":
                            shifts = _arg(args, kwargs, 1, "shifts")
                            shifts = [shifts] if type(shifts) is int else list(shifts)
                            shift = sum(sh for sh, d in zip(shifts, dims) if _norm(d, t.dim()) == at)
                            new_rows = r.roll(shift)
                        else:
                            new_rows = r.flip(0)
            elif base == "index_select" and t is args[0]:
                dim = _norm(_arg(args, kwargs, 1, "dim"), t.dim())
                new = at
                if dim == at:
                    new_rows = _rows(rows, t.shape[at])[_arg(args, kwargs, 2, "index").long().cpu()]
            elif name == "__getitem__" and t is args[0]:
                picked = _index_rows(args[1], t, at, rows)
                new, new_rows = (-1, None) if picked is None else picked
            elif base in ("split", "chunk", "tensor_split", "narrow") and t is args[0]:
                dim = _arg(args, kwargs, 2 if base != "narrow" else 1, "dim", default=0)
                new = at
                if _norm(dim, t.dim()) == at:
                    if base == "narrow":
                        start = _arg(args, kwargs, 2, "start")
                        new_rows = _rows(rows, t.shape[at])[start:start + o.shape[at]]
                    else:
                        new_rows = _rows(rows, t.shape[at])[offset:offset + o.shape[at]]
                        offset += o.shape[at]
            elif base == "cat" and type(args[0]) in (list, tuple):
                dim = _norm(_arg(args, kwargs, 1, "dim", default=0), o.dim())
                new = at if o.dim() == t.dim() else None
                if new is not None and dim == at:
                    parts = []
                    for part in args[0]:
                        e = moved.get(id(part)) if isinstance(part, torch.Tensor) else None
                        if e is None or e[0]() is not part or e[1] != at or type(e[3]) is tuple:
                            parts.append(torch.full((part.shape[at] if part.dim() > at else 0,), -1))
                        else:
                            parts.append(_rows(e[3], part.shape[at]))
                    new_rows = torch.cat(parts)
                    whole = t.shape[at]
                    if len(parts) > 1 and all(in_order(r, whole) for r in parts):
                        new_rows = (1, len(parts))  # (the batch k times over: a merged batch)
            elif order is not None:
                new = order.index(at) if at in order and len(order) == o.dim() else None
                if at not in order and base in ("select", "unbind") and _norm(_arg(args, kwargs, 1, "dim", default=0), t.dim()) == at:
                    i = offset if base == "unbind" else int(_arg(args, kwargs, 2, "index"))
                    new, new_rows = SINGLE, _rows(rows, t.shape[at])[i].reshape(1)
                    offset += base == "unbind"
            elif single and name == "einsum":
                new = _einsum_dim(args, t, at)
            elif single and name in _MATMULS:
                new = _matmul_dim(name, args, t, at, o)
            elif base in _RESHAPES and t is args[0]:
                # (a batch the reshape splits or scatters: none to trust, so that the
                # checks by sizes, which may match by chance, are not asked)
                follows = _reshaped(t, at, rows, o)
                new, new_rows = (-1, None) if follows is None else follows
            elif reduced is not None and t is args[0]:
                dims = range(t.dim()) if reduced == "all" else {_norm(d, t.dim()) for d in reduced}
                # (keepdim's place: after p or q, or after std/var's positional unbiased)
                i = 3 if base in ("quantile", "nanquantile", "norm", "linalg_vector_norm", "std", "var",
                                  "std_mean", "var_mean") else 2
                keep = bool(_arg(args, kwargs, i, "keepdim", default=False)) and reduced != "all"
                if at in dims:
                    new = -1  # (a reduction over the batch: every example in each entry)
                else:
                    new = at if keep else at - sum(1 for d in dims if d < at)
                    if o.dim() <= new:
                        new = None
            elif o.dim() == t.dim() and o.shape[at] != t.shape[at]:
                # the batch dim changed size: a batch of one (one example) broadcast over a
                # batch, or examples repeated or summed: no batch dim to trust
                new = -1
            elif o.dim() == t.dim() or (o.dim() > at and o.shape[:at + 1] == t.shape[:at + 1]):
                new = at  # (shape-keeping ops; ops that add or drop dims after the batch's)
            if new is None:
                # an output derived from this argument that no rule places (an op that adds
                # or drops dims before the batch, a summed batch): no batch dim to trust, so
                # that a reorder after it cannot pass for one in order
                new, new_rows = -1, None
            states.append((new, new_rows))
            producer = who
        if not states:
            moved.pop(id(o), None)
            continue
        at, rows = states[0]
        for other, other_rows in states[1:]:
            merged = _merge_rows(rows, other_rows, o.shape[at] if at >= 0 else 0) if other == at else False
            if merged is False:
                at, rows = -1, None
                break
            rows = merged
        if o.dim() == 0 and at not in (SINGLE, -1):
            moved.pop(id(o), None)
            continue
        moved[id(o)] = (weakref.ref(o), at, producer, None if at == -1 else rows)
        if o._base is not None and o is target:
            _carry_base(moved, o)  # (an in-place write into a view: its base changed too)


def _merge_rows(a: Any, b: Any, size: int) -> Any:
    """The rows of an op on two tensors whose rows are ``a`` and ``b``; False when they hold
    different examples. A row ``-1`` holds none (not written yet, or data not from a
    followed layer) and takes the other's."""
    if type(a) is tuple or type(b) is tuple:
        return a if a == b else False
    if a is None and b is None:
        return None
    ra, rb = _rows(a, size), _rows(b, size)
    if ra.shape != rb.shape:
        return False
    if not bool(((ra == rb) | (ra < 0) | (rb < 0)).all()):
        return False
    return torch.where(ra < 0, rb, ra)


def in_order(rows: Any, size: int) -> bool:
    """Whether ``rows`` (which example each row holds) is the examples in order, as a whole
    dim (not merged: a tuple); rows ``-1`` hold no example and fit anywhere."""
    if type(rows) is tuple:
        return False
    if rows is None:
        return True
    return rows.numel() == size and bool(((rows == torch.arange(size)) | (rows < 0)).all())


def _carry_write(moved: dict[int, Any], dst: Any, idx: Any, src: Any) -> None:
    """``dst[idx] = src``: where ``src``'s batch lands in ``dst`` and which rows of it the
    write reaches (a time-major buffer filled ``out[t] = h_t``; ``out[i] = h[i]``;
    ``out[1:] = h[:-1]`` shifts the examples); rows not written yet hold none (``-1``).
    ``dst`` keeps its own rows where they agree; a row given another example in part, or a
    write not followed, leaves it no batch dim to trust (``-1``)."""
    entry = moved.get(id(src)) if isinstance(src, torch.Tensor) else None
    if entry is None or entry[0]() is not src or not isinstance(dst, torch.Tensor):
        return  # (nothing followed written: dst keeps what it had)
    at, producer, written = entry[1], entry[2], entry[3]
    items = _plain_index(idx, dst.dim())
    lands, where = -1, None
    if at == SINGLE:  # one example into one row (and maybe part of it): out[i] = h[i], out[i, :n] = ...
        if written is not None and items and type(items[0]) is int and all(type(v) is slice for v in items[1:]):
            lands, where = 0, torch.tensor([items[0]])
    elif at >= 0 and type(written) is not tuple:
        picks = [k for k, v in enumerate(items) if isinstance(v, torch.Tensor)]
        pick = picks[0] if len(picks) == 1 and items[picks[0]].dim() == 1 and items[picks[0]].dtype != torch.bool else None
        tensor = None if pick is None else items[pick].cpu().long()
        if pick is not None:  # one index tensor (out[torch.arange(B)] = h): placed like a slice
            items = (*items[:pick], slice(None), *items[pick + 1:])
        order = _index_order(items, dst.dim())
        view_dim = None if order is None else at + len(order) - src.dim()
        if order is not None and 0 <= view_dim < len(order) and order[view_dim] is not None:
            lands = order[view_dim]
            k = _item_index(items, lands)
            item = slice(None) if k is None else items[k]
            where = (torch.arange(dst.shape[lands])[tensor] if k is not None and k == pick else
                     None if pick is not None and k is None else
                     torch.arange(dst.shape[lands])[item] if type(item) is slice else None)
            written = _rows(written, src.shape[at])
    own = moved.get(id(dst))
    own = own if own is not None and own[0]() is dst else None
    rows = None
    if (lands < 0 or where is None or where.numel() != written.numel()
            or (own is not None and (own[1] != lands or type(own[3]) is tuple))):
        lands = -1  # (broadcast over the dim, an advanced index, a merged batch: not followed)
    else:
        rows = _rows(own[3], dst.shape[lands]).clone() if own is not None else torch.full((dst.shape[lands],), -1)
        before = rows[where]
        if own is not None and not bool(((before < 0) | (before == written)).all()):
            lands, rows = -1, None  # (a row given another example, maybe in part: mixed)
        else:
            rows[where] = written
            rows = None if in_order(rows, rows.numel()) and bool((rows >= 0).all()) else rows
    moved[id(dst)] = (weakref.ref(dst), lands, producer, rows)


PACKED = -3
"""The batch "dim" of a ``PackedSequence``'s data ``[N, *]``: its examples' time steps packed
along dim 0, in the order the entry's rows give (which example each packed sequence is)."""


def _carry_packing(moved: dict[int, Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   found: tuple[Any, ...], out: torch.Tensor) -> None:
    """``_pack_padded_sequence(input, lengths, batch_first)``: the packed data holds the
    input's examples in its row order; ``_pad_packed_sequence(data, batch_sizes,
    batch_first, ...)``: the padded tensor holds the packed sequences at its batch dim."""
    t, at, producer, rows = found
    batch_first = bool(_arg(args, kwargs, 2, "batch_first", default=False))
    dim = 0 if batch_first else 1
    if name == "_pack_padded_sequence":
        whole = t is (args[0] if args else kwargs.get("input")) and at == dim and type(rows) is not tuple
        moved[id(out)] = (weakref.ref(out), PACKED if whole else -1, producer, rows if whole else None)
    elif at == PACKED and t is (args[0] if args else kwargs.get("data")):
        moved[id(out)] = (weakref.ref(out), dim, producer, rows)
    else:
        moved[id(out)] = (weakref.ref(out), -1, producer, None)


def packed_rows(record: Record, x: PackedSequence) -> tuple[Any, Any] | None:
    """``(entry, rows)`` of a PackedSequence's data followed by :func:`carry`: which example
    each of its sequences is, in the order the shell reads them (``unsorted_indices``
    applied); None when its data is not followed."""
    entry = record.moved.get(id(x.data))
    if entry is None or entry[0]() is not x.data:
        return None
    if entry[1] != PACKED:
        return entry, None
    rows = entry[3]
    if rows is not None and x.unsorted_indices is not None:
        rows = rows[x.unsorted_indices.cpu()]
    return entry, rows


def _stacked(moved: dict[int, Any], base: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             o: torch.Tensor) -> tuple[int, Any]:
    """``torch.stack`` of single examples (:data:`SINGLE`): a batch at the stacked dim, its
    rows the examples stacked; ``-1`` when a part is not a followed single example."""
    parts = args[0] if args and type(args[0]) in (list, tuple) else ()
    rows = []
    for part in parts:
        e = moved.get(id(part)) if isinstance(part, torch.Tensor) else None
        if e is None or e[0]() is not part or e[1] != SINGLE or e[3] is None:
            return -1, None
        rows.append(e[3])
    if rows and all(torch.equal(r, rows[0]) for r in rows[1:]):
        return SINGLE, rows[0]  # (pieces of one example: that example still)
    dim = _norm(_arg(args, kwargs, 1, "dim", default=0), o.dim())
    return dim, torch.cat(rows) if rows else None
