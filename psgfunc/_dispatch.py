"""Work that autograd never differentiates, run without autograd's kernels."""

from __future__ import annotations

import contextlib
import contextvars

import torch

__all__ = ["no_autograd", "grads_of"]


def no_autograd() -> contextlib.AbstractContextManager:
    """``torch.inference_mode()``, or nothing while ``torch.compile`` traces.

    For code whose results are never differentiated: the LSTM loops' per-step ops, and the
    norms and clip factors of fast clipping. Each op then skips autograd's kernels, 1-2 us of
    dispatch per op, which shows where a step is made of many small ops (an LSTM step at
    B=16, H=100; the norms of a 512-wide MLP). In-place writes into ordinary tensors still
    count their versions. Tensors made inside are inference tensors: they can be read
    anywhere, but not saved for a backward nor changed in place outside such a block, so
    what leaves the block is either a tensor made before it (written ``out=`` or in place)
    or read through a copy made after it (``.clone()``). Misuse raises a RuntimeError; it
    never changes a value.
    """
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.inference_mode()


_ENGINE = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)
_STASH = getattr(torch._C, "_stash_obj_in_tls", None)
_UNSTASH = getattr(torch._C, "_remove_obj_from_tls", None)


def grads_of(loss: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(loss, inputs, allow_unused=True)`` for a 0-dim ``loss`` and
    ``inputs`` that require grad (no graph kept, none built).

    Calls autograd's engine directly: ``torch.autograd.grad``'s Python checks (overrides,
    the seeds' shapes, logging hooks) took 30-50 us per call here, a tenth of a small
    MLP's fast-clipping step. Falls back to ``torch.autograd.grad`` where torch does not
    expose the engine or the context hand-over, while ``torch.compile`` traces, and for a
    loss without history (whose error message autograd's wrapper gives).
    """
    if _ENGINE is None or _STASH is None or _UNSTASH is None or torch.compiler.is_compiling() \
            or loss.grad_fn is None:
        return torch.autograd.grad(loss, inputs, allow_unused=True)
    seed = torch.ones((), dtype=loss.dtype, device=loss.device)
    # as torch's own wrapper: the backward's device threads see this thread's context
    # variables (the rules' modes), not their defaults
    _STASH("context", contextvars.copy_context())
    try:
        return _ENGINE.run_backward((loss,), (seed,), False, False, tuple(inputs), True, False)
    finally:
        _UNSTASH("context")
