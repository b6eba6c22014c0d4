"""What every ``psgfunc.nn`` shell shares: the batch checks, ``.grad_sample`` clearing, repr.

A shell is an ``nn.Module`` that holds ordinary parameters and whose ``forward`` is one call
``module_call(PF.layer, params, B, *inputs)``. :class:`ExpandedModule` supplies the rest and
knows nothing about any particular layer, so recurrent shells (whose batch dim may be dim 1)
use it as well as the feed-forward ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from psgfunc.nn import _forward

__all__ = ["ExpandedModule", "check_max_batch_size", "clear_grad_sample", "zero_grad"]


def check_max_batch_size(max_batch_size: Any, owner: str = "max_batch_size") -> int:
    """``max_batch_size`` as a positive int, or a ValueError naming ``owner``."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(
            f"{owner}: max_batch_size={max_batch_size!r} must be a positive int (the largest "
            "number of examples a batch will hold, e.g. your DataLoader's batch_size; with "
            "Poisson sampling, an upper bound on the sampled batch size)"
        )
    return max_batch_size


def clear_grad_sample(module: nn.Module) -> None:
    """Set ``p.grad_sample = None`` for every parameter of ``module`` (recursively)."""
    for p in module.parameters():
        if getattr(p, "grad_sample", None) is not None:
            p.grad_sample = None


def zero_grad(module: nn.Module, set_to_none: bool = True) -> None:
    """Clear ``.grad`` and ``.grad_sample`` of every parameter of ``module``.

    ``module`` may be any ``nn.Module`` (a whole model holding shells): a container's own
    ``zero_grad`` (``nn.Module.zero_grad``) and ``optimizer.zero_grad()`` clear ``.grad``
    only, never ``.grad_sample``, which adds up over the backward calls of one forward pass
    and refuses the rows of the next one until cleared.

    Args:
        module: the model.
        set_to_none: as in ``nn.Module.zero_grad``, for ``.grad`` only: None (default) or
            zeros. ``.grad_sample`` is always set to None, because its leading size is the
            batch size, which changes from batch to batch.
    """
    nn.Module.zero_grad(module, set_to_none=set_to_none)
    clear_grad_sample(module)


class ExpandedModule(nn.Module):
    """Base of the ``psgfunc.nn`` shells (put it first among the bases).

    A shell subclasses ``ExpandedModule`` and, when it mirrors a ``torch.nn`` layer, that
    layer too (``class Linear(ExpandedModule, nn.Linear)``), so its parameters, state_dict
    and attributes are the torch.nn ones. The shell's ``__init__`` calls
    :meth:`_set_max_batch_size`; its ``forward`` reads the batch size with
    :meth:`_batch_size` and calls ``module_call`` once.
    """

    max_batch_size: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # While a converted model's forward runs, a torch-function mode serves plain ops on
        # its parameters outside shells (psgfunc.nn.generic._OutsideShells); a shell's own
        # calls must not reach it (nor pay for it): it is paused while the shell runs.
        n = torch._C._len_torch_function_stack()
        if not n or not getattr(torch._C._get_function_stack_at(n - 1), "_psg_outside_shells", False):
            return super().__call__(*args, **kwargs)
        paused = []
        while n and getattr(torch._C._get_function_stack_at(n - 1), "_psg_outside_shells", False):
            paused.append(torch._C._pop_torch_function_stack())
            n -= 1
        # the outermost shell of a followed forward: the inputs it is called with are checked
        # not to be constants of the forward (psgfunc.nn._forward.is_shared)
        record = _forward.current()
        outer = None if record is None else (record.shell, record.shell_inputs)
        if record is not None:
            record.shell, record.shell_inputs = self, (*args, *kwargs.values())
        try:
            return super().__call__(*args, **kwargs)
        finally:
            if record is not None:
                record.shell, record.shell_inputs = outer
            for mode in reversed(paused):
                torch._C._push_on_torch_function_stack(mode)

    def _set_max_batch_size(self, max_batch_size: Any) -> None:
        self.max_batch_size = check_max_batch_size(max_batch_size, type(self).__name__)

    def _batch_size(
        self,
        x: Any,
        *,
        min_dim: int,
        max_dim: int | None = None,
        batch_dim: int = 0,
        expected: str,
        name: str = "input",
        data: bool = True,
    ) -> int:
        """The batch size of ``x`` (its size along ``batch_dim``), after the shell's checks.

        Args:
            x: the tensor whose ``batch_dim`` is the batch.
            min_dim: the fewest dims ``x`` may have (a batch of the smallest example).
            max_dim: the most dims (default: no limit).
            batch_dim: where the batch is.
            expected: the shape to show in errors, e.g. ``"[B, *, 16]"``.
            name: what to call ``x`` in errors.
            data: whether ``x`` holds the examples' data (checked not to be a constant shared
                by every example, :func:`psgfunc.nn._forward.is_shared`); False for offsets.

        Raises:
            ValueError: ``x`` has too few or too many dims (typically a missing batch dim),
                or more than ``max_batch_size`` examples with gradients on; in a model converted by
                ``expand_weights``, ``x``'s batch is not this forward's (see
                :mod:`psgfunc.nn._forward`).
        """
        cls = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{cls}: {name} must be a tensor shaped {expected}, got {type(x).__name__}")
        if x.dim() < min_dim or (max_dim is not None and x.dim() > max_dim):
            raise ValueError(
                f"{cls}: {name} must be shaped {expected} with the batch dim B at dim "
                f"{batch_dim} (a psgfunc.nn layer needs the batch dim to give each example its "
                f"own gradient), got shape {tuple(x.shape)}; for one example add the batch dim, "
                f"e.g. x.unsqueeze({batch_dim})"
            )
        size = x.shape[batch_dim]
        # (frozen, or no gradients (evaluation, generate() with beams): nothing per example)
        if size > self.max_batch_size and torch.is_grad_enabled() and not _forward.frozen(self):
            raise ValueError(
                f"{cls}: {name} holds a batch of {size} examples (dim {batch_dim}) but "
                f"max_batch_size={self.max_batch_size}; split the batch into chunks of at most "
                f"{self.max_batch_size} examples, or build the layer with a larger "
                "max_batch_size (psgfunc.nn.expand_weights(model, max_batch_size) resets it "
                "on a whole model)"
            )
        _forward.consume(self, x, size, batch_dim, data=data)
        return size

    def _expanded_params(self) -> dict[str, torch.Tensor]:
        """This module's own parameters by name (absent ones, e.g. ``bias=False``, left out)."""
        return dict(self.named_parameters(recurse=False))

    def extra_repr(self) -> str:
        base = super().extra_repr()
        tail = f"max_batch_size={self.max_batch_size}"
        return f"{base}, {tail}" if base else tail

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` (as ``nn.Module.zero_grad``) and ``.grad_sample`` of every parameter."""
        zero_grad(self, set_to_none=set_to_none)
