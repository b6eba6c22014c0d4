"""Embedding bags: sums, means or maxima of embedding rows, as ``torch.nn.EmbeddingBag``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from psgfunc._rules import dispatchable
from psgfunc.functional.embedding import _check_indices, _normalize_padding_idx, _values

__all__ = ["embedding_bag", "init_embedding_bag"]

MODES = ("sum", "mean", "max")


def _check_mode(mode: Any, fn: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{fn}: mode={mode!r} must be one of {MODES}")
    return mode


def _check_offsets(offsets: torch.Tensor, length: int, include_last_offset: bool, fn: str) -> None:
    """Offsets must start at 0, never decrease and stay within the input (values read through
    vmap; skipped while ``torch.compile`` traces).

    Raises:
        TypeError: non-integer offsets.
        ValueError: offsets that do not start at 0, decrease, or pass the input's end.
    """
    if offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
        raise TypeError(f"{fn}: offsets has dtype {offsets.dtype}; pass integer offsets (e.g. offsets.long())")
    if torch.compiler.is_compiling():
        return
    values = _values(offsets)
    if values.shape[-1] == 0:
        if include_last_offset:
            raise ValueError(f"{fn}: include_last_offset=True needs at least one offset (the end)")
        return
    try:
        first = bool((values[..., 0] == 0).all())
        monotone = bool((values.diff(dim=-1) >= 0).all()) if values.shape[-1] > 1 else True
        last = int(values.max())
    except RuntimeError:  # values hidden (meta tensors): torch checks
        return
    if not first:
        raise ValueError(f"{fn}: offsets must start at 0 (the first bag starts at idx[0]), got {values.tolist()}")
    if not monotone:
        raise ValueError(f"{fn}: offsets must not decrease (each bag starts where the previous one ends)")
    if last > length:
        raise ValueError(
            f"{fn}: offsets hold {last}, past the end of idx (length {length}); each offset is "
            "the position in idx where a bag starts"
        )
    if include_last_offset and not bool((values[..., -1] == length).all()):
        raise ValueError(
            f"{fn}: with include_last_offset=True the last offset is the end of the last bag and "
            f"must equal the length of idx ({length}), got {values[..., -1].tolist()} (torch "
            "ends a shorter last bag inconsistently between the modes)"
        )


def _check_args(
    params: dict[str, torch.Tensor],
    idx: Any,
    offsets: Any,
    mode: Any,
    per_sample_weights: Any,
    padding_idx: Any,
    include_last_offset: bool,
    fn: str,
) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """``(weight, idx as int32/int64, normalised padding_idx)``, or a ValueError/TypeError."""
    weight = params.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
        raise ValueError(
            f"{fn}: params['weight'] must be [V, D] (2-D), got {shape}; build params with "
            "init_embedding_bag(num_embeddings, embedding_dim)"
        )
    _check_mode(mode, fn)
    padding_idx = _normalize_padding_idx(padding_idx, weight.shape[0], fn)
    idx = _check_indices(idx, weight.shape[0], fn)
    if idx.dim() == 2:
        if offsets is not None:
            raise ValueError(
                f"{fn}: idx is 2-D ({tuple(idx.shape)}: one bag per row), so offsets must be None; "
                "pass a 1-D idx with offsets, or a 2-D idx alone"
            )
    elif idx.dim() == 1:
        if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1:
            got = None if offsets is None else (tuple(offsets.shape) if isinstance(offsets, torch.Tensor) else offsets)
            raise ValueError(
                f"{fn}: a 1-D idx needs offsets, a 1-D tensor of the positions where the bags "
                f"start, got {got}; or pass a 2-D idx [bags, n] alone"
            )
        _check_offsets(offsets, idx.shape[0], include_last_offset, fn)
    else:
        raise ValueError(
            f"{fn}: idx must be [bags, n] (2-D) or 1-D with offsets, got shape {tuple(idx.shape)}"
        )
    if per_sample_weights is not None:
        if mode != "sum":
            raise ValueError(
                f"{fn}: per_sample_weights needs mode='sum' (got mode={mode!r}), as in torch"
            )
        if not isinstance(per_sample_weights, torch.Tensor) or per_sample_weights.shape != idx.shape:
            got = tuple(per_sample_weights.shape) if isinstance(per_sample_weights, torch.Tensor) else per_sample_weights
            raise ValueError(
                f"{fn}: per_sample_weights must be a tensor shaped like idx {tuple(idx.shape)}, got {got}"
            )
    return weight, idx, padding_idx


@dispatchable
def embedding_bag(
    params: dict[str, torch.Tensor],
    idx: torch.Tensor,
    offsets: torch.Tensor | None = None,
    *,
    mode: str = "mean",
    per_sample_weights: torch.Tensor | None = None,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
) -> torch.Tensor:
    """Sums, means or maxima of bags of embedding rows, as ``torch.nn.EmbeddingBag``.

    Shapes: ``idx [bags, n] -> [bags, D]`` (each row one bag of ``n`` indices), or
    ``idx [T]`` with ``offsets [bags]`` (``[bags + 1]`` with ``include_last_offset``)
    ``-> [bags, D]``. Under :func:`psgfunc.per_sample_grads`, one example is one such set of
    bags.

    Args:
        params: ``{"weight": [V, D]}``.
        idx: integer indices in ``[0, V)``.
        offsets: with a 1-D ``idx``, the position where each bag starts (``offsets[0] = 0``,
            non-decreasing; bag ``j`` is ``idx[offsets[j]:offsets[j+1]]``, the last one runs to
            the end); None with a 2-D ``idx``.
        mode: ``"sum"``, ``"mean"`` or ``"max"`` (per embedding dim) of each bag's rows; an
            empty bag gives zeros.
        per_sample_weights: weights shaped like ``idx`` that scale each row (``mode="sum"``
            only); differentiable.
        padding_idx: a row that is left out of every bag (not summed, not counted in the
            mean, never the max) and gets no gradient; negative counts from the end.
        include_last_offset: ``offsets`` has one more entry, the end of the last bag (torch's
            CSR layout), which must equal ``len(idx)``.

    Returns:
        ``[bags, D]``.

    Raises:
        TypeError: non-integer ``idx`` or ``offsets``.
        ValueError: an unknown mode, a weight that is not 2-D, an index or ``padding_idx``
            outside the table, offsets with a 2-D ``idx`` or missing with a 1-D one, offsets
            that do not start at 0 / decrease / pass the end (or, with ``include_last_offset``,
            end elsewhere than ``len(idx)``), ``per_sample_weights`` with a
            mode other than ``"sum"`` or of another shape than ``idx``.
    """
    fn = "embedding_bag"
    weight, idx, padding_idx = _check_args(
        params, idx, offsets, mode, per_sample_weights, padding_idx, include_last_offset, fn
    )
    return F.embedding_bag(
        idx, weight, offsets, mode=mode, per_sample_weights=per_sample_weights,
        include_last_offset=include_last_offset, padding_idx=padding_idx,
    )


def init_embedding_bag(
    num_embeddings: int,
    embedding_dim: int,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    _weight: torch.Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`embedding_bag` with ``torch.nn.EmbeddingBag``'s initialisation.

    The weight is drawn from ``N(0, 1)``, then the ``padding_idx`` row (if any) is zeroed;
    or it is ``_weight`` (used as it is, as torch.nn does). ``norm_type``, ``mode``,
    ``sparse`` and ``include_last_offset`` do not change the params (``mode`` is checked).

    Args:
        num_embeddings: ``V``.
        embedding_dim: ``D``.
        max_norm: must be None (see Raises).
        norm_type: accepted for torch.nn's signature (used only with ``max_norm``).
        scale_grad_by_freq: must be False (see Raises).
        mode: ``"sum"``, ``"mean"`` or ``"max"`` (checked only).
        sparse: accepted (per-sample gradients are dense anyway).
        _weight: a ``[V, D]`` table to use instead of a random one.
        include_last_offset: accepted for torch.nn's signature.
        padding_idx: the row to zero; negative counts from the end.
        dtype: floating dtype (default: torch's default dtype).
        device: where to allocate.
        generator: random generator (default: torch's global one).

    Returns:
        ``{"weight": [num_embeddings, embedding_dim]}``.

    Raises:
        ValueError: ``max_norm`` (it renormalises rows of the table in place during the
            forward: each example would change the table the others read),
            ``scale_grad_by_freq=True`` (it divides each row's gradient by its frequency in
            the whole batch, coupling the examples), an unknown mode, negative sizes,
            ``padding_idx`` outside ``[-V, V)``, a ``_weight`` of another shape.
    """
    fn = "init_embedding_bag"
    if max_norm is not None:
        raise ValueError(
            f"{fn}: max_norm={max_norm!r} is not supported: it renormalises rows of the table IN "
            "PLACE during the forward, so each example would change the table the others read. "
            "Use max_norm=None and renormalise between steps under torch.no_grad() "
            "(weight.renorm_(2, 0, max_norm)) if you need bounded rows"
        )
    if scale_grad_by_freq:
        raise ValueError(
            f"{fn}: scale_grad_by_freq=True is not supported: it divides each row's gradient "
            "by how often the whole batch uses it, coupling the examples; use False"
        )
    _check_mode(mode, fn)
    if num_embeddings < 0 or embedding_dim < 0:
        raise ValueError(
            f"{fn}: num_embeddings={num_embeddings} and embedding_dim={embedding_dim} must be >= 0"
        )
    padding_idx = _normalize_padding_idx(padding_idx, num_embeddings, fn)
    if _weight is not None:
        if tuple(_weight.shape) != (num_embeddings, embedding_dim):
            raise ValueError(
                f"{fn}: _weight has shape {tuple(_weight.shape)}, expected "
                f"[num_embeddings, embedding_dim] = [{num_embeddings}, {embedding_dim}]"
            )
        return {"weight": _weight}
    weight = torch.empty(
        (num_embeddings, embedding_dim), dtype=dtype or torch.get_default_dtype(), device=device
    )
    weight.normal_(0.0, 1.0, generator=generator)
    if padding_idx is not None:
        with torch.no_grad():
            weight[padding_idx].fill_(0)
    return {"weight": weight}
