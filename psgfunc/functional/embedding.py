"""Embedding lookup: ``y[...] = weight[idx[...]]``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from psgfunc._rules import dispatchable

try:
    from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor
except ImportError:  # pragma: no cover - values under vmap stay hidden, F.embedding checks
    get_unwrapped = is_functorch_wrapped_tensor = None

__all__ = ["embedding", "init_embedding"]


def _normalize_padding_idx(padding_idx: int | None, num_embeddings: int, fn: str) -> int | None:
    """``padding_idx`` in ``[0, V)`` (a negative one counts from the end, as torch.nn), or None."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise ValueError(f"{fn}: padding_idx={padding_idx!r} must be an int or None")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"{fn}: padding_idx={padding_idx} is out of range for num_embeddings="
            f"{num_embeddings}; use an index in [-{num_embeddings}, {num_embeddings})"
        )
    return padding_idx % num_embeddings


def _values(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its functorch wrappers (vmap, grad): under vmap, every example's values."""
    while is_functorch_wrapped_tensor is not None and is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t


def _check_indices(idx: torch.Tensor, num_embeddings: int, fn: str = "embedding") -> torch.Tensor:
    """Check that ``idx`` holds integer indices in ``[0, V)``; returns it as int32/int64.

    The range check reads ``idx.aminmax()`` (one cheap reduction); under ``torch.func.vmap``
    (``per_sample_grads(method="vmap")``) it reads the tensor vmap wraps, which holds every
    example's indices. While ``torch.compile`` traces it is left to the lookup itself (a
    value read would split the graph); the dtype check always runs.
    Integer dtypes other than int32/int64 are cast to int64, as ``F.embedding`` needs.

    Raises:
        TypeError: ``idx`` is not an integer tensor.
        ValueError: an index outside ``[0, V)``.
    """
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{fn}: idx must be a tensor of integer indices, got {type(idx).__name__}")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"{fn}: idx has dtype {idx.dtype}; pass integer indices (e.g. idx.long())")
    if idx.dtype not in (torch.int32, torch.int64):
        idx = idx.long()
    if idx.numel() == 0 or torch.compiler.is_compiling():  # compiled: the lookup checks
        return idx
    lo_hi = _values(idx).aminmax()
    try:
        lo, hi = int(lo_hi.min), int(lo_hi.max)
    except RuntimeError:  # values hidden (e.g. on the meta device): F.embedding checks
        return idx
    if lo < 0 or hi >= num_embeddings:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{fn}: idx holds {bad}, outside [0, {num_embeddings}) (num_embeddings = "
            "weight.shape[0]); negative indices are not wrapped"
        )
    return idx


@dispatchable
def embedding(
    params: dict[str, torch.Tensor], idx: torch.Tensor, *, padding_idx: int | None = None
) -> torch.Tensor:
    """Look up rows of an embedding table, as ``torch.nn.Embedding``.

    Shapes: ``[*] -> [*, D]`` for indices of any shape (one example ``[T] -> [T, D]``, a batch
    ``[B, T] -> [B, T, D]``).

    Args:
        params: ``{"weight": [V, D]}``.
        idx: integer indices in ``[0, V)``, any shape.
        padding_idx: a row that gets no gradient (for every example): its lookups still return
            ``weight[padding_idx]``, but the gradient with respect to that row is zero. A
            negative value counts from the end, as in ``torch.nn.Embedding``.

    Returns:
        ``weight[idx]`` of shape ``[*idx.shape, D]``.

    Raises:
        TypeError: ``idx`` is not an integer tensor.
        ValueError: an index or ``padding_idx`` outside the table, or a weight that is not 2-D.
    """
    weight = params.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
        raise ValueError(
            f"embedding: params['weight'] must be [V, D] (2-D), got {shape}; build params with "
            "init_embedding(num_embeddings, embedding_dim)"
        )
    num_embeddings = weight.shape[0]
    padding_idx = _normalize_padding_idx(padding_idx, num_embeddings, "embedding")
    idx = _check_indices(idx, num_embeddings, "embedding")
    out = F.embedding(idx, weight)
    if padding_idx is not None:
        # Stop the gradient at the padding positions rather than passing padding_idx to
        # F.embedding: under vmap with a batched weight (ensembles, the expanded method's
        # fallback) torch's batching rule only zeroes the padding row of the first example.
        # Values are unchanged; the padding row's gradient is a sum of exact zeros.
        keep = (idx != padding_idx).unsqueeze(-1)
        out = torch.where(keep, out, out.detach())
    return out


def init_embedding(
    num_embeddings: int,
    embedding_dim: int,
    padding_idx: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`embedding` with ``torch.nn.Embedding``'s default initialisation.

    The weight is drawn from ``N(0, 1)``; the ``padding_idx`` row (if any) is then zeroed.

    Args:
        num_embeddings: ``V``, the number of rows.
        embedding_dim: ``D``, the size of each row.
        padding_idx: the row to zero; negative counts from the end.
        dtype: floating dtype (default: torch's default dtype).
        device: where to allocate.
        generator: random generator (default: torch's global one).

    Returns:
        ``{"weight": [num_embeddings, embedding_dim]}``.

    Raises:
        ValueError: negative sizes, or ``padding_idx`` outside ``[-V, V)``.
    """
    if num_embeddings < 0 or embedding_dim < 0:
        raise ValueError(
            f"init_embedding: num_embeddings={num_embeddings} and embedding_dim="
            f"{embedding_dim} must be >= 0"
        )
    padding_idx = _normalize_padding_idx(padding_idx, num_embeddings, "init_embedding")
    weight = torch.empty(
        (num_embeddings, embedding_dim), dtype=dtype or torch.get_default_dtype(), device=device
    )
    weight.normal_(0.0, 1.0, generator=generator)
    if padding_idx is not None:
        with torch.no_grad():
            weight[padding_idx].fill_(0)
    return {"weight": weight}
