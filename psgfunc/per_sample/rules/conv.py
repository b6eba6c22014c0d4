"""Rules for :func:`psgfunc.functional.conv1d`, ``conv2d`` and ``conv3d``.

Forward: the input is padded once (``F.pad`` for the non-``"zeros"`` padding modes and the
extra zeros of an asymmetric ``"same"``, exactly as the layer does, via the layer's own
``_resolve_padding``), then ONE ordinary convolution with the shared weight ``w[0]``. No
per-example weight copy is made and the convolution never runs twice.

Backward, for ``x [B, C, *S]``, ``g = dL/dy [B, O, *S']`` and ``G`` groups:

* input gradient: ``aten.convolution_backward`` of the ordinary convolution;
* per-sample weight gradient, one grouped convolution-gradient call in which the batch
  becomes the groups: with ``x`` seen as ``[1, B*C, *S]`` and ``g`` as ``[1, B*O, *S']``, the
  weight gradient of a convolution with ``B*G`` groups is ``[B*O, C/G, *k]``, i.e.
  ``dW_b = sum_s g_b[s] x_b[s*stride + k*dilation]`` for every b at once (the trick of
  Goodfellow, 2015, "Efficient per-example gradient computations", and Rochette, Manoel and
  Tramel, 2019, "Efficient per-example gradient computations in convolutional neural
  networks"). When the layer runs on ``N`` positions per example (an example shaped
  ``[N, C, *S]`` under ``per_sample_grads``), the ``N`` rows become the convolution's batch,
  over which the weight gradient sums;
* per-sample bias gradient: ``g`` summed over its spatial dims.

Choice of the weight-gradient contraction, by measurement (2 CPU threads, float32, on an
otherwise idle 2-core machine; the comparison is the second table of
``benchmarks/layers.py``, saved as ``benchmarks/results/conv_weight_grad.csv``), grouped
convolution against ``unfold`` + ``einsum`` (im2col, then a batched matmul):

=============================  ===  ===========  =============
layer                           B    grouped      unfold+einsum
=============================  ===  ===========  =============
Opacus 64->64 k8 on 50x100      16   180 ms       920 ms
3->32 k3 on 32x32               64   4.3 ms       6.7 ms
1->16 k8 stride 2 on 28x28      64   0.81 ms      0.56 ms
32->64 k3 on 16x16              64   6.9 ms       15 ms
depthwise 64, k3 on 16x16       64   1.9 ms       18 ms
1-D 64->64 k5 on 200            64   7.6 ms       9.1 ms
3-D 8->16 k3 on 16^3            16   4.5 ms       46 ms
=============================  ===  ===========  =============

(minimum of 15 interleaved runs; 3 for the first row). Unfold also materialises the
patches (``B*C*K*L`` floats; ~1 GB peak on the first row against ~70 MB) and cannot skip the
zero blocks between groups. It wins on small layers: the MNIST-like first layer above, and
the digits CNN's 16->32 conv on 4x4 at B = 64 (0.7 ms against 1.9 ms for the grouped call,
whose per-group overhead dominates there). So ungrouped 1-d/2-d layers whose patch matrix
has at most ``_UNFOLD_MAX`` (2^20) elements use unfold + one ``bmm``; all others the grouped
convolution. Fast clipping reuses the patches for ghost norms (:class:`ConvWeight`).

Under ``torch.autocast`` the convolution runs as autocast runs ``F.conv{1,2,3}d`` (which it
does not do for ``torch.convolution``): the padded input (a differentiable cast) and the
shared weight and bias in the autocast dtype, the backward in that dtype; :func:`emit` gives
the per-sample gradients in the parameters' dtype.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, NamedTuple

import torch
from torch.func import vmap

from psgfunc import _rules
from psgfunc._tree import accurate_sq_norms, gamma, sq_norm_rel
from psgfunc.functional import _autocast
from psgfunc.functional.conv import (
    _SPATIAL,
    _check_conv,
    _ntuple,
    _pad_input,
    _resolve_padding,
    conv1d,
    conv2d,
    conv3d,
)
from psgfunc.per_sample._expanded import Rule, apply_function, call_rule, first, is_shared
from psgfunc.per_sample._kinds import (
    COMBINERS,
    F64,
    GradKind,
    Materialized,
    NormBound,
    SummedRows,
    _in_dtype,
    _lift,
    _up,
    collecting,
    emit,
    gram_bound,
    gram_of,
    outer_bound,
    presum,
    underflow,
)

__all__ = ["ConvRule", "ConvWeight", "per_sample_conv_weight_grad"]

_SUMMED = SummedRows()
_DENSE = Materialized()


def per_sample_conv_weight_grad(
    x: torch.Tensor,
    g: torch.Tensor,
    weight_shape: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    """Per-example weight gradients of a convolution, as one grouped convolution gradient.

    Shapes: ``x [N, B, C, *S]``, ``g [N, B, O, *S'] -> [B, O, C/groups, *k]``, summing over
    the ``N`` rows of each example (``N = 1`` for an ordinary batch).

    Args:
        x: the (already padded, if padding was explicit) convolution input.
        g: the gradient of the loss with respect to the convolution output.
        weight_shape: ``(O, C/groups, *k)``.
        stride: one int per spatial dim.
        padding: the convolution's own int padding, one per spatial dim.
        dilation: one int per spatial dim.
        groups: the convolution's groups.

    Returns:
        ``dW [B, O, C/groups, *k]``: ``dW[b]`` is the weight gradient of example b alone.
    """
    n, size, channels = x.shape[:3]
    out_channels = g.shape[2]
    if size == 0 or n == 0:
        return g.new_zeros((size, *weight_shape))
    if groups == 1 and len(stride) <= 2 and x.numel() * math.prod(weight_shape[2:]) <= _UNFOLD_MAX:
        return _unfold_weight_grad(x, g, weight_shape, stride, padding, dilation)
    xr = x.reshape(n, size * channels, *x.shape[3:])
    gr = g.reshape(n, size * out_channels, *g.shape[3:])
    # only the weight's shape is read when output_mask asks for the weight gradient alone
    w_stub = g.new_empty(()).expand(size * out_channels, *weight_shape[1:])
    _, gw, _ = torch.ops.aten.convolution_backward(
        gr, xr, w_stub, None, list(stride), list(padding), list(dilation), False,
        [0] * len(stride), size * groups, [False, True, False],
    )
    return gw.view(size, *weight_shape)


_UNFOLD_MAX = 1 << 20
"""Largest patch matrix (elements, ``~ N*B*C*K*L``) for which the weight gradient uses
``unfold`` + one batched matmul instead of the grouped convolution gradient: on small
layers (the digits CNN's 16->32 conv on 4x4 at B = 64: 0.7 ms against 1.9 ms) the grouped
call's per-group overhead dominates, on large ones the patches cost memory and time (see
the table above)."""


def _unfold_weight_grad(x, g, weight_shape, stride, padding, dilation):
    """:func:`per_sample_conv_weight_grad` for 1-d/2-d, ungrouped layers via im2col:
    ``dW_b = g_b [O, N*L] @ patches_b [N*L, C*K]``."""
    size = x.shape[1]
    if x.shape[0] == 1:  # one row per example: unfold's [B, C*K, L] and g's [B, O, L] as they are
        kernel, stride_, padding_, dilation_ = _as_2d(tuple(weight_shape[2:]), stride, padding, dilation)
        xs = x[0] if len(weight_shape) == 4 else x[0].unsqueeze(-2)
        cols = torch.nn.functional.unfold(xs, kernel, dilation=dilation_, padding=padding_, stride=stride_)
        return torch.bmm(g[0].reshape(size, g.shape[2], -1), cols.transpose(1, 2)).view(size, *weight_shape)
    patches = _patches(x, weight_shape, stride, padding, dilation)
    return torch.bmm(_positions(g).transpose(1, 2), patches).view(size, *weight_shape)


def _as_2d(kernel, stride, padding, dilation):
    """A 1-d conv's configuration as a 2-d conv of height 1 (2-d: unchanged)."""
    if len(kernel) == 1:
        return (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    return kernel, stride, padding, dilation


def _patches(x, weight_shape, stride, padding, dilation) -> torch.Tensor:
    """``x [N, B, C, *S] -> [B, N*L, C*K]``: every example's input patches (1-d/2-d)."""
    n, size = x.shape[:2]
    if len(weight_shape) == 3:  # a 1-d conv is a 2-d conv of height 1
        x = x.unsqueeze(-2)
    kernel, stride, padding, dilation = _as_2d(tuple(weight_shape[2:]), stride, padding, dilation)
    patches = torch.nn.functional.unfold(
        x.reshape(n * size, *x.shape[2:]), kernel, dilation=dilation, padding=padding, stride=stride
    )  # [N*B, C*K, L]
    length = patches.shape[-1]
    return patches.view(n, size, -1, length).permute(1, 0, 3, 2).reshape(size, n * length, -1)


def _patches_channels_last(x, weight_shape, stride, padding, dilation) -> torch.Tensor:
    """``x [N, B, C, *S] -> [B, N*L, K*C]``: :func:`_patches` with each patch's features in
    (kernel offset, channel) order instead of (channel, kernel offset), for Grams (which do
    not depend on the order). Copying from a channels-last input moves ``C`` contiguous
    values at a time, ``F.unfold`` one kernel row (2.3x faster on the digits CNN's 16->32
    conv at B = 64, where the patches are most of the ghost norm's cost)."""
    n, size, channels = x.shape[:3]
    if len(weight_shape) == 3:  # a 1-d conv is a 2-d conv of height 1
        x = x.unsqueeze(-2)
    kernel, stride, padding, dilation = _as_2d(tuple(weight_shape[2:]), stride, padding, dilation)
    flat = x.reshape(n * size, channels, *x.shape[-2:])
    if any(padding):
        flat = torch.nn.functional.pad(flat, (padding[1], padding[1], padding[0], padding[0]))
    flat = flat.permute(0, 2, 3, 1).contiguous()  # [N*B, H, W, C]
    height, width = flat.shape[1:3]
    out_h = (height - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    s_nb, s_h, s_w, s_c = flat.stride()
    windows = flat.as_strided(
        (size, n, out_h, out_w, kernel[0], kernel[1], channels),
        (s_nb, size * s_nb, s_h * stride[0], s_w * stride[1], s_h * dilation[0], s_w * dilation[1], s_c),
    )  # example b's row r is flat[r * size + b]
    return windows.reshape(size, n * out_h * out_w, kernel[0] * kernel[1] * channels)


def _positions(g: torch.Tensor) -> torch.Tensor:
    """``g [N, B, O, *S'] -> [B, N*L, O]``: every example's output gradient per position."""
    n, size, out_channels = g.shape[:3]
    return g.reshape(n, size, out_channels, -1).permute(1, 0, 3, 2).reshape(size, -1, out_channels)


class ConvWeight(GradKind):
    """``grad_b`` of a convolution weight from data ``(x [N, B, C, *S], g [N, B, O, *S'],
    conf)``, ``conf = (stride, padding, dilation)`` of that call (one weight may be used by
    calls with different configurations).

    ``materialize`` is :func:`per_sample_conv_weight_grad`; ``weighted_sum`` needs no
    per-sample tensor at all: ``sum_b c_b dW_b`` is the ORDINARY weight gradient of the
    convolution with ``g_b`` scaled by ``c_b`` (one ``convolution_backward`` per call).

    Norms, with ``u`` the input patches ``[B, T, I]`` (``I = C/G * K``) and ``g`` the output
    gradients ``[B, T, O]`` at the ``T`` output positions of all calls, by the cheaper of
    (the "mixed" rule of Bu et al., by the cost of each form, :meth:`uses_gram`):

    * the Gram form ``||dW_b||^2 = sum_{t,s} (g_bt . g_bs)(u_bt . u_bs)`` (ghost clipping),
      ``T^2 (I + O)`` products per example: few output positions (a WRN's last stage);
    * the direct form, ``dW_b`` materialised (``T O I``) by :func:`per_sample_conv_weight_grad`
      (the grouped convolution gradient, 3x faster than patches + ``bmm`` on a WRN's
      64->64 3x3 on 32x32; im2col on small layers) and its norm.

    Either way the per-example tensors (patches, Grams, ``dW_b``) are transient, built for
    a few examples at a time (at most about ``_CHUNK`` elements, ``_DIRECT_CHUNK`` for
    ``dW_b``): only ``[B]`` norms outlive the call, and the data kept for the weighted sum
    is ``x`` and ``g``. A gradient of at most ``_KEEP_DENSE`` elements in all that the Gram
    form does not cover is materialised once and kept for the sum (``c @ dW``: cheaper than
    a convolution backward there); so is, already in the backward pass, one smaller than
    the call's ``x`` and ``g`` (:meth:`dense_in_backward`, a :class:`BuiltConvWeight`).
    """

    def __init__(self, weight_shape: tuple[int, ...], groups: int):
        self.weight_shape, self.groups = weight_shape, groups

    def materialize(self, x: torch.Tensor, g: torch.Tensor, conf: tuple[Any, ...]) -> torch.Tensor:
        return per_sample_conv_weight_grad(x, g, self.weight_shape, *conf, self.groups)

    def prefers_dense(self, datas: Any) -> bool:
        return False  # small gradients are built, with their terms' sizes (rebuilt)

    def rebuilt(self, records: Any) -> Any:
        """Gradients of at most ``_KEEP_DENSE`` elements in all that the Gram form does not
        cover: built now, once, as :class:`BuiltConvWeight` pieces (their norm bounds the
        exact one, their sum is ``c @ dW``); None otherwise."""
        datas = [data for _, data in records]
        small = datas[0][1].shape[1] * math.prod(self.weight_shape) <= _KEEP_DENSE
        return _built(records) if small and not self.uses_gram(datas) else None

    def dense_in_backward(self, data: tuple[Any, ...]) -> bool:
        """Whether the backward pass of one call, data ``(x, g, conf)``, records ``dW_b``
        itself (:class:`~psgfunc.per_sample._kinds.Materialized`) instead of ``x`` and ``g``:
        for direct-form layers whose ``dW_b`` is at most ``_DENSE_PER_DATA`` times the
        example's ``x`` and ``g`` together (a WRN's first stage, 64->64 3x3 on 32x32:
        ``dW_b`` is 0.28 of them). The gradient is computed once there, by the grouped
        convolution gradient, where the norm and the weighted sum would contract ``x`` with
        ``g`` once each, and ``g`` is freed with the layer's backward instead of at the end
        of the pass (so memory goes down, not up). It is recorded as a
        :class:`BuiltConvWeight` with the size of its terms, whose norm bounds the exact
        gradient's (:func:`_direct_bound`), and its sum is ``c @ dW``."""
        x, g, _ = data
        size = x.shape[1]
        per_example = math.prod(self.weight_shape)
        if size == 0 or per_example > _DENSE_PER_DATA * (x[:, :1].numel() + g[:, :1].numel()):
            return False
        return not self.uses_gram([data])

    def _unfolds(self) -> bool:
        """Whether the patches exist here (ungrouped 1-d/2-d layers)."""
        return self.groups == 1 and len(self.weight_shape) <= 4

    def uses_gram(self, datas: Any) -> bool:
        """Whether the norms take a Gram form (:meth:`_form`)."""
        return self._form(datas) != "direct"

    def _form(self, datas: Any) -> str:
        """The cheapest form of the norms, by products per example: ``"gram"``, the patches'
        Gram, ``T^2 (I + O)``; ``"xgram"``, the patches' Gram summed from the input's Gram
        over its padded positions (:func:`_patch_gram`; one call of a 2-d layer with one row
        per example), ``P^2 C + T^2 (O + _SHIFTED_ADD K)`` for ``P`` padded input positions
        and ``K`` kernel offsets; ``"direct"``, ``dW_b`` itself, ``T O I`` plus the ``O I``
        of writing and reading it. The input's Gram skips the patches, which are ``K``
        times the input: on WRN-16-4's last group (256->256 on 8x8, B = 32) the bound took
        2.6 ms against 8.0 ms from the patches and 28 ms direct."""
        if not self._unfolds():
            return "direct"
        out_channels, inputs = self.weight_shape[0], math.prod(self.weight_shape[1:])
        t = _positions_per_example(datas)
        costs = {"direct": (t + 2) * out_channels * inputs, "gram": t * t * (inputs + out_channels)}
        if _xgram_fits(datas, self.weight_shape):
            padded = _padded_positions(datas[0])
            offsets = math.prod(self.weight_shape[2:])
            costs["xgram"] = padded * padded * self.weight_shape[1] + t * t * (out_channels + _SHIFTED_ADD * offsets)
        return min(costs, key=costs.__getitem__)

    def bound(self, datas: Any, cache: dict | None = None) -> NormBound:
        if self.prefers_dense(datas):
            return super().bound(datas)
        form = self._form(datas)
        t = _positions_per_example(datas)
        out_channels, inputs = self.weight_shape[0], math.prod(self.weight_shape[1:])
        if form == "direct":
            per_example = out_channels * inputs  # dW_b
        elif form == "gram":  # patches and output gradients, then the Grams
            per_example = t * (inputs + out_channels) + 2 * t * t
        else:  # the input's Gram, then the patches' and the output gradients'
            padded = _padded_positions(datas[0])
            per_example = padded * padded + 3 * t * t
        size = datas[0][1].shape[1]
        step = max(1, (_DIRECT_CHUNK if form == "direct" else _CHUNK) // max(1, per_example))
        rows = [(lo, min(lo + step, size)) for lo in range(0, size, step)]
        parts = [self._rows(datas, lo, hi, form) for lo, hi in rows]
        return parts[0] if len(parts) == 1 else _merge(parts, rows)

    def _rows(self, datas: Any, lo: int, hi: int, form: str) -> NormBound:
        """:meth:`bound` of examples ``lo:hi``: a Gram form by
        :func:`~psgfunc.per_sample._kinds.gram_bound` (which keeps the Grams for its
        refinement, not the patches: rebuilt for the few examples that need them), from
        the patches and output gradients (``"gram"``, via
        :func:`~psgfunc.per_sample._kinds.outer_bound`) or from the input's Gram
        (``"xgram"``, :meth:`_xgram_rows`), or the direct form from ``dW_b`` materialised
        (:meth:`_direct_rows`)."""
        if form == "direct":  # dW_b by the grouped convolution gradient (3x faster than patches + bmm)
            return self._direct_rows(datas, lo, hi)
        rebuild = functools.partial(self._pieces, datas, lo, hi)
        if form == "xgram":
            return self._xgram_rows(datas, lo, hi, rebuild)
        g, u = self._pieces(datas, lo, hi, None)
        return outer_bound(g, u, len(datas), None, True, rebuild)

    def _xgram_rows(self, datas: Any, lo: int, hi: int, rebuild: Any) -> NormBound:
        """The Gram form of examples ``lo:hi`` of one call with one row per example, with
        the patches' Gram from :func:`_patch_gram` (entries within ``gamma_{k + K}
        ||u_t|| ||u_s||``, ``k`` that of the input's Gram) and the output gradients' Gram
        from their ``[b, T, O]`` view; ``rebuild(idx)`` gives the patches of the few
        examples the refinement recomputes in float64."""
        x, g, (stride, padding, dilation) = datas[0]
        kernel = tuple(self.weight_shape[2:])
        gram_u, ku = _patch_gram(_up(x[0, lo:hi]), kernel, stride, padding, dilation)
        gs = _up(g[0, lo:hi])
        gram_g, kg = gram_of(gs.reshape(gs.shape[0], gs.shape[1], -1).transpose(1, 2))
        rg = gram_g.diagonal(dim1=1, dim2=2).sqrt()
        ru = gram_u.diagonal(dim1=1, dim2=2).sqrt()

        def redo(bad: torch.Tensor) -> torch.Tensor:
            g64, u64 = (t.to(F64) for t in rebuild(bad))
            return (torch.bmm(g64, g64.transpose(1, 2)) * torch.bmm(u64, u64.transpose(1, 2))).sum((1, 2))

        inputs = math.prod(self.weight_shape[1:])
        return gram_bound(gram_g, gram_u, rg, ru, self.weight_shape[0], inputs, 1, redo, kg, ku)

    def _pieces(self, datas: Any, lo: int, hi: int, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g [b, T, O], u [b, T, I])``: output gradients and patches at all positions of
        examples ``lo:hi`` (of those ``idx`` among them, if given)."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            t = t[:, lo:hi]
            return _up(t if idx is None else t.index_select(1, idx))

        u = _cat1([_patches_channels_last(pick(x), self.weight_shape, *conf) for x, _, conf in datas])
        g = _cat1([_positions(pick(g)) for _, g, _ in datas])
        return g, u

    def _direct_rows(self, datas: Any, lo: int, hi: int) -> NormBound:
        """:meth:`bound` of examples ``lo:hi`` from their materialised gradients
        (:func:`_direct_bound`)."""
        total, a = None, None
        for x, g, conf in datas:
            xs, gs = _up(x[:, lo:hi]), _up(g[:, lo:hi])
            dense = self.materialize(xs, gs, conf)
            total = dense if total is None else total + dense
            t = _term_sizes(xs, gs, tuple(self.weight_shape[2:]), conf, xs.dtype)
            a = t if a is None else a + t
        return _direct_bound(total, a, _positions_per_example(datas), len(datas), self.weight_shape)

    def weighted_sum(self, datas: Any, c: torch.Tensor) -> torch.Tensor:
        total = None
        for x, g, (stride, padding, dilation) in datas:
            n, size = x.shape[:2]
            out, x, g = g.dtype, _up(x), _up(g)  # half precision: summed in float32
            scaled = g * c.to(g.dtype).view(1, size, *([1] * (g.dim() - 2)))
            w_stub = g.new_empty(()).expand(*self.weight_shape)
            _, s, _ = torch.ops.aten.convolution_backward(
                scaled.reshape(n * size, *g.shape[2:]), x.reshape(n * size, *x.shape[2:]),
                w_stub, None, list(stride), list(padding), list(dilation),
                False, [0] * len(stride), self.groups, [False, True, False],
            )
            total = s if total is None else total + s
        return total.to(out)


_KEEP_DENSE = 1 << 19
"""Largest per-sample conv weight gradient (elements, ``B * O * C/G * K``) that fast
clipping materialises once and keeps for the weighted sum; larger ones are reduced to their
norms a chunk of examples at a time and summed by a convolution backward (the kept
gradients of a WRN-16-4 took 4x the non-private step's memory)."""

_DIRECT_CHUNK = 1 << 20
"""Most elements of the ``dW_b`` that the direct form builds at once (4 MB float32): with
``_CHUNK`` there (and no layer recorded dense in the backward pass), ``dW_b`` and the
grouped convolution's own workspace raised WRN-16-4's live peak by 15% at B = 16."""

_DENSE_PER_DATA = 0.5
"""A direct-form call whose ``dW_b`` has at most this many times the elements of the
example's ``x`` and ``g`` records ``dW_b`` in the backward pass
(:meth:`ConvWeight.dense_in_backward`; 0: never). WRN-16-4 (float32, 1 thread, interleaved
in one process): clip-fast over the non-private step 1.60x -> 1.35x at B = 16, the live
peak unchanged; at 1.0 its 64->128 stride-2 conv (``dW_b`` 0.75 of ``x`` and ``g``) also
qualified and its grouped gradient's workspace raised the live peak by 9%."""

_SHIFTED_ADD = 32
"""What one entry of one of the ``K`` strided sums of :func:`_patch_gram` costs, in products
of the other forms (2 threads, float32, B = 32): with it the cost model's choices match the
measured ones on WRN-16-4's layers (its 128->128 on 16x16 took 23.4 ms from the input's
Gram against 22.4 ms direct: direct, by a small margin, is chosen)."""

_CHUNK = 1 << 22
"""Most elements of the transient per-example tensors (``dW_b``, or patches and output
gradients of the Gram form) that :meth:`ConvWeight.bound` builds at once (16 MB float32)."""


def _positions_per_example(datas: Any) -> int:
    """``T``: the output positions of one example over all calls (rows included)."""
    return sum(g.shape[0] * math.prod(g.shape[3:]) for _, g, _ in datas)


def _xgram_fits(datas: Any, weight_shape: tuple[int, ...]) -> bool:
    """Whether :func:`_patch_gram` serves these calls: one call of a 2-d layer, with one row
    per example (the ``N`` of ``x [N, B, C, *S]``)."""
    return len(datas) == 1 and len(weight_shape) == 4 and datas[0][0].shape[0] == 1


def _padded_positions(data: tuple[Any, ...]) -> int:
    """``P``: the positions of one example's zero-padded input, data ``(x, g, conf)``."""
    x, _, (_, padding, _) = data
    positions = 1
    for size, pad in zip(x.shape[3:], padding):  # (a loop: torch.compile traces no genexpr here)
        positions *= size + 2 * pad
    return positions


def _patch_gram(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
                dilation: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """``x [b, C, H, W] -> (u u^T [b, T, T], k)``: the Gram of every example's input patches
    (``T`` output positions, zero padding included) without the patches: ``u_t . u_s =
    sum_j x_(p_t + j) . x_(p_s + j)`` over the kernel offsets ``j``, each a strided view of
    the input's own Gram over its padded positions. Its entries are within ``gamma_k
    ||u_t|| ||u_s||`` of the exact ones: ``k = k_x + K`` for the ``K`` offsets and ``k_x``
    of :func:`~psgfunc.per_sample._kinds.gram_of` (Cauchy-Schwarz over ``j``)."""
    size, channels = x.shape[:2]
    if any(padding):
        x = torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    height, width = x.shape[2:]
    gram_x, kx = gram_of(x.reshape(size, channels, height * width).transpose(1, 2))  # [b, P, P]
    grid = gram_x.view(size, height, width, height, width)
    out_h = (height - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    total = None
    for kh in range(kernel[0]):
        rows = slice(kh * dilation[0], kh * dilation[0] + (out_h - 1) * stride[0] + 1, stride[0])
        for kw in range(kernel[1]):
            cols = slice(kw * dilation[1], kw * dilation[1] + (out_w - 1) * stride[1] + 1, stride[1])
            block = grid[:, rows, cols, rows, cols]  # [b, OH, OW, OH, OW]
            total = block.clone(memory_format=torch.contiguous_format) if total is None else total.add_(block)
    positions = out_h * out_w
    return total.view(size, positions, positions), kx + kernel[0] * kernel[1]


def _term_sizes(x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, ...], conf: tuple[Any, ...],
                dtype: torch.dtype) -> torch.Tensor:
    """``[B]``: ``a_b = sum_t ||g_bt|| ||u_bt||`` of one call, data ``(x [N, B, C, *S], g [N, B,
    O, *S'])``, as an upper bound as computed: the size of the terms an example's weight
    gradient sums (``u_bt`` its input patch at output position ``t`` over all channels, zero
    padding included: an upper bound for grouped layers).

    Exact, not a Cauchy-Schwarz bound such as ``sqrt(K) ||g_b|| ||x_b||`` (4-6% above it on
    random activations, but 34x the gradient's norm in float32 where an example's inputs
    are large where its output gradients are small, review h11). Computed from sums of
    squares over the channels, each a product with a vector of ones over contiguous rows
    (:func:`_channel_sq_sums`; 3x faster than a reduction over the strided channel dim), the
    input's summed over every window by ``K`` shifted, strided views
    (:func:`_window_sums`): 2.7 ms on a WRN's 64->64 layer at B = 32, where the
    gradient itself takes 20 ms.

    In ``dtype`` (float32: sums of nonnegative terms, their rounding is the factor applied,
    and each norm is raised by what underflow may take from it,
    :func:`~psgfunc.per_sample._kinds.underflow`); where float32 squares overflow (entries
    above about 1e18), and always under ``torch.compile`` (no data-dependent branch),
    float64."""
    if dtype != F64 and torch.compiler.is_compiling():
        dtype = F64
    channels, out_channels = x.shape[2], g.shape[2]
    offsets = 1
    for k in kernel:  # (a loop: torch.compile traces no genexpr here)
        offsets *= k
    rg = _lift(_channel_sq_sums(g, dtype).sqrt_(), out_channels)  # [N, B, *S']
    rx = _lift(_window_sums(_channel_sq_sums(x, dtype), kernel, conf).sqrt_(), channels * offsets)
    positions = g[:, :1].numel() // max(1, out_channels)  # N * prod(S')
    scale = (1 + gamma(out_channels + 4, dtype)) * (1 + gamma(channels + offsets + 4, dtype)) * (1 + gamma(positions + 3, dtype))
    a = (rg * rx).flatten(2).sum(2).sum(0) * scale
    if dtype != F64 and not math.isfinite(float(a.sum())):
        return _term_sizes(x, g, kernel, conf, F64)
    return a


def _channel_sq_sums(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[N, B, C, *S] -> [N, B, *S]`` sums of squares over the channels, in ``dtype``: the
    squares of a few examples at a time (at most ``_DIRECT_CHUNK`` elements), times a vector
    of ones over their contiguous ``[C, prod(S)]`` rows."""
    n, size, channels = t.shape[:3]
    spatial = t.shape[3:]
    positions = 1
    for s in spatial:
        positions *= s
    ones = torch.ones(channels, dtype=dtype, device=t.device)
    step = max(1, _DIRECT_CHUNK // max(1, n * channels * positions))
    parts = []
    for s in range(0, size, step):
        sq = t[:, s:s + step].to(dtype).square()
        parts.append(torch.matmul(ones, sq.reshape(-1, channels, positions)).view(n, sq.shape[1], *spatial))
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=1) if parts else t.new_zeros((n, 0, *spatial), dtype=dtype)


def _window_sums(sq: torch.Tensor, kernel: tuple[int, ...], conf: tuple[Any, ...]) -> torch.Tensor:
    """``[N, B, *S] -> [N, B, *S']``: the sum of ``sq`` over each output position's window
    (zero padding included), by the ``prod(kernel)`` shifted, strided views of the padded
    map, added one by one."""
    stride, padding, dilation = conf
    if any(padding):
        pads = []
        for p in reversed(padding):
            pads += [p, p]
        sq = torch.nn.functional.pad(sq, pads)
    out = []
    for s, k, st, d in zip(sq.shape[2:], kernel, stride, dilation):
        out.append((s - d * (k - 1) - 1) // st + 1)
    ranges = []
    for k in kernel:  # (loops: torch.compile traces no genexpr here)
        ranges.append(range(k))
    total = None
    for offsets in itertools.product(*ranges):
        index = [slice(None), slice(None)]
        for o, d, st, m in zip(offsets, dilation, stride, out):
            index.append(slice(o * d, o * d + (m - 1) * st + 1, st))
        view = sq[tuple(index)]
        total = view.clone(memory_format=torch.contiguous_format) if total is None else total.add_(view)
    return total


def _direct_bound(total: torch.Tensor, a: torch.Tensor, n: int, pieces: int,
                  weight_shape: tuple[int, ...]) -> NormBound:
    """:class:`~psgfunc.per_sample._kinds.NormBound` of materialised per-example weight
    gradients ``total [B, *weight_shape]``, sums of ``n`` products per coordinate over
    ``pieces`` calls, with ``a [B]`` (:func:`_term_sizes`, summed over the calls: an upper
    bound of the size of the terms, its own rounding included).

    The computed ``dW_b`` is within ``gamma_{n + pieces} a_b`` of the exact one, and the
    weighted sum errs by as much (as :func:`~psgfunc.per_sample._kinds.outer_bound`'s direct
    form): so the bound is above the EXACT norm, also where the terms cancel and the
    computed ``dW_b`` is mostly rounding."""
    dtype = total.dtype
    o, i = weight_shape[0], math.prod(weight_shape[1:])
    # the calls' a summed, and cast to dtype
    err_scale = gamma(n + pieces + 2, dtype) * (1 + gamma(pieces + 1, dtype))
    a = a.to(dtype)
    sq = accurate_sq_norms(total) + underflow(dtype, o * i)  # (squares below the subnormals: 0)
    bound = sq.sqrt() * (1 + sq_norm_rel(dtype, o * i)) + a * err_scale
    return NormBound(sq, bound.square(), a, 1 + gamma(4, dtype), err_scale)


class TermSizes(NamedTuple):
    """``a [B]`` of :func:`_term_sizes` (float32, or float64 for float64 pieces), wrapped so
    that :func:`~psgfunc.per_sample._kinds.emit` records it as it is: a bound must not be
    rounded to a half-precision parameter's dtype (down, possibly) as the pieces are."""

    a: torch.Tensor


class BuiltConvWeight(GradKind):
    """A convolution weight's per-example gradients, built: in the backward pass
    (:meth:`ConvWeight.dense_in_backward`), or when the pieces are combined (small ones,
    :meth:`ConvWeight.rebuilt`; a weight with calls of both kinds, :func:`_combine_built`).
    Data ``(dW [B, *weight_shape], TermSizes(a), n)``: ``dW_b`` summed from ``n`` output
    positions and ``a`` its :func:`_term_sizes`, so that the norm bounds the exact gradient
    (:func:`_direct_bound`), not only the computed one. Several calls of one weight add
    up; the weighted sum is ``c @ dW``."""

    def __init__(self, weight_shape: tuple[int, ...]):
        self.weight_shape = weight_shape

    def materialize(self, dw: torch.Tensor, sizes: TermSizes, n: int) -> torch.Tensor:
        return dw

    def prefers_dense(self, datas: Any) -> bool:
        return False

    def bound(self, datas: Any, cache: dict | None = None) -> NormBound:
        total = datas[0][0] if len(datas) == 1 else sum(d[0] for d in datas)
        a = datas[0][1].a if len(datas) == 1 else sum(d[1].a for d in datas)
        return _direct_bound(_up(total), a, sum(d[2] for d in datas), len(datas), self.weight_shape)

    def weighted_sum(self, datas: Any, c: torch.Tensor) -> torch.Tensor:
        out = datas[0][0].dtype
        total = None
        for dw, _, _ in datas:
            up = _up(dw)
            s = c.to(up.dtype) @ up.reshape(up.shape[0], -1)
            total = s if total is None else total + s
        return total.to(out).reshape(self.weight_shape)


def _combine_built(records: Any) -> Any:
    """A weight whose calls recorded both :class:`BuiltConvWeight` and :class:`ConvWeight`
    pieces (one call's ``dW_b`` small enough to build in the backward, another's not):
    the latter are built too, with their term sizes, so that the norm stays certified
    against the exact gradient (:data:`~psgfunc.per_sample._kinds.COMBINERS`); None when
    this does not apply."""
    built = next((k for k, _ in records if isinstance(k, BuiltConvWeight)), None)
    if built is None or not all(isinstance(k, (ConvWeight, BuiltConvWeight)) and
                                tuple(k.weight_shape) == tuple(built.weight_shape) for k, _ in records):
        return None
    return _built(records, built)


def _built(records: Any, built: BuiltConvWeight | None = None) -> list[tuple[BuiltConvWeight, Any]]:
    """``records`` of :class:`ConvWeight` (and :class:`BuiltConvWeight`) as
    :class:`BuiltConvWeight` pieces: each call's ``dW_b`` built, with its term sizes."""
    if built is None:
        built = BuiltConvWeight(tuple(records[0][0].weight_shape))
    out = []
    for kind, data in records:
        if isinstance(kind, ConvWeight):
            x, g, conf = data
            dw = kind.materialize(x, g, conf)
            a = _term_sizes(_up(x), _up(g), tuple(kind.weight_shape[2:]), conf, _up(dw).dtype)
            data = (dw, TermSizes(a), g.shape[0] * math.prod(g.shape[3:]))
        out.append((built, data))
    return out


COMBINERS.append(_combine_built)


def _merge(parts: list[NormBound], rows: list[tuple[int, int]]) -> NormBound:
    """One :class:`NormBound` of the whole batch from those of its chunks ``rows``."""

    def cat(field: str) -> torch.Tensor | None:
        values = [getattr(p, field) for p in parts]
        if all(v is None for v in values):
            return None
        return torch.cat([p.sq.new_zeros(p.sq.shape) if v is None else v for p, v in zip(parts, values)])

    refine = None
    if any(p.refine is not None for p in parts):

        def refine(total_sq: torch.Tensor) -> NormBound:
            return _merge([p.refine(total_sq[lo:hi]) if p.refine is not None else p
                           for p, (lo, hi) in zip(parts, rows)], rows)

    return NormBound(cat("sq"), cat("hi2"), cat("err"), max(p.hi_scale for p in parts),
                     max(p.err_scale for p in parts), cat("unc"), refine)


def _cat1(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, 1)`` without the copy when there is one part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


@functools.lru_cache(maxsize=256)
def _conv_weight_kind(weight_shape: tuple[int, ...], groups: int) -> ConvWeight:
    """One kind object per weight shape and groups (a layer applied twice records under one kind)."""
    return ConvWeight(weight_shape, groups)


class _ConvPerSample(torch.autograd.Function):
    """``x [B*N, C, *S], w [B, O, C/G, *k] (shared), b [B, O] -> [B*N, O, *S']``."""

    @staticmethod
    def forward(  # type: ignore[override]
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        n: int,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
    ) -> torch.Tensor:
        weight = w[0] if w.shape[0] > 0 else w.new_zeros(w.shape[1:])
        bias = None if b is None else (b[0] if b.shape[0] > 0 else b.new_zeros(b.shape[1:]))
        # autocast (which skips torch.convolution): x is cast already, the weights here
        dtype = _autocast.autocast_dtype(x)
        weight, bias = _autocast.cast(weight, dtype), _autocast.cast(bias, dtype)
        with _autocast.disabled(x):
            return torch.convolution(
                x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups
            )

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, w, b, n, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, w)
        # the expanded params by identity for emit too: a saved tensor may come back from
        # saved-tensor hooks (checkpoint, offloading) as another object, without its Collector
        ctx.has_bias = b is not None
        ctx.weight, ctx.bias = w, b
        ctx.conf = (n, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, w = ctx.saved_tensors
        n, stride, padding, dilation, groups = ctx.conf
        size = w.shape[0]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            weight = first(ctx.weight).to(g.dtype)  # autocast: g's dtype (create_graph: the param, see first)
            gx = torch.ops.aten.convolution_backward(
                g, x, weight, None, list(stride), list(padding), list(dilation), False,
                [0] * len(stride), groups, [True, False, False],
            )[0]
        if ctx.needs_input_grad[1]:
            # [B*N, ...] -> [N, B, ...]: the N rows of an example are the conv batch
            xs = x.view(size, n, *x.shape[1:]).transpose(0, 1)
            gs = g.view(size, n, *g.shape[1:]).transpose(0, 1)
            kind = _conv_weight_kind(tuple(w.shape[1:]), groups)
            data = (xs, gs, (stride, padding, dilation))
            if collecting(ctx.weight) and kind.dense_in_backward(data):
                # fast clipping: dW_b now (in the param's dtype, as recorded pieces would be),
                # with the size of its terms, which its norm's bound needs
                dtype = ctx.weight.dtype
                xd, gd = _in_dtype(xs, dtype), _in_dtype(gs, dtype)
                kernel = tuple(w.shape[3:])
                built = BuiltConvWeight(tuple(w.shape[1:]))
                # autocast off: a caller's autocast block encloses this backward (clipped_grad_sum,
                # loss.backward() inside the block), and it would run the im2col bmm and the term
                # sizes' matmul in bfloat16, which the float32 bound does not cover (review h13)
                with _autocast.off():
                    dw = kind.materialize(xd, gd, data[2])
                    a = _term_sizes(_up(xd), _up(gd), kernel, data[2], _up(dw).dtype)
                gw = emit(ctx.weight, built, dw, TermSizes(a), gs.shape[0] * math.prod(gs.shape[3:]))
            else:
                gw = emit(ctx.weight, kind, *data)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            spatial = tuple(range(2, g.dim()))
            # summed over the positions in float32 at least (under autocast g is bfloat16),
            # with the bound of that sum's rounding (review h13: cancelling output gradients
            # summed to 0 gave a norm of 0 for an exact norm of 1)
            s, a = presum(g, spatial)
            gb = emit(ctx.bias, _SUMMED, s.view(size, n, g.shape[1]), a.view(size, n).sum(1))
        return gx, gw, gb, None, None, None, None, None


class ConvRule(Rule):
    """Per-sample rule of an N-d :mod:`psgfunc.functional.conv` layer (batch dim 0 of ``x``)."""

    def __init__(self, plain: Any, dim: int, name: str):
        super().__init__(plain)
        self.dim, self.name = dim, name

    def _run(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        n: int,
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: int,
        padding_mode: str,
    ) -> torch.Tensor:
        """``x [B*N, C, *S]`` with shared params ``[B, ...]`` -> ``[B*N, O, *S']``."""
        dim, fn = self.dim, self.name
        w, b = params["weight"], params.get("bias")
        example = {"weight": w[0] if w.shape[0] else w.new_zeros(w.shape[1:])}
        if b is not None:
            example["bias"] = b[0] if b.shape[0] else b.new_zeros(b.shape[1:])
        _check_conv(example, x, dim, groups, fn)
        stride_t, dilation_t, pad, conv_padding = self._conf(tuple(w.shape[3:]), stride, padding, dilation, padding_mode)
        x = _pad_input(x, pad, padding_mode)  # the only padding: once, by ordinary autograd
        x = _autocast.cast(x, _autocast.autocast_dtype(x))  # autocast: as F.conv{1,2,3}d
        return apply_function(_ConvPerSample, x, w, b, n, stride_t, conv_padding, dilation_t, groups)

    def _conf(self, kernel: tuple[int, ...], stride: Any, padding: Any, dilation: Any, padding_mode: str) -> Any:
        """``(stride, dilation, explicit input padding, the convolution's own padding)``."""
        stride_t = _ntuple(stride, self.dim, "stride", self.name, minimum=1)
        dilation_t = _ntuple(dilation, self.dim, "dilation", self.name, minimum=1)
        pad, conv_padding = _resolve_padding(padding, kernel, stride_t, dilation_t, padding_mode, self.name)
        return stride_t, dilation_t, pad, conv_padding

    def tapped(
        self,
        tap: Any,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        *,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> Any:
        w, b = params["weight"], params.get("bias")
        iw, ib = tap.index(w), tap.index(b)
        rows = x.dim() - self.dim - 1  # 0: one example [C, *S]; 1: [N, C, *S]
        if iw is None or (b is not None and ib is None) or rows not in (0, 1):
            return NotImplemented  # the plain layer raises its own errors
        detached = {"weight": w.detach(), "bias": None if b is None else b.detach()}
        y = self.plain(detached, x, stride=stride, padding=padding, dilation=dilation, groups=groups,
                       padding_mode=padding_mode)
        stride_t, dilation_t, pad, conv_padding = self._conf(tuple(w.shape[2:]), stride, padding, dilation, padding_mode)
        kind = ConvWeight(tuple(w.shape), groups)  # not the lru_cache: torch.compile traces this

        def build(saved: tuple[torch.Tensor, ...], g: torch.Tensor) -> list[tuple[int, Any, Any]]:
            size = g.shape[0]
            xb = saved[0].reshape(-1, *saved[0].shape[1 + rows:])  # [B*N, C, *S]
            xb = _pad_input(xb, pad, padding_mode)
            xs = xb.view(size, -1, *xb.shape[1:]).transpose(0, 1).to(w.dtype)  # [N, B, C, *S]
            gs = g.reshape(size, -1, *g.shape[1 + rows:]).transpose(0, 1).to(w.dtype)  # [N, B, O, *S']
            out = [(iw, kind, (xs, gs, (stride_t, conv_padding, dilation_t)))]
            if ib is not None:
                spatial = tuple(range(3, gs.dim()))
                s, a = presum(gs, spatial, lead=2)  # [N, B, O], [N, B]
                out.append((ib, _SUMMED, (s.transpose(0, 1), a.sum(0))))
            return out

        return tap.out(y, (x,), build)

    def _fallback(self, params: dict[str, torch.Tensor], x: torch.Tensor, **kwargs: Any) -> Any:
        plain = self.plain
        return vmap(lambda p, xi: plain(p, xi, **kwargs))(params, x)

    def batched(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        *,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> torch.Tensor:
        w = params["weight"]
        if x.dim() != self.dim + 2 or x.shape[0] != w.shape[0]:
            raise ValueError(
                f"{self.name} on a batch of {w.shape[0]} examples needs x shaped "
                f"[B, C, {_SPATIAL[self.dim]}] with B = {w.shape[0]}, got {tuple(x.shape)}; "
                "add the batch dim (x.unsqueeze(0) for one example)"
            )
        kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                      padding_mode=padding_mode)
        if not all(is_shared(p) for p in params.values() if p is not None):
            return self._fallback(params, x, **kwargs)
        return self._run(params, x, 1, **kwargs)

    def vmapped(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        *,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> Any:
        kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                      padding_mode=padding_mode)
        if x.dim() == self.dim + 2:  # each example is [C, *S]
            return self._run(params, x, 1, **kwargs)
        if x.dim() == self.dim + 3:  # each example is [N, C, *S]
            size, n = x.shape[:2]
            out = self._run(params, x.reshape(size * n, *x.shape[2:]), n, **kwargs)
            return out.view(size, n, *out.shape[1:])
        return NotImplemented  # the plain layer under vmap raises its own error


CONV1D = ConvRule(conv1d.plain, 1, "conv1d")
CONV2D = ConvRule(conv2d.plain, 2, "conv2d")
CONV3D = ConvRule(conv3d.plain, 3, "conv3d")


@_rules.register_rule(conv1d)
def _conv1d(params: dict[str, torch.Tensor], x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return call_rule(CONV1D, params, x, **kwargs)


@_rules.register_rule(conv2d)
def _conv2d(params: dict[str, torch.Tensor], x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return call_rule(CONV2D, params, x, **kwargs)


@_rules.register_rule(conv3d)
def _conv3d(params: dict[str, torch.Tensor], x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return call_rule(CONV3D, params, x, **kwargs)
