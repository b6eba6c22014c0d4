"""Rules for :func:`psgfunc.functional.lstm` and :func:`psgfunc.functional.lstm_cell`.

A weight used at every time step must not cost a ``[B, 4H, H]`` tensor per step. So each
layer and direction is one ``autograd.Function`` (:class:`_Layer`) with the shared weights:

* the forward computes the input projection of all ``T`` steps, ``x W_ih^T + b_ih + b_hh``,
  as one matmul over the ``B * T`` rows, written straight into the loop's time-major buffer,
  then runs the recurrence with the one shared ``W_hh``;
* the backward is backpropagation through time by hand. It collects the gate gradients
  ``dz [B, T, 4H]`` and the hidden states each step started from, ``h_prev [B, T, H]``, and
  only then emits, once per layer and direction, one contraction over time per weight:
  ``dW_ih[b] = sum_t dz[b, t]^T x[b, t]`` and ``dW_hh[b] = sum_t dz[b, t]^T h_prev[b, t]``
  (:class:`~psgfunc.per_sample._kinds.Outer`, Goodfellow 2015) and ``db[b] = sum_t dz[b, t]``
  (``RowSum``) for both biases, summed once and shared when both are materialised. Under
  fast clipping the same pieces give the norms in Gram form.

Padded steps (``lengths``) have exactly zero ``dz``, so they add nothing to any gradient.
Dropout between layers is ``F.dropout`` on the time-major layer output, as the plain layer
(so a module shell draws the same masks as ``nn.LSTM`` under the same seed; under
``per_sample_grads`` it follows the call's ``randomness``: ``"different"`` draws each
example's mask, ``"same"`` one mask for all, ``"error"`` raises ``ValueError``).

The loops themselves are :func:`psgfunc.functional.lstm.direction_forward` /
``direction_backward``, shared with the plain layer. The backward of :class:`_Layer`
is not differentiable again (``once_differentiable``), like every expanded rule.

A layer without ``lengths`` can instead run as :class:`_FusedLayer`: the forward is one call
of torch's fused C++ LSTM (``torch._VF.lstm``) with the shared weights, keeping only the
hidden states ``hs``; the backward recomputes what ``direction_forward`` would have saved
from them (:func:`_replay`: with ``h_prev`` known for every step, the pre-activations
``x W_ih^T + h_prev W_hh^T + b`` are two matmuls over all ``B * T`` rows and the gates one
sigmoid and one tanh; only the cell state is a scan, one op per step), then runs the same
``direction_backward`` and emits the same four pieces as above, ``W_ih``'s included. It
serves every unmasked call that no backward follows (``no_grad``, inference through the
shells), where it is about twice as fast as the loop. With a backward it is off
(``_FUSED_WITH_GRAD``): the recomputation's two matmuls cost about what the fused forward
saves, so on CPU a training step came out even (see the comment at the switch).

Under ``torch.autocast`` the layer runs as ``nn.LSTM`` does there: the input and the initial
state are cast to the autocast dtype (differentiable casts), the shared weights inside the
functions, and the recurrence, its backward and the pieces are in that dtype; ``emit`` gives
the per-sample gradients in the parameters' dtype. The outputs are in the autocast dtype, as
``nn.LSTM``'s; the cell (:class:`LSTMCellRule`) returns its carry in the dtype it got, as
``nn.LSTMCell`` under autocast (only its matmuls are in the autocast dtype there).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import psgfunc.functional as PF
from psgfunc import _rules
from psgfunc._dispatch import no_autograd
from psgfunc.functional import _autocast
from psgfunc.per_sample._expanded import (
    Rule,
    apply_function,
    call_rule,
    check_versions,
    is_shared,
    shared,
    versions,
    vmap_randomness,
)
from psgfunc.per_sample._kinds import Outer, RowSum, emit

# ``psgfunc.functional.lstm`` the module (the package re-exports a function of that name)
_lstm_mod = sys.modules[PF.lstm.__module__]

_OUTER, _ROWSUM = Outer(), RowSum()
_NAMES = ("weight_ih", "bias_ih", "weight_hh", "bias_hh")  # _FusedLayer's order

# Whether an unmasked layer whose gradient will be taken also runs :class:`_FusedLayer`.
# Off: on CPU (one thread, EmbLSTM's LSTM(100, 100), T = 64) the fused forward saves what
# the loop's per-step ops cost, but the backward's recomputation costs two [B*T]-row
# matmuls, about as much: fwd+bwd and clipped_grad_sum came out even (a few % faster at
# B = 16, a few % slower at B = 64). Without a backward (no_grad, inference through the
# shells) the fused forward is used regardless: it is twice as fast as the loop.
_FUSED_WITH_GRAD = False


def _bias_grads(b_ih: Any, b_hh: Any, need_ih: bool, need_hh: bool, dz: torch.Tensor) -> tuple[Any, Any]:
    """The emits of both biases (``RowSum`` of ``dz [B, T, 4H]``): when ``b_ih``'s is
    materialised, ``b_hh``'s sums that result (one step) instead of ``dz`` again."""
    d_bih = emit(b_ih, _ROWSUM, dz) if b_ih is not None and need_ih else None
    d_bhh = None
    if b_hh is not None and need_hh:
        d_bhh = emit(b_hh, _ROWSUM, dz if d_bih is None else d_bih.unsqueeze(1))
    return d_bih, d_bhh


