"""A record of each forward pass: which dim every shell read as the batch, and how many examples.

A shell reads the batch size from its input's dim 0, except the time-major recurrent shells
(``DPLSTM`` with ``batch_first=False``, ``DPLSTMLayer``, ``BidirectionalDPLSTMLayer``), which
read it from dim 1. A tensor ``[T, B, H]`` that a time-major shell returns and a batch-first
shell then reads would be taken as a batch of ``T`` examples: with ``T != B`` the
``grad_sample`` sizes disagree, with ``T == B`` each example's gradient would silently get
the rows of other examples. A single layer cannot see this; the record of the whole forward
can.

:func:`psgfunc.nn.expand_weights` puts two hooks on the model it returns: a forward pre-hook
opens a :class:`Record`, a forward hook (also called when the forward raises) closes it. While
one is open, every shell call:

* checks that it reads the forward's batch size (the first shell's; rule A): a layer that
  reads another dim, or a batch-1 tensor shared by every example, can never give per-example
  gradients, so it raises a ValueError instead of leaving mismatched ``grad_sample`` s;
* (rule B, followed) while the forward runs with gradients on, the torch-function mode of
  :mod:`psgfunc.nn.generic` follows where each shell output's batch dim goes through the
  ops between shells, and which example each of its rows holds (:func:`~psgfunc.nn._carry.carry`:
  ``transpose``, ``permute``, ``movedim``, ``.T``, ``einsum``, matmuls, indexing, ``stack``,
  ``view``/``reshape`` move it, also merged with another dim; ``flip``, ``roll``,
  ``index_select``, a tensor index, ``split`` and ``cat`` reorder its rows; shape-keeping
  ops keep it; ``gather``, ``sort``, ``as_strided`` along it leave no batch dim to trust):
  a shell whose input has its batch at another dim than the one it reads, merged, or with
  its examples out of order raises, at any sizes (HF Longformer's ``hidden.transpose(0,
  1)`` into a batch-first Linear; ``attention_out + x`` of a time-major attention into one;
  examples sorted by length and not restored). What the mode does not follow (the model's
  own inputs, ops under ``torch.vmap`` or TorchScript, outputs it cannot place) falls back
  on the next check;
* (rule B, by sizes and layout: what the mode did not follow) looks for the most recent
  earlier shell output whose ndim and first two sizes equal those of its input, a tensor
  its input most likely derives from through shape-keeping ops (dropout, activations,
  residual adds); when that output had the batch at the other dim (rule B),
  the input must have been transposed on the way. ``T != B``: the sizes prove no transpose
  happened, so the call raises. ``T == B``: shapes cannot tell; the memory layout can: a
  transposed view, and any elementwise op on one (they keep the layout), has its dim 1
  outermost in memory (``x.stride(0) < x.stride(1)``), while a tensor from shape-keeping ops
  alone keeps the producer's layout. A ``T == B`` input without that layout (e.g.
  ``out.transpose(0, 1).contiguous()``) is refused as ambiguous, never guessed.
* an ``Embedding`` whose indices have a leading dim of 1 while the forward's batch is
  ``B != 1`` (position ids ``arange(T)[None]`` added to every example's token embeddings)
  looks them up once per example (``idx.expand(B, ...)``, output ``[B, *, D]``): a shared
  lookup's output gradient reaches the layer summed over the examples, so only a per-example
  lookup keeps each example's gradient. ``B`` is the forward's batch when a shell has read
  it, else the leading size of the model's first tensor input.

* (rule C) checks that its input is not a constant of the forward. While the forward runs
  with gradients on, the torch-function mode of :mod:`psgfunc.nn.generic` follows which
  tensors are the same for every example: the model's parameters and buffers, the outputs
  of deterministic factories (``torch.arange``, ``zeros``, ``ones``, ``full``, ``linspace``,
  ``eye``, ``*_like``, ``new_*``) and of non-random ops on constants only (:func:`follow`).
  A constant the outermost running shell is called with, whose slices along the batch dim
  differ (``torch.arange(T)`` position ids, a ``[T, T]`` mask, T5's relative-position
  buckets), has nothing per example: its dim 0 is not the batch, even when its size is
  ``B``. A shell refuses it (:func:`is_shared`); a generic shell and a plain op on the
  model's parameters give it whole to every example. Whatever the mode cannot follow (the
  model's inputs, random draws, ``torch.tensor`` of Python data, what TorchScript, numpy or
  an extension makes) may hold the examples and is read as before. A constant whose slices
  are all equal (``torch.zeros(B, T)``, HF's default token types) or expanded along the
  batch dim (``cls.expand(B, ...)``) is taken as batched (shapes cannot tell; most often
  its dim was built for the batch), but does not set the forward's batch size. Left open: a
  tensor of ``M`` equal slices meant as ``M`` slots every example uses, with ``M == B``.

Outside such a forward (shells called directly, in a model not passed to ``expand_weights``)
there is no record to compare batch sizes with; only the most direct case is caught: a
batch-first shell given a time-major shell's output, or a view of it (same storage, same
leading sizes), that is still alive and not transposed. What passes through other ops
(dropout, activations) is not seen there.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Iterator
from typing import Any

import optree
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from psgfunc.nn import _carry
from psgfunc.nn._carry import carry

__all__ = ["Record", "install", "current", "consume", "produce", "broadcast_batch", "judge", "follow", "mark",
           "is_constant", "is_shared", "carry", "frozen"]


class Record:
    """What the shells of one forward pass read: the batch size and each output's layout."""

    __slots__ = ("root", "depth", "hint", "batch", "source", "outputs", "data", "shell", "shell_inputs",
                 "pending", "moved")

    def __init__(self, root: nn.Module | None, hint: int | None):
        self.root, self.depth, self.hint = root, 1, hint
        self.batch: int | None = None  # the forward's batch size, once a shell has read it
        self.source: tuple[nn.Module, int | None] | None = None  # who read it first, at which dim
        # (ndim, first two sizes) of each shell output -> (its batch dim, the shell), latest wins
        self.outputs: dict[tuple[int, int, int], tuple[int, nn.Module]] = {}
        # id -> weak reference of the forward's constants (parameters, buffers, factories and
        # ops on those only: see follow()); None when the forward is not followed
        self.data: dict[int, tuple[weakref.ref, int]] | None = None
        self.shell: nn.Module | None = None  # the outermost shell running (its checks apply)
        self.shell_inputs: tuple[Any, ...] = ()  # the arguments that shell was called with
        # (shell, size, dim, shape) of constants read as batched before the batch was known
        self.pending: list[tuple[nn.Module, int, int | None, tuple[int, ...]]] = []
        # id -> (weak reference, where its batch is, the shell whose output it derives from,
        # which example each row holds) for shell outputs and what ops make from them, when
        # the forward is followed (``data`` is not None): see psgfunc.nn._carry
        self.moved: dict[int, tuple[weakref.ref, int, nn.Module, Any]] = {}

    def name(self, module: nn.Module) -> str:
        """``module``'s qualified name in the model, for messages."""
        if self.root is None:
            return type(module).__name__
        for qualname, m in self.root.named_modules(remove_duplicate=False):
            if m is module:
                return f"{type(m).__name__} {qualname!r}" if qualname else f"{type(m).__name__} (the model)"
        return type(module).__name__


