"""Work that autograd never differentiates, run without autograd's kernels."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["no_autograd"]


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