class _Layer(torch.autograd.Function):
    """One layer/direction: ``x [B, T, D] -> (out [B, T, H], h_n [B, H], c_n [B, H])``.

    Inputs: ``x``, ``h0``/``c0`` ``[B, H]``, the expanded ``w_ih [B, 4H, D]``, ``b_ih
    [B, 4H]`` (or None), ``w_hh [B, 4H, H]``, ``b_hh`` (or None), whose dim 0 is shared,
    ``mask`` ``[B, T, 1]`` bool or None, and ``reverse``. The forward uses the shared
    weights (``shared``: also for ``B = 0``): the input projection of all steps is one
    matmul written into the loop's buffer, then the loop
    (:func:`~psgfunc.functional.lstm.direction_forward`). The backward is
    backpropagation through time by hand and emits the pieces of all four weights from the
    one ``dz`` (each bias's ``RowSum`` is computed once and shared by the other).
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, b_ih, w_hh, b_hh, mask, reverse):  # type: ignore[override]
        dtype = _autocast.autocast_dtype(x)  # autocast: the inputs are in it already
        w_ih_s, w_hh_s = (_autocast.cast(shared(w), dtype) for w in (w_ih, w_hh))
        bias = None
        for b in (b_ih, b_hh):
            if b is not None:
                b = _autocast.cast(shared(b), dtype)
                bias = b if bias is None else bias + b
        with _autocast.disabled(x):
            out, h_n, c_n, saved = _lstm_mod.direction_forward(
                x, h0, c0, w_hh_s, mask, reverse, True, bias, w_ih=w_ih_s
            )
        ctx.save_for_backward(x, h0, c0, *saved)
        ctx.params, ctx.mask, ctx.reverse = (w_ih, b_ih, w_hh, b_hh), mask, reverse
        ctx.versions = versions(w_ih, w_hh)  # (not saved: autograd does not check them for us)
        return out, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out, d_hn, d_cn):  # type: ignore[override]
        x, h0, c0, *saved = ctx.saved_tensors
        w_ih, b_ih, w_hh, b_hh = ctx.params
        check_versions(ctx.versions, "lstm", w_ih, w_hh)
        dz, h_prev, dh0, dc0 = _lstm_mod.direction_backward(
            tuple(saved), h0, c0, shared(w_hh).to(h0.dtype), ctx.mask, ctx.reverse, True, d_out,
            d_hn, d_cn,
        )
        need = ctx.needs_input_grad
        dx = None
        if need[0]:  # dz @ W_ih over all rows, in dz's time-major storage order
            batch, steps, gates4 = dz.shape
            w = shared(w_ih).to(dz.dtype)
            dx = (dz.transpose(0, 1).reshape(-1, gates4) @ w).view(steps, batch, w.shape[1])
            dx = dx.transpose(0, 1)
        d_bih, d_bhh = _bias_grads(b_ih, b_hh, need[4], need[6], dz)
        # dz and h_prev stay time-major views: Outer contracts them without a copy
        return (
            dx,
            dh0 if need[1] else None,
            dc0 if need[2] else None,
            emit(w_ih, _OUTER, dz, x) if need[3] else None,
            d_bih,
            emit(w_hh, _OUTER, dz, h_prev) if need[5] else None,
            d_bhh,
            None,
            None,
        )


def _fused_weights(w_ih, b_ih, w_hh, b_hh) -> tuple[tuple[torch.Tensor, ...], bool]:
    """The shared ``(W_ih, W_hh[, b_ih, b_hh])`` as ``torch._VF.lstm`` takes them, and
    ``has_biases``; one missing bias (of two) is passed as zeros."""
    if b_ih is None and b_hh is None:
        return (shared(w_ih), shared(w_hh)), False
    zeros = None
    if b_ih is None or b_hh is None:
        zeros = shared(w_hh).new_zeros(shared(w_hh).shape[0])
    b1 = zeros if b_ih is None else shared(b_ih)
    b2 = zeros if b_hh is None else shared(b_hh)
    return (shared(w_ih), shared(w_hh), b1, b2), True


def _replay(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    hs: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    bias: torch.Tensor | None,
    reverse: bool,
) -> tuple[torch.Tensor, ...]:
    """What :func:`~psgfunc.functional.lstm.direction_forward` saves, recomputed from the
    hidden states ``hs [B, T, H]`` (time-major storage) of the fused forward.

    ``x [B, T, D]``, ``h0/c0 [B, H]``, the shared ``w_ih [4H, D]``, ``w_hh [4H, H]`` and
    ``bias`` (``b_ih + b_hh``, ``[4H]``, or None). Every step's pre-activation is known
    once ``hs`` is: ``z = x W_ih^T + h_prev W_hh^T + b`` is two matmuls over all ``T * B``
    rows, the gates one sigmoid and one tanh over all steps; only the cell state is a scan, one
    ``addcmul`` per step. Returns ``(act, tanh_c, h_all, c_all)``, all ``[B, T(+1), *]``
    views of time-major buffers, as ``direction_forward`` lays them out.
    """
    batch, steps, in_size = x.shape
    gates4, hidden = w_hh.shape
    sl_g = slice(2 * hidden, 3 * hidden)
    x_tm = x.transpose(0, 1).reshape(steps * batch, in_size)  # a copy unless time-major
    if bias is None:
        z = torch.mm(x_tm, w_ih.t())
    else:
        z = torch.addmm(bias, x_tm, w_ih.t())
    z = z.view(steps, batch, gates4)
    # the carries with the initial one at 0 (T when reverse), as direction_forward saves them
    h_all = hs.new_empty(steps + 1, batch, hidden)
    c_all = torch.empty_like(h_all)
    init = steps if reverse else 0
    after = slice(0, steps) if reverse else slice(1, steps + 1)
    before = slice(1, steps + 1) if reverse else slice(0, steps)
    h_all[init], h_all[after], c_all[init] = h0, hs.transpose(0, 1), c0
    # the carry each step started from is known for every step: one matmul over all rows
    z.view(-1, gates4).addmm_(h_all[before].reshape(-1, hidden), w_hh.t())
    # tanh as such, as the forward (the identity 2 sigmoid(2 z) - 1 errs by the roundoff of
    # values near 1, not relatively to tanh: see direction_forward)
    # a copy, always (tanh of a strided slice is ~4x slower): at B = T = 1 the slice is
    # contiguous, contiguous() would return it, and tanh_ would overwrite z's g gate
    tanh_g = z[..., sl_g].clone(memory_format=torch.contiguous_format).tanh_()
    act = torch.sigmoid(z, out=z)  # [T, B, 4H]: sigma(i, f, o), and g's slice for now
    act[..., sl_g] = tanh_g
    ig = act[..., :hidden] * tanh_g
    f_t, ig_t = act[..., hidden : 2 * hidden].unbind(0), ig.unbind(0)
    cs = c_all[after]
    cs_t = cs.unbind(0)
    c = c0
    with no_autograd():  # (each step writes into cs)
        for t in range(steps - 1, -1, -1) if reverse else range(steps):
            c = torch.addcmul(ig_t[t], f_t[t], c, out=cs_t[t])
    tanh_c = torch.tanh(cs)
    return act.transpose(0, 1), tanh_c.transpose(0, 1), h_all.transpose(0, 1), c_all.transpose(0, 1)


class _FusedLayer(torch.autograd.Function):
    """One layer/direction without a mask: ``x [B, T, D] -> (out [B, T, H], h_n, c_n [B, H])``.

    Inputs: ``x``, ``h0``/``c0`` ``[B, H]``, the expanded ``w_ih [B, 4H, D]``, ``b_ih
    [B, 4H]`` (or None), ``w_hh [B, 4H, H]``, ``b_hh`` (or None), whose dim 0 is shared,
    and ``reverse``. The forward is one call of torch's fused LSTM (``torch._VF.lstm``,
    one layer, one direction, the shared weights; the reverse direction on ``x`` flipped in
    time), which saves nothing the backward could use. The backward recomputes the gate
    activations and cell states from the saved ``hs`` (:func:`_replay`), runs
    :func:`~psgfunc.functional.lstm.direction_backward` and emits the pieces of all four
    weights, the same pieces :class:`_Layer` emits.
    """

    @staticmethod
    def forward(ctx: Any, x, h0, c0, w_ih, b_ih, w_hh, b_hh, reverse):  # type: ignore[override]
        weights, has_biases = _fused_weights(w_ih, b_ih, w_hh, b_hh)
        dtype = _autocast.autocast_dtype(x)  # autocast: the inputs are in it already
        weights = tuple(_autocast.cast(t, dtype) for t in weights)
        # args after has_biases: num_layers, dropout, train, bidirectional, batch_first
        with _autocast.disabled(x):
            out, h_n, c_n = torch._VF.lstm(
                x.flip(1) if reverse else x, (h0.unsqueeze(0), c0.unsqueeze(0)), weights,
                has_biases, 1, 0.0, False, False, True,
            )
        # out is a [B, T, H] view of time-major storage (flip keeps the strides): hs in the
        # layout direction_backward wants, in natural time order for both directions
        out = out.flip(1) if reverse else out
        ctx.save_for_backward(x, h0, c0, out)
        ctx.params, ctx.reverse = (w_ih, b_ih, w_hh, b_hh), reverse
        ctx.versions = versions(*ctx.params)  # (not saved: autograd does not check them for us)
        return out, h_n[0], c_n[0]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out, d_hn, d_cn):  # type: ignore[override]
        x, h0, c0, hs = ctx.saved_tensors
        w_ih, b_ih, w_hh, b_hh = ctx.params
        check_versions(ctx.versions, "lstm", *ctx.params)
        bias = None
        for b in (b_ih, b_hh):
            if b is not None:
                bias = shared(b).to(x.dtype) if bias is None else bias + shared(b).to(x.dtype)
        w_ih_x, w_hh_x = shared(w_ih).to(x.dtype), shared(w_hh).to(x.dtype)  # autocast: x's dtype
        saved = _replay(x, h0, c0, hs, w_ih_x, w_hh_x, bias, ctx.reverse)
        dz, h_prev, dh0, dc0 = _lstm_mod.direction_backward(
            saved, h0, c0, w_hh_x, None, ctx.reverse, True, d_out, d_hn, d_cn
        )
        need = ctx.needs_input_grad
        dx = None
        if need[0]:  # dz @ W_ih over all rows, in dz's time-major storage order
            batch, steps, gates4 = dz.shape
            dx = (dz.transpose(0, 1).reshape(-1, gates4) @ w_ih_x)
            dx = dx.view(steps, batch, w_ih_x.shape[1]).transpose(0, 1)
        d_bih, d_bhh = _bias_grads(b_ih, b_hh, need[4], need[6], dz)
        # dz stays the time-major view: Outer.weighted_sum contracts it without a copy
        return (
            dx,
            dh0 if need[1] else None,
            dc0 if need[2] else None,
            emit(w_ih, _OUTER, dz, x) if need[3] else None,
            d_bih,
            emit(w_hh, _OUTER, dz, h_prev) if need[5] else None,
            d_bhh,
            None,
        )


def _direction(
    params: dict[str, torch.Tensor],
    sfx: str,
    layer_in: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    mask: torch.Tensor | None,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer/direction of :func:`lstm` (``layer_in [B, T, D] -> out [B, T, H], h_n,
    c_n [B, H]``): :class:`_FusedLayer` when there is no mask, nothing is empty and either
    no gradient will be taken or ``_FUSED_WITH_GRAD`` is set; else the projection and
    :class:`_Layer` (:func:`_recurrence`). Both give the same values and gradients."""
    tensors = (layer_in, h0, c0, *(params.get(n + sfx) for n in _NAMES))
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if (grads and not _FUSED_WITH_GRAD) or mask is not None or 0 in layer_in.shape[:2]:
        return _recurrence(params, sfx, layer_in, h0, c0, mask, reverse)
    return apply_function(_FusedLayer, *tensors, reverse)


