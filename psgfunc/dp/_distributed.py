"""DP-SGD over several processes with ``torch.distributed`` (gloo on CPU, nccl on GPU).

The privacy analysis of a distributed run is the one of a single process on the union of
the ranks' batches: each example is sampled once with probability ``q`` (each rank draws
its own disjoint shard, :class:`psgfunc.dp.PoissonDataLoader` with ``distributed=True``),
each example's gradient is clipped once (by the rank that holds it), and the noise
``N(0, (sigma C)^2)`` is added once per logical step, to the sum of the ranks' clipped sums.
So every rank

1. clips its own examples and sums them (dense or fast clipping, over micro-batches);
2. all-reduces that clipped sum, one call per dtype over a flat buffer of the trainable
   parameters' size (:func:`all_reduce_sum`);
3. draws the SAME noise from a generator seeded identically everywhere: the seed is rank
   0's, broadcast (:func:`broadcast_seed`; with ``secure=True`` a fresh rank-0 OS-entropy
   seed every step), so no rank adds noise of its own and the noise is not ``sqrt(world)``
   times too large;
4. divides by the GLOBAL expected batch size and applies the identical update.

``torch.nn.parallel.DistributedDataParallel`` must not be used with DP-SGD: during backward
it all-reduces every parameter's raw, unclipped and un-noised gradient, which releases each
rank's examples' exact gradients to the other ranks. :class:`psgfunc.dp.DPOptimizer` refuses
parameters held by a DDP module (:func:`check_params_not_ddp`), and :func:`check_not_ddp`
checks a model, for callers that have one.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.distributed as dist

from psgfunc._tree import tree_flatten, tree_unflatten

_NOT_INITIALISED = (
    "no torch.distributed process group is initialised; call "
    "torch.distributed.init_process_group(backend=...) in every process first (e.g. under "
    "torchrun), or run in one process (distributed=False)"
)

_DDP_ADVICE = (
    "is wrapped in torch.nn.parallel.DistributedDataParallel, which all-reduces every raw "
    "(unclipped, un-noised) per-batch gradient across processes during backward: DP-SGD must "
    "not release those. Build the model WITHOUT DistributedDataParallel and use "
    "DPOptimizer(..., distributed=True) (or dp_sgd_transform(..., distributed=True)), which "
    "all-reduces only the clipped sums and adds the noise once"
)


def resolve_group(distributed: Any, where: str) -> Any:
    """The process group a ``distributed=`` argument asks for, or None for ``False``.

    Args:
        distributed: ``False``, ``True`` (the default group) or a ``ProcessGroup``.
        where: the caller's name, for error messages.

    Raises:
        ValueError: if a group is asked for and none is initialised, or ``distributed`` is
            something else.
    """
    if distributed is False or distributed is None:
        return None
    if not dist.is_available():
        raise ValueError(f"{where}: distributed needs torch.distributed, which this torch build lacks")
    if distributed is True:
        if not dist.is_initialized():
            raise ValueError(f"{where}: distributed=True but {_NOT_INITIALISED}")
        return dist.group.WORLD
    if isinstance(distributed, dist.ProcessGroup):
        if not dist.is_initialized():
            raise ValueError(f"{where}: distributed=<ProcessGroup> but {_NOT_INITIALISED}")
        return distributed
    raise ValueError(
        f"{where}: distributed must be False, True (the default process group) or a "
        f"torch.distributed.ProcessGroup, got {type(distributed).__name__}"
    )


def rank_and_world(group: Any) -> tuple[int, int]:
    """``(rank in group, group size)``."""
    return dist.get_rank(group), dist.get_world_size(group)


def _src(group: Any) -> int:
    """The global rank of the group's rank 0 (``broadcast`` takes global ranks)."""
    return dist.get_global_rank(group, 0)


def _comm_device(group: Any) -> torch.device:
    """Where a small control tensor must live for this group's backend."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_seed(seed: int, group: Any) -> int:
    """Rank 0's ``seed`` (an int below ``2**63``) on every rank of ``group``."""
    t = torch.tensor([seed], dtype=torch.int64, device=_comm_device(group))
    dist.broadcast(t, src=_src(group), group=group)
    return int(t.item())


