"""Rules for :func:`~psgfunc.functional.group_norm`, :func:`~psgfunc.functional.instance_norm`
and :func:`~psgfunc.functional.rms_norm`.

Each is a parameter-free normalisation ``x_hat`` (per row and group, per row and channel, or
per position: examples never mix) followed by an elementwise affine step. The normalisation
runs as the ordinary torch op without affine (ordinary autograd gives the input gradient);
only the affine step, run with the shared weight in :class:`_ScalePerSample`, has per-sample
gradients. Viewing ``x_hat`` and the output gradient ``g`` as ``[B, R, K, P]`` (``R`` rows or
positions of an example, ``K`` parameter entries, ``P`` positions sharing an entry)::

    dweight_b = sum over R, P of g_b * x_hat_b        [B, K]
    dbias_b   = sum over R, P of g_b                  [B, K]

These are the size of one channel vector per example, the same as the data any other form
would keep, so they are summed in the backward: the kind is
:class:`~psgfunc.per_sample._kinds.SummedRows` (``[B, 1, K]`` rows and the bound of their
sums' rounding, which may cancel): norms come from the rows and the clipped sum is one
``[B] @ [B, K]`` product.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import vmap

from psgfunc import _rules
from psgfunc.functional.normalization import (
    _check_channel_params,
    _check_rms_params,
    _normalized_shape,
    group_norm,
    instance_norm,
    rms_norm,
)
from psgfunc.per_sample._expanded import (
    Rule,
    apply_function,
    call_rule,
    check_versions,
    is_shared,
    versions,
)
from psgfunc.per_sample._expanded import first as _first
from psgfunc.per_sample._kinds import SummedRows, emit, presum, summed_rows

__all__ = ["GroupNormRule", "InstanceNormRule", "RMSNormRule"]


def _scale(x_hat: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """``x_hat [B, R, K, P] * w [K, 1] + b [K, 1]`` (either may be None)."""
    if w is None:
        return x_hat + b.reshape(-1, 1)
    if b is None:
        return x_hat * w.reshape(-1, 1)
    return torch.addcmul(b.reshape(-1, 1), x_hat, w.reshape(-1, 1))


def _sums(g: torch.Tensor, x_hat: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, R, K, P] -> ([B, 1, K], [B])``: ``sum_{R, P} g (* x_hat)``, one example's
    parameter gradient per row, and the bound of those sums' rounding
    (:func:`~psgfunc.per_sample._kinds.presum`): a :class:`SummedRows` record."""
    s, a = presum(g if x_hat is None else g * x_hat, (1, 3))
    return s.unsqueeze(1), a