def _recurrence(
    params: dict[str, torch.Tensor],
    sfx: str,
    layer_in: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    mask: torch.Tensor | None,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer/direction on ``layer_in [B, T, D]``; params named ``weight_ih{sfx}`` etc."""
    tensors = (layer_in, h0, c0, *(params.get(n + sfx) for n in _NAMES))
    return apply_function(_Layer, *tensors, mask, reverse)


def _dropout_between_layers(layer_in: torch.Tensor, p: float) -> torch.Tensor:
    """``[B, T, F] -> [B, T, F]``: dropout of one layer's output, drawn as the enclosing
    vmap's ``randomness`` says (see :func:`vmap_randomness`)."""
    randomness = vmap_randomness()
    if randomness == "error":
        raise ValueError(
            "lstm: dropout between layers draws random numbers, and per_sample_grads was called "
            "with randomness='error'; pass randomness='different' (each example its own mask, "
            "as in a batched forward) or 'same' (one mask for every example), or dropout=0.0"
        )
    if randomness == "same":  # one [T, F] mask, the same for every example
        keep = F.dropout(layer_in.new_ones(1, *layer_in.shape[1:]), p, training=True)
        return layer_in * keep
    # the plain layer's draw: F.dropout on the contiguous time-major output
    return F.dropout(layer_in.transpose(0, 1).contiguous(), p, training=True).transpose(0, 1)


def _all_shared(params: dict[str, torch.Tensor | None]) -> bool:
    return all(p is None or is_shared(p) for p in params.values())


def _first(params: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """One example's params (the shared tensor): for the plain layer's shape checks."""
    return {k: shared(v) for k, v in params.items() if v is not None}


class LSTMRule(Rule):
    """Per-sample rule of :func:`psgfunc.functional.lstm`."""

    def _core(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        h0: torch.Tensor | None,
        c0: torch.Tensor | None,
        mask: torch.Tensor | None,
        num_layers: int,
        num_dir: int,
        hidden: int,
        dropout: float,
        training: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, T, D]``, ``h0/c0 [L*P, B, H]`` -> ``out [B, T, P*H]``, ``h_n/c_n [L*P, B, H]``."""
        batch = x.shape[0]
        dtype = _autocast.autocast_dtype(x)  # autocast: as nn.LSTM, all in that dtype
        x, h0, c0 = _autocast.cast(x, dtype), _autocast.cast(h0, dtype), _autocast.cast(c0, dtype)
        zeros = x.new_zeros(batch, hidden)
        layer_in = x
        h_n, c_n = [], []
        for layer in range(num_layers):
            outs = []
            for d in range(num_dir):
                k = layer * num_dir + d
                init_h = zeros if h0 is None else h0[k]
                init_c = zeros if c0 is None else c0[k]
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                out, h, c = _direction(params, sfx, layer_in, init_h, init_c, mask, bool(d))
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_in = outs[0] if num_dir == 1 else torch.cat(outs, dim=-1)
            if training and dropout > 0 and layer < num_layers - 1:
                layer_in = _dropout_between_layers(layer_in, dropout)
        return layer_in, torch.stack(h_n), torch.stack(c_n)

    def batched(  # type: ignore[override]
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        state: Any,
        lengths: Any,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        batch_first: bool = False,
        dropout: float = 0.0,
        training: bool = False,
    ) -> Any:
        """The layer's own convention: ``x [T, B, D]`` (``[B, T, D]`` with ``batch_first``),
        state ``[L*P, B, H]``; or one example ``x [T, D]``, state ``[L*P, H]`` when ``B == 1``.
        """
        opts = dict(num_layers=num_layers, bidirectional=bidirectional, dropout=dropout,
                    training=training)
        size = next(p.shape[0] for p in params.values() if p is not None)
        if not _all_shared(params):
            return self._vmap_fallback(params, x, state, lengths, batch_first, opts)
        num_dir, hidden, _ = _lstm_mod._check_lstm_args(
            _first(params), x, num_layers, bidirectional, dropout
        )
        one = x.dim() == 2
        xb = x.unsqueeze(0) if one else (x if batch_first else x.transpose(0, 1))  # [B, T, D]
        steps, batch = xb.shape[1], xb.shape[0]
        if batch != size:
            raise ValueError(
                f"lstm: x holds {batch} examples but the params are expanded for {size}; the "
                f"batch dim of x ({'one example' if one else 'dim 0' if batch_first else 'dim 1'}) "
                "must equal the expanded size"
            )
        h0, c0 = _lstm_mod._initial_state(state, x, num_layers * num_dir, batch, hidden, not one)
        if isinstance(lengths, int) and not isinstance(lengths, bool) and one:
            lengths = torch.tensor([lengths])
        elif one and isinstance(lengths, torch.Tensor) and lengths.dim() == 0:
            lengths = lengths.reshape(1)
        mask = _lstm_mod._mask(lengths, steps, batch, True, x.device)
        mask = None if mask is None else mask.transpose(0, 1)  # [B, T, 1]
        out, h_n, c_n = self._core(params, xb, h0, c0, mask, num_layers, num_dir, hidden,
                                   dropout, training)
        if one:
            return out.squeeze(0), (h_n.squeeze(1), c_n.squeeze(1))
        if not batch_first:
            out = out.transpose(0, 1).contiguous()
        return out, (h_n, c_n)

    def vmapped(  # type: ignore[override]
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        state: Any,
        lengths: Any,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        batch_first: bool = False,
        dropout: float = 0.0,
        training: bool = False,
    ) -> Any:
        """Per-example ``x [T, D]`` stacked: ``[B, T, D]``; state leaves ``[B, L*P, H]``;
        ``lengths [B]`` (or one int for all). Returns ``out [B, T, P*H]``, ``h_n/c_n
        [B, L*P, H]``. Anything else (e.g. a per-example batch ``[T, B', D]``): the fallback.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            return NotImplemented
        try:
            num_dir, hidden, _ = _lstm_mod._check_lstm_args(
                _first(params), x, num_layers, bidirectional, dropout
            )
        except ValueError:
            return NotImplemented  # the plain layer raises its own error
        batch, steps = x.shape[0], x.shape[1]
        want = (batch, num_layers * num_dir, hidden)
        h0 = c0 = None
        if state is not None:
            if not isinstance(state, (tuple, list)) or len(state) != 2 or any(
                not isinstance(t, torch.Tensor) or tuple(t.shape) != want or t.dtype != x.dtype
                for t in state
            ):
                return NotImplemented
            h0, c0 = state[0].transpose(0, 1), state[1].transpose(0, 1)
        if isinstance(lengths, int) and not isinstance(lengths, bool):
            lengths = torch.full((batch,), lengths, dtype=torch.long, device=x.device)
        if lengths is not None and (
            not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (batch,)
        ):
            return NotImplemented
        mask = _lstm_mod._mask(lengths, steps, batch, True, x.device)
        mask = None if mask is None else mask.transpose(0, 1)
        out, h_n, c_n = self._core(params, x, h0, c0, mask, num_layers, num_dir, hidden,
                                   dropout, training)
        return out, (h_n.transpose(0, 1), c_n.transpose(0, 1))

    def _vmap_fallback(self, params, x, state, lengths, batch_first, opts):
        """Batch mode with per-example (not shared) params: vmap of the plain layer."""
        bdim = 0 if batch_first or x.dim() == 2 else 1
        if x.dim() == 2:
            x = x.unsqueeze(0)
            state = None if state is None else tuple(t.unsqueeze(1) for t in state)
        sdim = None if state is None else (1, 1)

        def one(p, xe, s, n):
            return self.plain(p, xe, s, n, **opts)

        ldim = 0 if isinstance(lengths, torch.Tensor) and lengths.dim() == 1 else None
        out, (h_n, c_n) = torch.func.vmap(
            one, in_dims=(0, bdim, sdim, ldim), out_dims=(bdim, (1, 1)), randomness=vmap_randomness()
        )(params, x, state, lengths)
        return out, (h_n, c_n)

    def tapped(  # type: ignore[override]
        self,
        tap: Any,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        state: Any,
        lengths: Any,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        batch_first: bool = False,
        dropout: float = 0.0,
        training: bool = False,
    ) -> Any:
        """One example ``x [T, D]`` without ``lengths``: each layer and direction adds its tap
        to the gate pre-activations ``[T, 4H]`` (whose gradient is every step's ``dz``) and
        keeps its input and ``h_prev``: the pieces of :meth:`_Layer.backward`'s emits."""
        index = {k: tap.index(v) for k, v in params.items() if v is not None}
        if lengths is not None or not isinstance(x, torch.Tensor) or x.dim() != 2 or None in index.values():
            return NotImplemented

        def direction(sfx: str, layer_in: torch.Tensor, x_gates: torch.Tensor, init: Any, run: Any) -> Any:
            # one example runs as a batch of one: layer_in [T, 1, D], x_gates [T, 1, 4H]
            keys = [k + sfx for k in _NAMES]  # weight_ih, bias_ih, weight_hh, bias_hh

            def build(saved: tuple[torch.Tensor, ...], g: torch.Tensor) -> list[tuple[int, Any, Any]]:
                size, steps = g.shape[:2]
                dtype = params[keys[0]].dtype  # autocast: the pieces in the params' dtype, as emit
                dz = g.reshape(size, steps, -1).to(dtype)
                x3, h3 = (t.reshape(size, steps, -1).to(dtype) for t in saved)
                found = [(index.get(k), kind, data) for k, kind, data in
                         zip(keys, (_OUTER, _ROWSUM, _OUTER, _ROWSUM), ((dz, x3), (dz,), (dz, h3), (dz,)))]
                return [piece for piece in found if piece[0] is not None]

            saved = [layer_in]
            (h, c), out = run(tap.out(x_gates, saved, build))
            first = init[0].unsqueeze(0)  # [1, 1, H]
            reverse = sfx.endswith("_reverse")
            saved.append(torch.cat([out[1:], first]) if reverse else torch.cat([first, out[:-1]]))
            return (h, c), out

        detached = {k: None if v is None else v.detach() for k, v in params.items()}
        return _lstm_mod._lstm(detached, x, state, num_layers, bidirectional, batch_first, dropout, training,
                               None, direction)


class LSTMCellRule(Rule):
    """Per-sample rule of :func:`psgfunc.functional.lstm_cell` (batch dim 0 everywhere).

    The step is :class:`_Layer` with ``T = 1``, whose backward emits the pieces of all four
    weights. A cell called in a user's loop therefore pays one ``[B, 4H, H]`` per call for
    each weight; :func:`lstm` does not.
    """

    def batched(self, params, carry, x):  # type: ignore[override]
        w_ih, w_hh = params["weight_ih"], params["weight_hh"]
        hidden, in_size = _lstm_mod._cell_sizes(shared(w_ih), shared(w_hh), "weight_ih",
                                                "weight_hh", "lstm_cell")
        size = w_ih.shape[0]
        if not _all_shared(params):
            return torch.func.vmap(self.plain, in_dims=(0, None if carry is None else 0, 0))(
                params, carry, x if x.dim() == 2 else x.unsqueeze(0)
            )
        if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2) or x.shape[-1] != in_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"lstm_cell: x must be [B, D] (or [D] for one example) with D={in_size}, "
                f"got {shape}"
            )
        one = x.dim() == 1
        xb = x.unsqueeze(0) if one else x
        if xb.shape[0] != size:
            raise ValueError(
                f"lstm_cell: x holds {xb.shape[0]} examples (dim 0) but the params are expanded "
                f"for {size}"
            )
        want = (size, hidden)
        if carry is None:
            h = c = xb.new_zeros(want)
        else:
            if not isinstance(carry, (tuple, list)) or len(carry) != 2:
                raise ValueError("lstm_cell: carry must be a pair (h, c) of tensors or None")
            h, c = (t.unsqueeze(0) if one else t for t in carry)
            for name, t in (("h", h), ("c", c)):
                if tuple(t.shape) != want:
                    raise ValueError(
                        f"lstm_cell: carry {name} has shape {tuple(t.shape)} but x of shape "
                        f"{tuple(x.shape)} needs {tuple(x.shape[:-1]) + (hidden,)}"
                    )
        dtype = _autocast.autocast_dtype(xb)  # autocast: compute in it, the carry keeps its dtype
        carry_dtype = h.dtype
        xb, h, c = _autocast.cast(xb, dtype), _autocast.cast(h, dtype), _autocast.cast(c, dtype)
        _, h_new, c_new = _recurrence(params, "", xb.unsqueeze(1), h, c, None, False)
        h_new, c_new = _autocast.cast(h_new, carry_dtype), _autocast.cast(c_new, carry_dtype)
        if one:
            h_new, c_new = h_new.squeeze(0), c_new.squeeze(0)
        return (h_new, c_new), h_new

    def vmapped(self, params, carry, x):  # type: ignore[override]
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            return NotImplemented
        if carry is not None and (
            not isinstance(carry, (tuple, list)) or len(carry) != 2
            or any(not isinstance(t, torch.Tensor) or t.dim() != 2 for t in carry)
        ):
            return NotImplemented
        return self.batched(params, carry, x)


def _plain_lstm(params: dict[str, torch.Tensor], x: torch.Tensor, state: Any, lengths: Any,
                **options: Any) -> Any:
    """The plain layer with ``lengths`` positional, as the rule receives it."""
    return PF.lstm.plain(params, x, state, lengths=lengths, **options)


LSTM = LSTMRule(_plain_lstm)
LSTM_CELL = LSTMCellRule(PF.lstm_cell.plain)


@_rules.register_rule(PF.lstm)
def _lstm(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    state: Any = None,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    lengths: Any = None,
) -> Any:
    # tensors travel as positional args (vmap unwraps those); options as keywords
    return call_rule(
        LSTM, params, x, state, lengths, num_layers=num_layers, bidirectional=bidirectional,
        batch_first=batch_first, dropout=dropout, training=training,
    )


@_rules.register_rule(PF.lstm_cell)
def _lstm_cell(params: dict[str, torch.Tensor], carry: Any, x: torch.Tensor) -> Any:
    return call_rule(LSTM_CELL, params, carry, x)