def _flat_groups(leaves: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault((leaf.device, leaf.dtype), []).append(i)
    return groups


def all_reduce_sum(tree: Any, group: Any = None) -> Any:
    """Sum a pytree of tensors over the ranks of ``group``: one all-reduce per dtype/device.

    The leaves are copied into one flat buffer (per dtype and device), summed in place with
    ``torch.distributed.all_reduce`` and cut back into leaves: for the clipped sum of a
    model that is one all-reduce of the trainable parameters' size. The input is not
    modified. Every rank must call it with the same structure, shapes and dtypes.

    Args:
        tree: pytree of tensors, e.g. a clipped sum with leaves ``[*param_shape]``.
        group: a process group; None: the default one (it must be initialised).

    Returns:
        a pytree of ``tree``'s structure whose leaves are the sums over the ranks.

    Raises:
        ValueError: if no process group is initialised.
    """
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"all_reduce_sum: {_NOT_INITIALISED}")
        group = dist.group.WORLD
    else:
        group = resolve_group(group, "all_reduce_sum")
    leaves, spec = tree_flatten(tree)
    out: list[Any] = list(leaves)
    for idx in _flat_groups(leaves).values():
        buffer = torch.cat([leaves[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        for i, piece in zip(idx, buffer.split([leaves[i].numel() for i in idx])):
            out[i] = piece.view(leaves[i].shape)
    return tree_unflatten(spec, out)


@torch.no_grad()
def broadcast_params(params: list[torch.Tensor], group: Any) -> None:
    """Overwrite ``params`` in place with rank 0's values (one broadcast per dtype/device)."""
    for idx in _flat_groups(params).values():
        buffer = torch.cat([params[i].detach().reshape(-1) for i in idx])
        dist.broadcast(buffer, src=_src(group), group=group)
        for i, piece in zip(idx, buffer.split([params[i].numel() for i in idx])):
            params[i].copy_(piece.view(params[i].shape))


def _ddp_class() -> Any:
    if not dist.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


def check_not_ddp(model: Any) -> None:
    """Refuse a model that is, or contains, a ``DistributedDataParallel`` module.

    For callers that hold the model (``make_private``-style setup); :class:`DPOptimizer`,
    which only sees the optimizer's parameters, runs :func:`check_params_not_ddp`.

    Args:
        model: a ``torch.nn.Module``.

    Raises:
        ValueError: if ``model`` or one of its submodules is a ``DistributedDataParallel``.
    """
    ddp = _ddp_class()
    if ddp is None or not isinstance(model, torch.nn.Module):
        return
    for name, module in model.named_modules():
        if isinstance(module, ddp):
            what = "the model" if not name else f"the model's submodule {name!r}"
            raise ValueError(f"check_not_ddp: {what} {_DDP_ADVICE}")


def _live_ddp_modules(ddp: Any) -> list[Any]:
    """The live instances of ``ddp`` and its subclasses.

    An instance refers to its class (the garbage collector traverses that reference), so one
    C-level ``gc.get_referrers`` pass over the classes finds them, with no Python loop over
    the interpreter's objects.
    """
    classes, todo = [], [ddp]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo.extend(cls.__subclasses__())
    return [obj for obj in gc.get_referrers(*classes) if isinstance(obj, ddp)]


def check_params_not_ddp(params: list[torch.Tensor], where: str) -> None:
    """Refuse parameters that a live ``DistributedDataParallel`` module holds.

    DDP leaves no mark on the parameter tensors themselves (its reducer hooks live in C++),
    so the live DDP modules are found through the garbage collector (one pass over the
    interpreter's objects, in C), and only when a process group is initialised (DDP cannot
    be built without one).

    Raises:
        ValueError: if one of ``params`` belongs to a live DDP module.
    """
    ddp = _ddp_class()
    if ddp is None or not dist.is_initialized() or not params:
        return
    mine = {id(p) for p in params}
    for module in _live_ddp_modules(ddp):
        if any(id(p) in mine for p in module.parameters()):
            raise ValueError(f"{where}: the model of these parameters {_DDP_ADVICE}")


def prepare_optimizer(params: list[torch.Tensor], distributed: Any, where: str) -> Any:
    """``DPOptimizer``'s distributed set-up: refuse DDP, resolve the group, sync parameters.

    Args:
        params: all the optimizer's parameters.
        distributed: ``False``, ``True`` or a ``ProcessGroup``.
        where: the caller's name, for error messages.

    Returns:
        the process group (``False`` when not distributed), for ``dp_sgd_transform``.

    Raises:
        ValueError: as :func:`resolve_group` and :func:`check_params_not_ddp`.
    """
    group = resolve_group(distributed, where)
    check_params_not_ddp(params, where)
    if group is None:
        return False
    broadcast_params(params, group)
    return group