class _ScalePerSample(torch.autograd.Function):
    """``x_hat [B, R, K, P], w [B, *W], b [B, *W] (shared, prod(W) = K) -> x_hat * w[0] + b[0]``
    per entry ``k``; the backward emits each example's ``[B, *W]`` gradients."""

    @staticmethod
    def forward(x_hat: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        return _scale(x_hat, _first(w), _first(b))

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x_hat, w, b = inputs
        ctx.save_for_backward(x_hat if w is not None else None, w)
        # the expanded params by identity for emit too: a saved tensor may come back from
        # saved-tensor hooks (checkpoint, offloading) as another object, without its Collector
        ctx.weight, ctx.bias = w, b

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x_hat, w = ctx.saved_tensors
        b = ctx.bias
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g if w is None else g * _first(ctx.weight).reshape(-1, 1)
        if w is not None and ctx.needs_input_grad[1]:
            gw = emit(ctx.weight, summed_rows(tuple(w.shape[1:])), *_sums(g, x_hat))
        if b is not None and ctx.needs_input_grad[2]:
            gb = emit(b, summed_rows(tuple(b.shape[1:])), *_sums(g, None))
        return gx, gw, gb


class _GroupNormPerSample(torch.autograd.Function):
    """``x [B*R, C, *S], w [B, C], b [B, C] (shared) -> group_norm(x) * w[0] + b[0]`` as ONE
    ``native_group_norm``, which saves ``x`` and the ``[B*R, G]`` statistics only, as the
    ordinary layer does (not ``x_hat`` too: a WRN's 13 GroupNorms kept 29 MB more at B = 16).
    The backward rebuilds ``x_hat`` for the per-sample sums (transient)."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, size: int, rows: int, groups: int,  # type: ignore[override]
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c = x.shape[:2]
        return torch.native_group_norm(x, _first(w), _first(b), n, c, math.prod(x.shape[2:]), groups, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, w, b, size, rows, groups, eps = inputs
        _, mean, rstd = output  # [N, G] statistics, not differentiated
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, mean, rstd)
        ctx.weight, ctx.bias = w, b  # as they are, for emit (a saved tensor may come back as another object)
        ctx.versions = versions(w)  # (not saved: autograd does not check it for us)
        ctx.conf = (size, rows, groups)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, *_: Any) -> Any:
        x, mean, rstd = ctx.saved_tensors
        w = ctx.weight
        check_versions(ctx.versions, "group_norm", w)
        size, rows, groups = ctx.conf
        n, c = x.shape[:2]
        g = g.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.native_group_norm_backward(
                g, x, mean, rstd, _first(w), n, c, math.prod(x.shape[2:]), groups, [True, False, False]
            )[0]
        g4 = g.reshape(size, rows, c, math.prod(x.shape[2:]))
        if ctx.needs_input_grad[1]:
            gw = emit(w, summed_rows(tuple(w.shape[1:])), *_weight_sums(x, mean, rstd, g4, groups))
        if ctx.needs_input_grad[2]:
            gb = emit(ctx.bias, summed_rows(tuple(ctx.bias.shape[1:])), *_sums(g4, None))
        return gx, gw, gb, None, None, None, None


_CHUNK_BYTES = 1 << 22
"""The largest transient :func:`_weight_sums` builds (4 MiB): examples are taken in chunks
of at most this much of ``x``, so a large layer's backward does not hold an ``x``-sized
``g * x_hat`` on top of ``g`` and the input gradient (the backward pass's peak on a
GroupNorm ResNet)."""


def _weight_sums(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, g4: torch.Tensor,
                 groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, 1, C], [B])``: ``sum_{R, P} g * x_hat`` per example, ``x_hat = (x - mean) * rstd``
    per row and group (``x [B*R, C, *S]``, ``mean, rstd [B*R, G]``, ``g4 [B, R, C, P]``),
    rebuilt in place chunk by chunk of examples (:data:`_CHUNK_BYTES`), and the bound of
    those sums' rounding (:func:`_sums`)."""
    size, rows = g4.shape[:2]
    per_example = max(1, x.numel() // max(size, 1) * x.element_size())
    step = max(1, _CHUNK_BYTES // per_example)
    xs = x.reshape(size, rows, groups, g4.shape[2] // groups * g4.shape[3])
    stats = mean.reshape(size, rows, groups, 1), rstd.reshape(size, rows, groups, 1)
    parts = []
    for s in range(0, size, step):
        e = min(s + step, size)
        t = (xs[s:e] - stats[0][s:e]).mul_(stats[1][s:e])  # x_hat of examples s..e
        parts.append(_sums(t.view(g4[s:e].shape).mul_(g4[s:e]), None))
        del t  # (before the next chunk's is built)
    if len(parts) == 1:
        return parts[0]
    if not parts:  # (B = 0: no chunk)
        return _sums(g4, None)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _affine_rule(
    x_hat: torch.Tensor, size: int, rows: int, w: torch.Tensor | None, b: torch.Tensor | None
) -> torch.Tensor:
    """The affine step on ``x_hat [size * rows, C, *S]`` with the shared ``w``, ``b``."""
    view = x_hat.reshape(size, rows, x_hat.shape[1], math.prod(x_hat.shape[2:]))
    return apply_function(_ScalePerSample, view, w, b).reshape(x_hat.shape)


class _ChannelNormRule(Rule):
    """Shared by group_norm and instance_norm: ``x [B, C, *S]`` (shells: one row per example)
    or, under vmap, ``[B, N, C, *S]`` (examples of ``N`` rows); params ``[B, C]``."""

    name = ""

    def _normalize(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def _init(self, channels: int, **kwargs: Any) -> str:
        raise NotImplementedError

    def _run(self, params: dict[str, torch.Tensor], x: torch.Tensor, size: int, rows: int, **kwargs: Any) -> torch.Tensor:
        """``x [size * rows, C, *S]`` -> the layer's output, same shape."""
        w, b = params.get("weight"), params.get("bias")
        x_hat = self._normalize(x, **kwargs)
        if w is None and b is None:
            return x_hat
        return _affine_rule(x_hat, size, rows, w, b)

    def _check(self, params: dict[str, torch.Tensor], x: torch.Tensor, size: int, **kwargs: Any) -> None:
        """``x``: one example (its shape shows in errors); ``size``: the batch's examples."""
        for name, p in params.items():
            if p is not None and p.shape[0] != size:
                raise ValueError(
                    f"{self.name}: params[{name!r}] holds {p.shape[0]} examples, x {size}; "
                    "keep the batch dim first in x"
                )
        per_example = {k: v[0] if v.shape[0] else v.new_zeros(v.shape[1:]) for k, v in params.items() if v is not None}
        _check_channel_params(per_example, x.shape[1], self.name, x, self._init(x.shape[1], **kwargs))

    def batched(self, params: dict[str, torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs = self._kwargs(*args, **kwargs)
        if x.dim() < self.min_dim:
            raise ValueError(
                f"{self.name} on a batch needs x shaped [B, C, *S] ({self.min_dim} dims at least), "
                f"got {tuple(x.shape)}; keep the batch dim first"
            )
        self._check(params, x[:1], x.shape[0], **kwargs)
        if not all(is_shared(p) for p in params.values() if p is not None):
            plain = self._plain(kwargs)
            return vmap(lambda p, xi: plain(p, xi.unsqueeze(0)).squeeze(0))(params, x)
        return self._run(params, x, x.shape[0], 1, **kwargs)

    def vmapped(self, params: dict[str, torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        kwargs = self._kwargs(*args, **kwargs)
        if x.dim() < self.min_dim + 1:
            return NotImplemented  # the plain layer under vmap raises its own error
        size, rows = x.shape[:2]
        flat = x.reshape(size * rows, *x.shape[2:])
        self._check(params, x[0] if size else flat, size, **kwargs)
        return self._run(params, flat, size, rows, **kwargs).view(x.shape)

    def _plain(self, kwargs: dict[str, Any]) -> Callable[..., torch.Tensor]:
        plain = self.plain
        return lambda p, xi: plain(p, xi, **kwargs)

    def tapped(self, tap: Any, params: dict[str, torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        kwargs = self._kwargs(*args, **kwargs)
        w, b = params.get("weight"), params.get("bias")
        iw, ib = tap.index(w), tap.index(b)
        if (w is None and b is None) or (w is not None and iw is None) or (b is not None and ib is None):
            return NotImplemented
        if x.dim() < self.min_dim or any(p is not None and tuple(p.shape) != (x.shape[1],) for p in (w, b)):
            return NotImplemented  # the plain layer raises its own error
        try:
            x_hat = self._normalize(x, **kwargs)
        except (ValueError, RuntimeError):
            return NotImplemented
        channels = x.shape[1]
        view = x_hat.reshape(1, x.shape[0], channels, math.prod(x.shape[2:]))
        y = _scale(view, None if w is None else w.detach(), None if b is None else b.detach()).reshape(x.shape)
        kind = SummedRows((channels,))  # a fresh object: torch.compile traces this

        def build(saved: tuple[torch.Tensor, ...], g: torch.Tensor) -> list[tuple[int, Any, Any]]:
            size = g.shape[0]
            g4 = g.reshape(size, g.shape[1], channels, math.prod(g.shape[3:]))  # [B, N, C, P]
            out = []
            if iw is not None:
                out.append((iw, kind, _sums(g4, saved[0].reshape(g4.shape))))
            if ib is not None:
                out.append((ib, kind, _sums(g4, None)))
            return out

        return tap.out(y, (x_hat,), build)


class GroupNormRule(_ChannelNormRule):
    """Per-sample rule of :func:`psgfunc.functional.group_norm`."""

    name = "group_norm"
    min_dim = 2

    @staticmethod
    def _kwargs(num_groups: int, *, eps: float = 1e-5) -> dict[str, Any]:
        return {"num_groups": num_groups, "eps": eps}

    def _plain(self, kwargs: dict[str, Any]) -> Callable[..., torch.Tensor]:
        plain, groups, eps = self.plain, kwargs["num_groups"], kwargs["eps"]
        return lambda p, xi: plain(p, xi, groups, eps=eps)

    def _init(self, channels: int, *, num_groups: int, eps: float) -> str:
        return f"init_group_norm({num_groups}, {channels})"

    def _run(self, params: dict[str, torch.Tensor], x: torch.Tensor, size: int, rows: int, **kwargs: Any) -> torch.Tensor:
        w, b = params.get("weight"), params.get("bias")
        groups, eps = kwargs["num_groups"], kwargs["eps"]
        fused = (
            w is not None and b is not None and size > 0 and x.dim() > 2
            and isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1 and x.shape[1] % groups == 0
            and x.dtype == w.dtype == b.dtype and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(x.device.type)
        )
        if not fused:
            return super()._run(params, x, size, rows, **kwargs)
        return apply_function(_GroupNormPerSample, x.contiguous(), w, b, size, rows, groups, eps)[0]

    def _normalize(self, x: torch.Tensor, *, num_groups: int, eps: float) -> torch.Tensor:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or x.shape[1] % num_groups:
            return group_norm.plain({}, x, num_groups, eps=eps)  # raises the layer's own error
        return F.group_norm(x, num_groups, None, None, eps)


class InstanceNormRule(_ChannelNormRule):
    """Per-sample rule of :func:`psgfunc.functional.instance_norm`."""

    name = "instance_norm"
    min_dim = 3

    @staticmethod
    def _kwargs(*, eps: float = 1e-5) -> dict[str, Any]:
        return {"eps": eps}

    def _init(self, channels: int, *, eps: float) -> str:
        return f"init_instance_norm({channels}, affine=True)"

    def _normalize(self, x: torch.Tensor, *, eps: float) -> torch.Tensor:
        return F.instance_norm(x, eps=eps)


class RMSNormRule(Rule):
    """Per-sample rule of :func:`psgfunc.functional.rms_norm` (batch dim 0 of ``x``)."""

    def batched(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        normalized_shape: int | tuple[int, ...],
        *,
        eps: float | None = None,
    ) -> torch.Tensor:
        shape = _normalized_shape(normalized_shape, "rms_norm")
        w = params.get("weight")
        if x.dim() < len(shape) + 1 or tuple(x.shape[x.dim() - len(shape) :]) != shape:
            raise ValueError(
                f"rms_norm on a batch needs x shaped [B, *, {', '.join(map(str, shape))}], "
                f"got {tuple(x.shape)}; pass the trailing dims of x as normalized_shape and "
                "keep the batch dim first"
            )
        if params.get("bias") is not None:
            _check_rms_params({"bias": params["bias"]}, shape)
        if w is not None and (tuple(w.shape[1:]) != shape or w.shape[0] != x.shape[0]):
            raise ValueError(
                f"rms_norm: params['weight'] has per-example shape {tuple(w.shape[1:])} for "
                f"{w.shape[0]} examples, expected normalized_shape={shape} for the {x.shape[0]} "
                f"examples of x; build params with init_rms_norm({shape})"
            )
        x_hat = F.rms_norm(x, shape, None, eps)
        if w is None:
            return x_hat
        if not is_shared(w):
            return vmap(lambda p, xi: self.plain(p, xi, shape, eps=eps))(params, x)
        size, k = x.shape[0], math.prod(shape)
        rows = math.prod(x.shape[1 : x.dim() - len(shape)])
        out = apply_function(_ScalePerSample, x_hat.reshape(size, rows, k, 1), w, None)
        return out.reshape(x.shape)

    def tapped(
        self,
        tap: Any,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        normalized_shape: int | tuple[int, ...],
        *,
        eps: float | None = None,
    ) -> Any:
        w = params.get("weight")
        iw = tap.index(w)
        if iw is None or params.get("bias") is not None:
            return NotImplemented
        shape = _normalized_shape(normalized_shape, "rms_norm")
        if (x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape
                or tuple(w.shape) != shape):
            return NotImplemented  # the plain layer raises its own error
        x_hat = F.rms_norm(x, shape, None, eps)
        y = x_hat * w.detach()
        kind = SummedRows(tuple(shape))  # a fresh object: torch.compile traces this
        k = math.prod(shape)

        def build(saved: tuple[torch.Tensor, ...], g: torch.Tensor) -> list[tuple[int, Any, Any]]:
            size = g.shape[0]
            g4 = g.reshape(size, math.prod(g.shape[1 : g.dim() - len(shape)]), k, 1)  # [B, positions, K, 1]
            return [(iw, kind, _sums(g4, saved[0].reshape(g4.shape)))]

        return tap.out(y, (x_hat,), build)


GROUP_NORM = GroupNormRule(group_norm.plain)
INSTANCE_NORM = InstanceNormRule(instance_norm.plain)
RMS_NORM = RMSNormRule(rms_norm.plain)


@_rules.register_rule(group_norm)
def _group_norm(params: dict[str, torch.Tensor], x: torch.Tensor, num_groups: int, *, eps: float = 1e-5) -> torch.Tensor:
    return call_rule(GROUP_NORM, params, x, num_groups, eps=eps)


@_rules.register_rule(instance_norm)
def _instance_norm(params: dict[str, torch.Tensor], x: torch.Tensor, *, eps: float = 1e-5) -> torch.Tensor:
    return call_rule(INSTANCE_NORM, params, x, eps=eps)


@_rules.register_rule(rms_norm)
def _rms_norm(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    normalized_shape: int | tuple[int, ...],
    *,
    eps: float | None = None,
) -> torch.Tensor:
    return call_rule(RMS_NORM, params, x, normalized_shape, eps=eps)
