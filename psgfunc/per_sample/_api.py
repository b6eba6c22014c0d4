"""``per_sample_grads``: the gradient of each example's loss, for any pure per-example ``fn``."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import optree
import torch
from torch.func import grad, vmap

from psgfunc import _rules
from psgfunc._dispatch import grads_of
from psgfunc._tree import batch_size
from psgfunc.per_sample import _torch_ops
from psgfunc.per_sample._expanded import expand_leaf

try:
    import torch._C._functorch as _functorch

    for _name in ("_vmap_increment_nesting", "_vmap_decrement_nesting", "_add_batch_dim", "_remove_batch_dim"):
        getattr(_functorch, _name)
except (ImportError, AttributeError):  # pragma: no cover - torch.func.vmap still works
    _functorch = None

__all__ = ["per_sample_grads", "METHODS"]

METHODS = ("vmap", "expanded", "auto")
_RANDOMNESS = ("error", "different", "same")


def per_sample_grads(
    fn: Callable[..., torch.Tensor],
    params: Any,
    *batch: Any,
    method: str = "vmap",
    chunk_size: int | None = None,
    randomness: str = "different",
) -> Any:
    """Per-example gradients of ``fn`` with respect to ``params``.

    ``fn(params, *example) -> loss`` is written for ONE example: inside it the batch
    dimension is gone, exactly as under ``torch.func.vmap``. The result is what a loop
    ``for b: torch.autograd.grad(fn(params, *batch[b]), params)`` would stack, computed in
    one batched pass.

    Shapes: ``params`` leaves ``[*shape]``; ``batch`` leaves ``[B, ...]``; result leaves
    ``[B, *shape]`` (same dtype and device as the params).

    Args:
        fn: pure function of ``(params, *example)`` returning a 0-dim tensor. Any torch code
            works; psgfunc's functional layers additionally get fast expanded-weight rules.
        params: pytree (dict, list, tuple, nesting of them) of floating tensors, e.g.
            ``dict(model.named_parameters())``. Every leaf is differentiated.
        *batch: one or more pytrees whose tensor leaves share the leading size ``B``
            (integer token ids are fine; non-tensor leaves are passed to every example as
            they are). ``B`` may be 0 (empty leaves are returned) or 1.
        method: ``"vmap"``: ``vmap(grad(fn))``. ``"expanded"``: each parameter is expanded
            to ``[B, *shape]`` as a view (no copy), ``fn`` runs once under vmap over the
            batch, and one ordinary backward leaves per-sample gradients in the views;
            psgfunc layers compute their forward with the shared weight and their
            per-sample gradient in one contraction, other functions fall back to vmap over
            the views. ``"auto"``: ``"expanded"``, or ``"vmap"`` where a torch op has no
            batching rule for batched weights (so it works wherever ``"vmap"`` does). Measured (``python -m benchmarks``
            and ``examples/notebooks/vmap_vs_expanded.ipynb``): 2.4-7x faster and 6-20x
            less memory than ``"vmap"`` on the LSTM, 0.45-0.86x of its time on Linear, a
            tie (within run-to-run noise) on convolutions, LayerNorm and embeddings. Use
            ``"vmap"`` when ``fn`` must be transformed again (see Notes).
        chunk_size: process the batch in chunks of this many examples (bounds peak
            memory; the result is the same). None: the whole batch at once.
        randomness: vmap's treatment of random ops inside ``fn`` (e.g. dropout):
            ``"different"`` (default) draws independently per example, as the per-example
            loop and an ordinary batched forward do; ``"same"`` shares one draw across the
            batch; ``"error"`` refuses random ops. Both methods honour it for ordinary torch
            ops.

    Returns:
        A pytree with ``params``' structure whose leaves are ``[B, *leaf.shape]``.

    Raises:
        ValueError: unknown ``method``/``randomness``, ``chunk_size < 1``, batch leaves with
            different leading sizes or without a batch dim, non-tensor or non-floating
            params, or ``fn`` not returning one scalar per example; ``fn`` failing on a
            single example (e.g. it expects a batch dim; torch's error is the cause); torch
            layers that cannot give per-sample gradients (BatchNorm in training mode,
            InstanceNorm with running stats, embeddings with ``max_norm``); token ids outside
            an embedding table. Every method raises the same errors.

    Notes:
        To use an ``nn.Module``, make it a pure function with
        ``torch.func.functional_call``::

            params = {k: v.detach() for k, v in model.named_parameters()}
            def fn(params, x, y):
                out = torch.func.functional_call(model, params, (x.unsqueeze(0),))
                return F.cross_entropy(out, y.unsqueeze(0))
            grads = pf.per_sample_grads(fn, params, X, Y)

        (modules that need a batch dim get one via ``unsqueeze(0)``; BatchNorm mixes
        examples and cannot give per-sample gradients.) torch functions whose batched
        gradient needs care (``F.embedding``'s ``padding_idx``, ``sparse``, ...) go through
        :mod:`psgfunc.per_sample._torch_ops` while ``fn`` runs. ``method="expanded"`` differentiates
        with ordinary autograd, so ``fn`` must not be wrapped in another torch.func
        transform by the caller; ``"vmap"`` composes with further transforms.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    prep = _prepare(fn, params, batch, chunk_size, randomness)
    if prep.size == 0:
        return prep.unflatten([p.new_zeros((0, *p.shape)) for p in prep.p_leaves])
    run = {"vmap": _vmap_grads, "expanded": _expanded_grads, "auto": _auto_grads}[method]
    parts = [run(prep, b_leaves, n) for b_leaves, n in prep.chunks()]
    out = parts[0] if len(parts) == 1 else [torch.cat(col) for col in zip(*parts)]
    return prep.unflatten(out)


class _Prepared:
    """A validated call: flat params, flat batch, the per-example loss over flat leaves."""

    def __init__(self, fn, params, batch, chunk_size, randomness):
        self.fn, self.chunk_size, self.randomness = fn, chunk_size, randomness
        p_leaves, self.p_spec = optree.tree_flatten(params)
        for i, p in enumerate(p_leaves):
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                raise ValueError(
                    f"params leaf {i} is {type(p).__name__}"
                    + (f" of dtype {p.dtype}" if isinstance(p, torch.Tensor) else "")
                    + "; every params leaf must be a floating tensor (move constants into the "
                    "batch or close over them in fn)"
                )
        # (a leaf that needs no grad has no history to cut: no detach op per leaf per step)
        self.p_leaves = [p.detach() if p.requires_grad else p for p in p_leaves]
        self.size = batch_size(*batch)
        self.b_leaves, self.b_spec = optree.tree_flatten(batch, none_is_leaf=True)
        self.b_dims = [0 if isinstance(t, torch.Tensor) else None for t in self.b_leaves]

    def unflatten(self, leaves):
        return optree.tree_unflatten(self.p_spec, list(leaves))

    def chunks(self):
        """``(batch leaves, size)`` per chunk of ``chunk_size`` examples (one chunk if None)."""
        step = self.chunk_size or max(self.size, 1)
        for s in range(0, self.size, step):
            e = min(s + step, self.size)
            yield [t[s:e] if d == 0 else t for t, d in zip(self.b_leaves, self.b_dims)], e - s

    def loss(self, leaves, *example):
        loss = self.fn(self.unflatten(leaves), *optree.tree_unflatten(self.b_spec, list(example)))
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"fn must return a 0-dim loss for ONE example, got {shape}; inside fn the batch "
                "dim is removed, so reduce over the example's own dims (e.g. .sum()), not over B"
            )
        return loss

    def expanded_losses(self, views, b_leaves, ops: bool = True):
        """Per-example losses ``[B]`` of ``fn`` under vmap over expanded ``views``.

        ``ops=False``: without the torch-function rules (:mod:`psgfunc.per_sample._torch_ops`),
        for an ``fn`` known to hand no parameter to a torch function (see
        :func:`psgfunc.per_sample._clip.grad_pieces`). :attr:`saw_param` says afterwards
        whether the rules' mode saw one (True where it was off).
        """
        self.saw_param = True
        if not ops:
            with _explained(self, b_leaves):
                return self._expanded_losses(views, b_leaves)
        with _explained(self, b_leaves), _torch_ops.active("expanded", views) as mode:
            losses = self._expanded_losses(views, b_leaves)
        self.saw_param = mode is None or mode.saw_param
        return losses

    def _expanded_losses(self, views, b_leaves):
        if not _flat_vmap_ready():
            return vmap(self.loss, in_dims=(0, *self.b_dims), randomness=self.randomness)(views, *b_leaves)
        # this chunk's size (the batch leaves carry it, also when params has no leaves)
        size = next((t.shape[0] for t, d in zip(b_leaves, self.b_dims) if d is not None), self.size)
        level = _functorch._vmap_increment_nesting(size, self.randomness)
        try:
            wrapped = [_functorch._add_batch_dim(v, 0, level) for v in views]
            example = [t if d is None else _functorch._add_batch_dim(t, d, level) for t, d in zip(b_leaves, self.b_dims)]
            return _functorch._remove_batch_dim(self.loss(wrapped, *example), level, size, 0)
        finally:
            _functorch._vmap_decrement_nesting()

    def explain(self, b_leaves, err: BaseException) -> None:
        """Raise a ValueError saying why ``fn`` failed on the batch, when one example shows it.

        Runs ``fn`` once more on the first example alone, with no transform. If that fails
        too, ``fn`` does not work on one example (the usual cause: it expects a batch dim that
        per_sample_grads removes, or a batch argument lacks its batch dim): a ValueError
        saying so, chained to ``err``. A psgfunc ValueError from that run is raised as it is.
        If the example runs, the failure is the transform's: returns (``err`` stands).
        """
        if self.size == 0 or not any(d == 0 for d in self.b_dims):
            return
        example = [t[0] if d == 0 else t for t, d in zip(b_leaves, self.b_dims)]
        try:
            with _torch_ops.active("loop"), _rules.expanded_mode(None):
                self.loss(self.p_leaves, *example)
        except ValueError as clear:
            raise clear from err
        except Exception as again:  # noqa: BLE001 - any failure on one example is fn's
            raise ValueError(
                f"fn fails on a single example ({type(again).__name__}: {again}). "
                f"per_sample_grads calls fn(params, *example) on ONE example with the batch dim "
                f"removed: {_example_shapes(self.b_spec, self.b_leaves, self.b_dims)}. If fn expects a "
                "batch dim, add it inside fn (x.unsqueeze(0)); if a batch argument is a single "
                "example without its batch dim, add it before the call (x.unsqueeze(0))"
            ) from err


def _example_shapes(spec, b_leaves, b_dims, limit: int = 4) -> str:
    """``"batch[0] (8, 5) -> (5,), ..."``: what ``fn`` gets of each batch tensor leaf."""
    paths = optree.treespec_paths(spec)
    parts = [
        f"batch{''.join(f'[{k!r}]' for k in path)} {tuple(t.shape)} -> {tuple(t.shape[1:])}"
        for path, t, d in zip(paths, b_leaves, b_dims)
        if d == 0
    ]
    more = f", ... ({len(parts) - limit} more)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


@contextlib.contextmanager
def _explained(prep: _Prepared, b_leaves):
    """Torch's shape and index errors from running ``fn`` go through :meth:`_Prepared.explain`."""
    try:
        yield
    except (RuntimeError, IndexError) as err:
        prep.explain(b_leaves, err)
        raise


_FLAT_VMAP = {"loaded": False}


def _flat_vmap_ready() -> bool:
    """Whether :meth:`_Prepared.expanded_losses` may enter vmap through the functorch C API.

    ``torch.func.vmap``'s Python wrapper (argument pytrees, checks) costs ~0.15 ms a call, a
    tenth of a small model's step; the C API does the same (a vmap level, the batch dims,
    the losses unwrapped) in ~0.015 ms. Not while torch.compile traces (it sees vmap itself)
    and not before one ordinary vmap call has loaded torch's Python batching rules.
    """
    if _functorch is None or torch.compiler.is_compiling():
        return False
    if not _FLAT_VMAP["loaded"]:
        _FLAT_VMAP["loaded"] = True
        return False
    return True


def _prepare(fn, params, batch, chunk_size, randomness) -> _Prepared:
    if randomness not in _RANDOMNESS:
        raise ValueError(f"randomness must be one of {_RANDOMNESS}, got {randomness!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(params, *example), got {type(fn).__name__}")
    if not batch:
        raise ValueError(
            "per_sample_grads needs at least one batch argument: per_sample_grads(fn, params, x, ...)"
        )
    return _Prepared(fn, params, batch, chunk_size, randomness)


def _vmap_grads(prep: _Prepared, b_leaves, size):
    g = vmap(grad(prep.loss), in_dims=(None, *prep.b_dims), randomness=prep.randomness)
    with _explained(prep, b_leaves), _rules.expanded_mode(None), _torch_ops.active("vmap"):
        return list(g(prep.p_leaves, *b_leaves))


def _expanded_grads(prep: _Prepared, b_leaves, size):
    if not prep.p_leaves:  # nothing to differentiate (as vmap(grad) of no params: no leaves)
        return []
    views = [expand_leaf(p, size) for p in prep.p_leaves]
    with torch.enable_grad(), _rules.expanded_mode("vmap"):
        total = prep.expanded_losses(views, b_leaves).sum()
        # a loss that does not depend on the params: zeros, as vmap(grad) gives
        grads = grads_of(total, views) if total.requires_grad else [None] * len(views)
    return [torch.zeros_like(v) if g is None else g for v, g in zip(views, grads)]


def _auto_grads(prep: _Prepared, b_leaves, size):
    """``"expanded"``; where a torch op in ``fn`` has neither a psgfunc rule nor a batching
    rule that takes batched weights (torch raises a RuntimeError), ``"vmap"``, which needs
    none for the weights, so ``"auto"`` works wherever ``"vmap"`` does."""
    try:
        return _expanded_grads(prep, b_leaves, size)
    except (RuntimeError, NotImplementedError) as err:
        try:
            return _vmap_grads(prep, b_leaves, size)
        except Exception:  # noqa: BLE001 - vmap fails too: the expanded method's error stands
            raise err from None