_CURRENT: contextvars.ContextVar[Record | None] = contextvars.ContextVar("psgfunc_nn_forward", default=None)

_LOOSE: list[tuple[weakref.ref, nn.Module]] = []
"""Time-major shell outputs made outside any record (weak: they end with the tensors)."""
_LOOSE_MAX = 32


def current() -> Record | None:
    """The record of the forward pass in progress, or None outside an ``expand_weights`` model."""
    return _CURRENT.get()


def _hint(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Leading size of the model's first tensor input (a ``PackedSequence``: its sequences)."""
    for leaf in optree.tree_leaves((args, kwargs), is_leaf=lambda v: isinstance(v, PackedSequence)):
        if isinstance(leaf, PackedSequence):
            return int(leaf.batch_sizes[0]) if leaf.batch_sizes.numel() else 0
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def _open(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    record = _CURRENT.get()
    if record is None or record.root is module:
        # a new forward; also when `module`'s own record is still open: torch runs forward
        # hooks after an Exception but not after a KeyboardInterrupt, so a record left open
        # by an interrupted forward ends when its model is called again
        _CURRENT.set(Record(module, _hint(args, kwargs)))
    else:  # a converted model called inside another one's forward: one record for both
        record.depth += 1


def _refresh_hint(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """After the pre-hooks registered before the conversion (:func:`_open` runs first, so that
    what they make is followed): the hint from the arguments they leave."""
    record = _CURRENT.get()
    if record is not None and record.root is module and record.batch is None:
        record.hint = _hint(args, kwargs)


def _close(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    record = _CURRENT.get()
    if record is not None:
        record.depth -= 1
        if record.depth <= 0 or record.root is module:
            _CURRENT.set(None)


def install(model: nn.Module) -> None:
    """Give ``model`` the hooks that record each of its forward passes (once)."""
    if _open not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_open, with_kwargs=True)
        model.register_forward_hook(_close, with_kwargs=True, always_call=True)


def broadcast_batch() -> int | None:
    """The batch size a batch-1 index tensor must be looked up for: the forward's, or the
    leading size of the model's input before any shell has read one; None outside a record."""
    record = _CURRENT.get()
    if record is None or torch._C._are_functorch_transforms_active():
        return None  # (under transforms, e.g. in a generic shell, each call sees one example)
    return record.batch if record.batch is not None else record.hint


_FIX = (
    "psgfunc.nn layers read the batch from dim 0, the time-major recurrent ones (DPLSTM with "
    "batch_first=False, DPLSTMLayer, BidirectionalDPLSTMLayer) from dim 1. Use "
    "batch_first=True (DPLSTM and nn.LSTM) and batch-first [B, T, ...] tensors throughout, "
    "or transpose between the two: out.transpose(0, 1)"
)


def consume(shell: nn.Module, x: Any, size: int, batch_dim: int | None, *, data: bool = True) -> None:
    """Check a shell's reading of the batch (``size`` examples at ``batch_dim`` of ``x``).

    Args:
        shell: the shell being called.
        x: its input (the tensor whose ``batch_dim`` holds the batch).
        size: the batch size it read.
        batch_dim: 0 or 1; None when ``x`` has no batch dim to compare (packed, unbatched).
        data: whether ``x`` holds the examples' data: in a followed forward, the outermost
            shell's ``x`` must not be a constant shared by every example (:func:`is_shared`).

    Raises:
        ValueError: ``x`` is most likely a tensor whose batch is at the other dim (rule B) or
            ``size`` differs from the batch size of this forward (rule A).
    """
    if torch._C._are_functorch_transforms_active():
        return  # inside torch.func transforms fn sees one example; no forward record applies
    record = _CURRENT.get()
    if record is not None and _frozen_on_constants(record, shell):
        return  # a constant op: no example to read (its output is a constant too: produce)
    if record is None:
        if _LOOSE and batch_dim == 0 and isinstance(x, torch.Tensor) and x.dim() >= 2:
            _check_loose(shell, x)
        return
    if isinstance(x, PackedSequence):
        packed = _carry.packed_rows(record, x)
        if packed is not None:
            entry, rows = packed
            if entry[1] != _carry.PACKED:
                _refuse_moved(record, shell, x.data, 0, -1, entry[2])
            if not _carry.in_order(rows, size):
                _refuse_reordered(record, shell, x.data, 0, entry[2], "the sequences of its PackedSequence")
    entry = record.moved.get(id(x)) if batch_dim is not None and isinstance(x, torch.Tensor) else None
    if entry is not None and entry[0]() is x:
        # followed from a shell's output through the forward's ops: its batch dim is known
        at, read = entry[1], x.shape[batch_dim]
        if at != batch_dim and (read > 1 or (0 <= at < x.dim() and x.shape[at] > 1)):
            # (a batch of one or none, at both dims, reads the same whichever dim it takes)
            _refuse_moved(record, shell, x, batch_dim, at, entry[2])
        if type(entry[3]) is tuple and entry[1] == batch_dim:
            _refuse_moved(record, shell, x, batch_dim, -2, entry[2])
        if not _carry.in_order(entry[3], x.shape[batch_dim]):
            _refuse_reordered(record, shell, x, batch_dim, entry[2])
    elif batch_dim is not None and isinstance(x, torch.Tensor) and x.dim() >= 2:
        # not followed (a forward without gradients, a compiled one): the leading sizes and
        # the memory layout of x against the shell outputs (rule B)
        found = record.outputs.get((x.dim(), x.shape[0], x.shape[1]))
        if found is not None and found[0] != batch_dim and (x.shape[0], x.shape[1]) != (1, 1):
            _check_crossing(record, shell, found[1], x, batch_dim, found[0])
    if (data and record.shell is shell and batch_dim is not None and isinstance(x, torch.Tensor)
            and any(a is x for a in record.shell_inputs) and is_shared(x, batch_dim)):
        # (only a tensor the shell was called with: what its hooks or its own code made from
        # one is not followed, so carries no evidence either way)
        _refuse_shared(record, shell, x, batch_dim)
    if record.batch is None:
        if record.data is not None and _has(record.data, x):
            # a constant of equal slices (passed as batched) is no evidence of the batch: it
            # is checked against the batch once a shell reads that from the examples
            record.pending.append((shell, size, batch_dim, tuple(x.shape)))
            return
        record.batch, record.source = size, (shell, batch_dim)
        for early, early_size, early_dim, shape in record.pending:
            if early_size != size:
                raise ValueError(
                    f"{record.name(early)} read a batch of {early_size} examples at dim "
                    f"{early_dim} of a constant of the forward {shape} (equal slices: taken as "
                    f"one per example), but this forward's batch has {size} examples (read by "
                    f"{record.name(shell)}): the constant is not built for the batch; give it a "
                    "leading dim of 1 or expand it to the batch"
                )
        record.pending.clear()
    elif size != record.batch:
        first, dim = record.source  # type: ignore[misc]
        who = record.name(first) + ("" if dim is None else f" at dim {dim}")
        where = f" at dim {batch_dim} of its input" if batch_dim is not None else ""
        shared = (
            " A batch-1 tensor shared by every example (e.g. a learned query) gets no "
            "per-example gradients: expand it to the batch first, x.expand(B, *x.shape[1:])."
            if size == 1 else ""
        )
        raise ValueError(
            f"{record.name(shell)} reads a batch of {size} examples{where}, but this forward's "
            f"batch has {record.batch} examples (read first by {who}): every layer of a "
            "forward must see the same examples for their per-sample gradients to belong "
            f"together. Input shape {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}."
            f"{shared} {_FIX}"
        )


def _frozen_on_constants(record: Record, shell: nn.Module) -> bool:
    """Whether ``shell`` is :func:`frozen` and called (as the outermost shell running) with
    constants of the followed forward only: then it computes one more constant, the same
    for every example (HF Whisper's frozen position table looked up with ``arange(T)``), and
    reads no batch. A frozen layer given the examples keeps every check: a recurrent or
    attention layer that took another dim for the batch would mix the examples even with
    nothing to train."""
    if record.data is None or record.shell is not shell:
        return False
    inputs = list(_tensors_in(record.shell_inputs))  # (cheaper than frozen(): asked first)
    return bool(inputs) and all(_has(record.data, t) for t in inputs) and frozen(shell)


def frozen(shell: nn.Module) -> bool:
    """Whether ``shell`` has parameters and none requires a gradient (a frozen layer: it gives
    no per-example gradient). A layer without parameters (``LayerNorm(elementwise_affine=
    False)``) is not frozen."""
    found = False
    for p in shell.parameters():
        if p.requires_grad:
            return False
        found = True
    return found


def _refuse_moved(record: Record, shell: nn.Module, x: torch.Tensor, batch_dim: int, at: int,
                  producer: nn.Module) -> None:
    where = (
        f"its batch is at dim {at}" if at >= 0 else
        "it is a PackedSequence's data (the examples' time steps packed along dim 0)" if at == _carry.PACKED else
        "it holds one example (picked by an int index, select or unbind)" if at == _carry.SINGLE else
        "its batch is merged with another dim into one (a reshape or cat of [B, T, ...] into "
        "[B * T, ...] or [T * B, ...])" if at == -2 else
        "it combines tensors whose batch is at different dims (e.g. a time-major [T, B, ...] "
        "and a batch-first [B, T, ...] one), so it has no batch dim"
    )
    raise ValueError(
        f"{record.name(shell)} reads dim {batch_dim} of its input {tuple(x.shape)} as the batch, "
        f"but that input derives from the output of {record.name(producer)} through ops "
        f"(transpose, permute, movedim, einsum, ...) after which {where}: the layer would take "
        f"{'the time steps (or another dim) for examples' if at >= 0 else 'mixed dims for examples'}"
        " and give each example the gradient rows of others (at T == B the sizes cannot show "
        f"it). Bring the batch to dim {batch_dim} before the layer (x.transpose(0, 1) or "
        "x.movedim(...)), or compute this part with the batch where the layer reads it. "
        + _FIX
    )


def _refuse_reordered(record: Record, shell: nn.Module, x: torch.Tensor, batch_dim: int, producer: nn.Module,
                      what: str | None = None) -> None:
    what = what or f"dim {batch_dim} of its input {tuple(x.shape)}"
    raise ValueError(
        f"{record.name(shell)} reads {what} as the batch, "
        f"but that input derives from the output of {record.name(producer)} through ops that "
        "reordered or picked its examples (flip, roll, index_select, indexing with a tensor, "
        "split and cat in another order): row b of this layer's per-sample gradients would "
        f"belong to another example than row b of {record.name(producer)}'s, and clipping "
        "each row would not bound any one example's influence. Restore the order before the "
        "layer (x[inverse], with inverse = torch.argsort(order)), or reorder the model's "
        "input instead, before its first layer"
    )


def _refuse_shared(record: Record, shell: nn.Module, x: torch.Tensor, batch_dim: int) -> None:
    raise ValueError(
        f"{record.name(shell)} reads dim {batch_dim} of its input {tuple(x.shape)} as a batch of "
        f"{x.shape[batch_dim]} examples, but that input is a constant of the forward (made by "
        "torch.arange/zeros/ones/full/linspace/eye, from parameters or buffers, and ops on "
        "those only: e.g. position ids torch.arange(T), a [T, T] mask or relative-position "
        f"table), so it is shared by every example and its dim {batch_dim} is not the batch: "
        "each example would get the gradient rows of others. Give it a leading dim of 1 "
        "(pos[None]: an Embedding then looks it up once per example) or expand it to the "
        "batch (pos.expand(B, *pos.shape)). If its rows do belong to one example each (e.g. "
        "timesteps torch.linspace(0, 1, B)), build it from Python values, torch.tensor(...), "
        "which psgfunc reads as batch-first data"
    )


def _always_constant() -> frozenset:
    """Torch functions whose values depend on no tensor's values: deterministic factories,
    and ``*_like``/``new_*`` (which read only a tensor's shape, dtype and device)."""
    names = ("arange", "zeros", "ones", "full", "linspace", "logspace", "eye", "tril_indices",
             "triu_indices", "zeros_like", "ones_like", "full_like")
    fns = [getattr(torch, n) for n in names if hasattr(torch, n)]
    fns += [getattr(torch.Tensor, n) for n in ("new_zeros", "new_ones", "new_full") if hasattr(torch.Tensor, n)]
    return frozenset(fns)


_ALWAYS_CONSTANT = _always_constant()
# values from the first argument alone (the others give a dtype, device or shape)
_SELF_ONLY = frozenset(getattr(torch.Tensor, n) for n in ("to", "type_as", "expand_as", "view_as", "reshape_as"))
_RANDOM = frozenset((
    "rand", "normal", "bernoulli", "multinomial", "poisson", "binomial", "_standard_gamma",
    "_sample_dirichlet", "rrelu", "gumbel_softmax", "uniform", "random", "exponential",
    "geometric", "cauchy", "log_normal", "fractional_max_pool2d", "fractional_max_pool3d",
    "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal", "trunc_normal",
    "orthogonal", "sparse",
))  # names (in-place ones without their trailing _) of ops that draw random numbers, besides
# rand*, *dropout* and any call given a generator=
# made from no tensor's values, but not constants: uninitialised (filled where the mode may
# not see it) or Python data (which may come from the examples, e.g. through .tolist())
_NEVER = frozenset(getattr(torch.Tensor, n) for n in ("new_tensor", "new_empty", "new_empty_strided"))
_NEVER |= frozenset(getattr(torch, n) for n in ("empty_like",))


def _random(name: str, kwargs: dict[str, Any]) -> bool:
    base = name.rstrip("_")
    return (base.startswith("rand") or "dropout" in base or base in _RANDOM
            or (bool(kwargs) and kwargs.get("generator") is not None))


def _tensors_in(a: Any) -> Iterator[torch.Tensor]:
    """The tensors in an argument: itself, or inside lists, tuples and slices."""
    if isinstance(a, torch.Tensor):
        yield a
    elif type(a) is list or type(a) is tuple:
        for v in a:
            yield from _tensors_in(v)
    elif type(a) is slice:
        yield from _tensors_in((a.start, a.stop, a.step))


def judge(consts: dict[int, tuple[weakref.ref, int]], func: Any, args: tuple[Any, ...],
          kwargs: dict[str, Any]) -> bool:
    """Whether ``func(*args, **kwargs)`` makes a constant, judged BEFORE it runs (an in-place
    op changes its ``self``'s version, which would make ``self`` look non-constant after);
    pass the result to :func:`follow`."""
    name = getattr(func, "__name__", "")
    if func in _ALWAYS_CONSTANT:
        return True
    if func in _NEVER or name == "__setitem__" or _random(name, kwargs):
        return False
    if name == "__getitem__" and any(type(i) is list for i in (args[1] if type(args[1]) is tuple else (args[1],))):
        return False  # (rows picked by Python numbers, which may come from the examples)
    if func in _SELF_ONLY:
        return _has(consts, args[0])
    if name in ("copy_", "fill_"):  # the whole of self is overwritten: its values do not count
        args = args[1:]
    tensors = list(_tensors_in((args, tuple(kwargs.values()))))
    if name == "fill_" and not tensors:
        return True  # (a Python number)
    # other Python values (numbers, options) count as constants
    return bool(tensors) and all(_has(consts, t) for t in tensors)


def follow(consts: dict[int, tuple[weakref.ref, int]], func: Any, args: tuple[Any, ...],
           kwargs: dict[str, Any], out: Any, const: bool) -> None:
    """After a torch function ran in a followed forward, note whether its outputs are
    constants of the forward: values the same for every example, made by a deterministic
    factory (:data:`_ALWAYS_CONSTANT`) or by a non-random op all of whose tensor arguments
    are constants (parameters and buffers are). A tensor an in-place op writes to (its
    ``self``, ``out=``) takes the op's status; ``x[i] = v`` makes ``x`` no constant (its
    index may come from the examples through Python numbers), as does indexing with a
    Python list. A constant is one as long as its version is (a write through any view of
    it, seen or not, ends it). Anything else (the model's inputs, random draws,
    ``torch.tensor(...)`` of Python data, what code this mode does not see makes) is not a
    constant: it may hold the examples. ``const``: :func:`judge`'s verdict, taken before the
    op ran."""
    name = getattr(func, "__name__", "")
    written = []
    if args and isinstance(args[0], torch.Tensor) and (
        name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))
    ):
        written.append(args[0])
    o = kwargs.get("out") if kwargs else None
    written += [o] if isinstance(o, torch.Tensor) else list(o) if type(o) in (list, tuple) else []
    if const:
        _add(consts, out)
        for t in written:
            _add(consts, t)
    else:
        for t in written:
            if isinstance(t, torch.Tensor):
                consts.pop(id(t), None)
        if isinstance(out, torch.Tensor):  # (an op that returned its input)
            consts.pop(id(out), None)


def mark(record: Record, value: Any) -> None:
    """Note the tensors in ``value`` (tensors, lists, tuples, dicts of them) as constants of
    the forward (parameters, buffers), when ``record`` follows it."""
    if record.data is not None:
        _add(record.data, value)


def _version(t: torch.Tensor) -> int:
    # (an inference tensor has no version counter, and cannot change outside inference mode)
    return -1 if t.is_inference() else t._version


def _has(consts: dict[int, tuple[weakref.ref, int]], t: torch.Tensor) -> bool:
    entry = consts.get(id(t))
    return entry is not None and entry[0]() is t and entry[1] == _version(t)


def _add(consts: dict[int, tuple[weakref.ref, int]], value: Any) -> None:
    if isinstance(value, torch.Tensor):
        consts[id(value)] = (weakref.ref(value), _version(value))
    elif isinstance(value, (list, tuple)):
        for v in value:
            _add(consts, v)


def is_constant(x: Any) -> bool:
    """Whether ``x`` is a constant of the followed forward in progress (see :func:`follow`)."""
    record = _CURRENT.get()
    consts = None if record is None else record.data
    return consts is not None and isinstance(x, torch.Tensor) and _has(consts, x)


def is_shared(x: torch.Tensor, dim: int) -> bool:
    """Whether ``x``, read with the batch at ``dim``, is surely not batched: a constant of the
    followed forward (:func:`follow`) whose slices along ``dim`` differ (a position table, a
    mask). A constant whose slices are all equal (``torch.zeros(B, T)``, HF's default token
    types) or that is expanded along ``dim`` (stride 0: ``cls.expand(B, ...)``) is taken as
    batched: shapes cannot tell whether its dim was built for the batch, and most often it
    was. False outside a followed forward."""
    if (not is_constant(x) or x.layout != torch.strided or x.is_meta or x.dim() <= dim
            or x.shape[dim] <= 1 or x.stride(dim) == 0):
        return False
    with torch.no_grad():
        return not torch.equal(x, x.narrow(dim, 0, 1).expand_as(x))


def _check_crossing(
    record: Record, shell: nn.Module, producer: nn.Module, x: torch.Tensor, batch_dim: int, out_dim: int
) -> None:
    """``x`` reaches ``shell`` (batch at ``batch_dim``) with the first two sizes of
    ``producer``'s output (batch at ``out_dim``, the other one): it must be transposed."""
    first, second = x.shape[0], x.shape[1]
    layout = "time-major [T, B, ...]" if out_dim == 1 else "batch-first [B, T, ...]"
    head = (
        f"{record.name(shell)} reads dim {batch_dim} of its input {tuple(x.shape)} as the batch, "
        f"but {record.name(producer)} earlier in this forward returned a {layout} tensor of the "
        f"same leading sizes, with the batch at dim {out_dim}"
    )
    if first != second:
        raise ValueError(
            f"{head}: the input was not transposed, so the layer would take the "
            f"{x.shape[batch_dim]} {'time steps' if out_dim == 1 else 'examples'} at dim "
            f"{batch_dim} for {'examples' if out_dim == 1 else 'time steps'}. {_FIX}"
        )
    if x.stride(0) >= x.stride(1):
        raise ValueError(
            f"{head}; with T == B == {first} the shapes cannot tell whether the input was "
            "transposed, and its memory layout does not show a transpose either (a transposed "
            "view, and elementwise ops on one, keep dim 1 outermost; .contiguous() or a copy "
            "loses that). psgfunc refuses rather than risk giving each example the gradient "
            f"rows of others. {_FIX}, without .contiguous() between the transpose and the layer"
        )


def _check_loose(shell: nn.Module, x: torch.Tensor) -> None:
    """Outside a record: ``x`` must not be a live time-major output (or a view of it) as is."""
    storage = x.untyped_storage().data_ptr()
    for ref, producer in list(_LOOSE):
        out = ref()
        if out is None:
            continue
        same = out.dim() == x.dim() and out.shape[:2] == x.shape[:2]
        if same and out.untyped_storage().data_ptr() == storage and x.shape[:2] != (1, 1):
            _check_crossing(Record(None, None), shell, producer, x, 0, 1)


def produce(shell: nn.Module, out: Any, batch_dim: int) -> Any:
    """Note ``out`` (batch at ``batch_dim``; a ``PackedSequence``: its sequences, in the
    order its ``sorted_indices`` give) as a shell output of this forward; returns it."""
    if isinstance(out, PackedSequence):
        record = _CURRENT.get()
        if record is not None and record.data is not None and not torch._C._are_functorch_transforms_active():
            rows = None if out.sorted_indices is None else out.sorted_indices.cpu()
            record.moved[id(out.data)] = (weakref.ref(out.data), _carry.PACKED, shell, rows)
        return out
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return out
    record = _CURRENT.get()
    if record is not None and _frozen_on_constants(record, shell):
        _add(record.data, out)  # type: ignore[arg-type]
        return out
    if record is not None:
        if record.data is not None:
            record.moved[id(out)] = (weakref.ref(out), batch_dim, shell, None)
        record.outputs[(out.dim(), out.shape[0], out.shape[1])] = (batch_dim, shell)
    elif batch_dim == 1:
        _LOOSE[:] = [(r, m) for r, m in _LOOSE if r() is not None][-(_LOOSE_MAX - 1):]
        _LOOSE.append((weakref.ref(out), shell))
    return out
