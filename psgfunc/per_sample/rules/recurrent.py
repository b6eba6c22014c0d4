"""Rules for :func:`psgfunc.functional.gru` / ``rnn`` and their cells ``gru_cell`` / ``rnn_cell``.

The same plan as the LSTM's rule (:mod:`psgfunc.per_sample.rules.lstm`), for each layer
and direction:

* ``W_ih``, ``b_ih``: the input projection of all ``T`` steps, ``x [B, T, D] -> x W_ih^T +
  b_ih [B, T, G*H]``, is one call of the linear rule; its gradient is ``dz_ih``, the
  gradient of the gates' input part, and the linear rule contracts it over time.
* ``W_hh``, ``b_hh``: the recurrence is one ``autograd.Function`` (:class:`_Recurrence`)
  whose forward runs the loop with the shared ``W_hh``/``b_hh`` and whose backward is
  backpropagation through time by hand. It collects the gradients of the hidden part of the
  gates, ``dz_hh [B, T, G*H]``, and the state each step started from, ``h_prev [B, T, H]``,
  then emits ``dW_hh[b] = sum_t dz_hh[b, t]^T h_prev[b, t]`` (``Outer``) and ``db_hh[b] =
  sum_t dz_hh[b, t]`` (``RowSum``): one contraction over time.

For the RNN, ``dz_hh = dz_ih`` (the pre-activation's gradient). For the GRU the two differ in
the ``n`` gate: ``n = tanh(x_n + r * (h W_hn^T + b_hn))``, so with ``dn`` the gradient of the
``n`` pre-activation, ``x_n`` gets ``dn`` while ``h W_hn^T + b_hn`` gets ``r * dn``; the ``r``
and ``z`` parts are the same for both. Padded steps (``lengths``) have zero ``dz``.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import psgfunc.functional as PF
from psgfunc import _rules
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

_rec = importlib.import_module("psgfunc.functional.recurrent")
_lstm_rule = importlib.import_module("psgfunc.per_sample.rules.lstm")

_OUTER, _ROWSUM = Outer(), RowSum()
_NAMES = ("weight_ih", "bias_ih", "weight_hh", "bias_hh")


# ------------------------------------------------------------------ the loop, both ways


def direction_forward(
    kind: str,
    x_gates: torch.Tensor,
    h0: torch.Tensor,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
    mask: torch.Tensor | None,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """One layer and direction over a batch, without autograd.

    Args:
        kind: ``"gru"``, ``"tanh"`` or ``"relu"``.
        x_gates: ``[B, T, G*H]``, ``x W_ih^T + b_ih``.
        h0: ``[B, H]``.
        w_hh, b_hh: the shared ``[G*H, H]`` and ``[G*H]`` (or None).
        mask: ``[B, T, 1]`` bool (True at valid steps) or None.
        reverse: run from ``t = T - 1`` down to 0.

    Returns:
        ``(out [B, T, H], h_n [B, H], saved)``; ``out`` is zero at masked steps, where the
        state is held. ``saved`` is for :func:`direction_backward`: ``(hs, act)`` with ``hs``
        the state after each step and ``act`` the GRU's ``(r, z, n, h W_hn^T + b_hn)``
        ``[B, T, 4H]`` (the RNN's is ``hs``' pre-mask new states, ``[B, T, H]``).
    """
    batch, steps, _ = x_gates.shape
    hidden = w_hh.shape[1]
    hs = x_gates.new_empty(batch, steps, hidden)
    act = x_gates.new_empty(batch, steps, 4 * hidden if kind == "gru" else hidden)
    h = h0
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        gh = F.linear(h, w_hh, b_hh)
        if kind == "gru":
            xr, xz, xn = x_gates[:, t].chunk(3, dim=-1)
            hr, hz, hn = gh.chunk(3, dim=-1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h_new = n + z * (h - n)
            act[:, t] = torch.cat([r, z, n, hn], dim=-1)
        else:
            pre = x_gates[:, t] + gh
            h_new = torch.tanh(pre) if kind == "tanh" else torch.relu(pre)
            act[:, t] = h_new
        h = h_new if mask is None else torch.where(mask[:, t], h_new, h)
        hs[:, t] = h
    out = hs if mask is None else hs.masked_fill(~mask, 0)
    return out, h.clone(), (hs, act)


def _previous(hs: torch.Tensor, first: torch.Tensor, reverse: bool) -> torch.Tensor:
    """``[B, T, H]``: the state each step started from (``first`` for the first step)."""
    f = first.unsqueeze(1)
    parts = [hs[:, 1:], f] if reverse else [f, hs[:, :-1]]
    return torch.cat(parts, 1)


def direction_backward(
    kind: str,
    saved: tuple[torch.Tensor, ...],
    h0: torch.Tensor,
    w_hh: torch.Tensor,
    mask: torch.Tensor | None,
    reverse: bool,
    d_out: torch.Tensor | None,
    d_hn: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backpropagation through time for :func:`direction_forward`, without autograd.

    GRU, with ``g`` the gradient reaching ``h'`` at a step (``h' = n + z (h - n)``)::

        dn_pre = g (1 - z) (1 - n^2);  dr_pre = dn_pre * hn * r (1 - r)
        dz_pre = g (h - n) z (1 - z)
        dz_ih  = (dr_pre, dz_pre, dn_pre);  dz_hh = (dr_pre, dz_pre, r * dn_pre)
        dh     = g z + dz_hh W_hh

    RNN: ``dz_ih = dz_hh = g * act'``, ``dh = dz_hh W_hh``. At masked steps the pieces are
    zero and ``dh`` passes through.

    Returns:
        ``(dz_ih [B, T, G*H], dz_hh [B, T, G*H], h_prev [B, T, H], dh0 [B, H])``.
    """
    hs, act = saved
    batch, steps, hidden = hs.shape
    gh = w_hh.shape[0]
    dh = torch.zeros_like(h0) if d_hn is None else d_hn
    dz_ih = hs.new_zeros(batch, steps, gh)
    dz_hh = dz_ih if kind != "gru" else hs.new_zeros(batch, steps, gh)
    if steps == 0:
        return dz_ih, dz_hh, hs, dh
    h_prev = _previous(hs, h0, reverse)
    keep = None if mask is None else mask.to(hs.dtype)
    for t in range(steps) if reverse else range(steps - 1, -1, -1):
        g = dh if d_out is None else dh + d_out[:, t]
        if keep is not None:
            hold = dh * (1 - keep[:, t])
            g = g * keep[:, t]
        if kind == "gru":
            r, z, n, hn = act[:, t].chunk(4, dim=-1)
            dn = g * (1 - z) * (1 - n * n)
            dr = dn * hn * r * (1 - r)
            dzz = g * (h_prev[:, t] - n) * z * (1 - z)
            dz_ih[:, t] = torch.cat([dr, dzz, dn], dim=-1)
            dz_hh[:, t] = torch.cat([dr, dzz, r * dn], dim=-1)
            dh = g * z + dz_hh[:, t] @ w_hh
        else:
            h_new = act[:, t]
            deriv = 1 - h_new * h_new if kind == "tanh" else (h_new > 0).to(h_new.dtype)
            dz_ih[:, t] = g * deriv
            dh = dz_ih[:, t] @ w_hh
        if keep is not None:
            dh = dh + hold
    return dz_ih, dz_hh, h_prev, dh


class _Recurrence(torch.autograd.Function):
    """One layer/direction: ``x_gates [B, T, G*H] -> (out [B, T, H], h_n [B, H])``.

    Inputs: ``kind``, ``x_gates`` (``x W_ih^T + b_ih``), ``h0 [B, H]``, the expanded
    ``w_hh [B, G*H, H]`` and ``b_hh [B, G*H]`` (or None), ``mask [B, T, 1]`` or None,
    ``reverse``. The forward uses the shared weights; the backward returns the gradients of
    ``x_gates`` and ``h0`` and, through :func:`emit`, the per-sample gradients of ``w_hh``
    and ``b_hh``.
    """

    @staticmethod
    def forward(ctx: Any, kind, x_gates, h0, w_hh, b_hh, mask, reverse):  # type: ignore[override]
        out, h_n, saved = direction_forward(
            kind, x_gates, h0, shared(w_hh), None if b_hh is None else shared(b_hh), mask, reverse
        )
        ctx.save_for_backward(h0, *saved)
        ctx.kind, ctx.w_hh, ctx.b_hh, ctx.mask, ctx.reverse = kind, w_hh, b_hh, mask, reverse
        ctx.versions = versions(w_hh, b_hh)  # (not saved: autograd does not check them for us)
        return out, h_n

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out, d_hn):  # type: ignore[override]
        h0, *saved = ctx.saved_tensors
        w_hh, b_hh = ctx.w_hh, ctx.b_hh
        check_versions(ctx.versions, ctx.kind, w_hh, b_hh)
        dz_ih, dz_hh, h_prev, dh0 = direction_backward(
            ctx.kind, tuple(saved), h0, shared(w_hh), ctx.mask, ctx.reverse, d_out, d_hn
        )
        need = ctx.needs_input_grad
        d_w = emit(w_hh, _OUTER, dz_hh, h_prev) if need[3] else None
        d_b = emit(b_hh, _ROWSUM, dz_hh) if b_hh is not None and need[4] else None
        return None, dz_ih if need[1] else None, dh0 if need[2] else None, d_w, d_b, None, None


def _recurrence(
    kind: str,
    params: dict[str, torch.Tensor],
    sfx: str,
    layer_in: torch.Tensor,
    h0: torch.Tensor,
    mask: torch.Tensor | None,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer/direction on ``layer_in [B, T, D]`` -> ``(out [B, T, H], h_n [B, H])``."""
    proj = {"weight": params["weight_ih" + sfx]}
    if params.get("bias_ih" + sfx) is not None:
        proj["bias"] = params["bias_ih" + sfx]
    x_gates = PF.linear(proj, layer_in)  # the linear rule (batch mode): [B, T, G*H]
    return apply_function(
        _Recurrence, kind, x_gates, h0, params["weight_hh" + sfx], params.get("bias_hh" + sfx),
        mask, reverse,
    )


def _all_shared(params: dict[str, torch.Tensor | None]) -> bool:
    return all(p is None or is_shared(p) for p in params.values())


def _first(params: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    return {k: shared(v) for k, v in params.items() if v is not None}


def _dropout(layer_in: torch.Tensor, p: float, fn: str) -> torch.Tensor:
    try:
        return _lstm_rule._dropout_between_layers(layer_in, p)
    except ValueError as error:
        raise ValueError(str(error).replace("lstm:", f"{fn}:", 1)) from None


# ------------------------------------------------------------------------------- layers


class RecurrentRule(Rule):
    """Per-sample rule of :func:`psgfunc.functional.gru` (``kind="gru"``) or ``rnn``."""

    def __init__(self, plain: Any, kind: str | None):
        super().__init__(plain)
        self.kind = kind  # None: the RNN, whose kind is its nonlinearity

    def _kind(self, opts: dict[str, Any]) -> str:
        if self.kind is not None:
            return self.kind
        return _rec._kind(opts.get("nonlinearity", "tanh"), "rnn")

    @staticmethod
    def _layer_opts(opts: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in opts.items() if k != "batch_first"}

    def _core(self, kind, params, x, h0, mask, num_layers, num_dir, hidden, dropout, training):
        """``x [B, T, D]``, ``h0 [L*P, B, H]`` or None -> ``out [B, T, P*H]``, ``h_n [L*P, B, H]``."""
        zeros = x.new_zeros(x.shape[0], hidden)
        layer_in = x
        h_n = []
        for layer in range(num_layers):
            outs = []
            for d in range(num_dir):
                k = layer * num_dir + d
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                out, h = _recurrence(kind, params, sfx, layer_in, zeros if h0 is None else h0[k],
                                     mask, bool(d))
                outs.append(out)
                h_n.append(h)
            layer_in = outs[0] if num_dir == 1 else torch.cat(outs, dim=-1)
            if training and dropout > 0 and layer < num_layers - 1:
                layer_in = _dropout(layer_in, dropout, _rec._name(kind))
        return layer_in, torch.stack(h_n)

    def batched(self, params, x, h0, lengths, **opts):  # type: ignore[override]
        """The layer's own convention: ``x [T, B, D]`` (``[B, T, D]`` with ``batch_first``),
        ``h0 [L*P, B, H]``; or one example ``x [T, D]``, ``h0 [L*P, H]`` when ``B == 1``."""
        kind = self._kind(opts)
        num_layers, bidirectional = opts.get("num_layers", 1), opts.get("bidirectional", False)
        batch_first, dropout = opts.get("batch_first", False), opts.get("dropout", 0.0)
        training = opts.get("training", False)
        size = next(p.shape[0] for p in params.values() if p is not None)
        if not _all_shared(params):
            return self._vmap_fallback(params, x, h0, lengths, batch_first, opts)
        num_dir, hidden, _ = _rec.check_layer_args(kind, _first(params), x, num_layers,
                                                   bidirectional, dropout)
        one = x.dim() == 2
        xb = x.unsqueeze(0) if one else (x if batch_first else x.transpose(0, 1))  # [B, T, D]
        batch, steps = xb.shape[0], xb.shape[1]
        if batch != size:
            raise ValueError(
                f"{_rec._name(kind)}: x holds {batch} examples but the params are expanded for "
                f"{size}; the batch dim of x must equal the expanded size"
            )
        h0 = _rec.initial_state(kind, h0, x, num_layers * num_dir, batch, hidden, not one)
        if one and lengths is not None and not isinstance(lengths, bool):
            if isinstance(lengths, int):
                lengths = torch.tensor([lengths])
            elif isinstance(lengths, torch.Tensor) and lengths.dim() == 0:
                lengths = lengths.reshape(1)
        mask = _rec.mask(kind, lengths, steps, batch, True, x.device)
        mask = None if mask is None else mask.transpose(0, 1)  # [B, T, 1]
        out, h_n = self._core(kind, params, xb, h0, mask, num_layers, num_dir, hidden, dropout,
                              training)
        if one:
            return out.squeeze(0), h_n.squeeze(1)
        if not batch_first:
            out = out.transpose(0, 1).contiguous()
        return out, h_n

    def vmapped(self, params, x, h0, lengths, **opts):  # type: ignore[override]
        """Per-example ``x [T, D]`` stacked: ``[B, T, D]``; ``h0 [B, L*P, H]``; ``lengths
        [B]`` (or one int). Returns ``out [B, T, P*H]``, ``h_n [B, L*P, H]``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            return NotImplemented
        try:
            kind = self._kind(opts)
            num_layers, bidirectional = opts.get("num_layers", 1), opts.get("bidirectional", False)
            num_dir, hidden, _ = _rec.check_layer_args(kind, _first(params), x, num_layers,
                                                       bidirectional, opts.get("dropout", 0.0))
        except ValueError:
            return NotImplemented  # the plain layer raises its own error
        batch, steps = x.shape[0], x.shape[1]
        if h0 is not None:
            if not isinstance(h0, torch.Tensor) or tuple(h0.shape) != (batch, num_layers * num_dir, hidden) \
                    or h0.dtype != x.dtype:
                return NotImplemented
            h0 = h0.transpose(0, 1)
        if isinstance(lengths, int) and not isinstance(lengths, bool):
            lengths = torch.full((batch,), lengths, dtype=torch.long, device=x.device)
        if lengths is not None and (not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (batch,)):
            return NotImplemented
        mask = _rec.mask(kind, lengths, steps, batch, True, x.device)
        mask = None if mask is None else mask.transpose(0, 1)
        out, h_n = self._core(kind, params, x, h0, mask, num_layers, num_dir, hidden,
                              opts.get("dropout", 0.0), opts.get("training", False))
        return out, h_n.transpose(0, 1)

    def _vmap_fallback(self, params, x, h0, lengths, batch_first, opts):
        """Batch mode with per-example (not shared) params: vmap of the plain layer."""
        bdim = 0 if batch_first or x.dim() == 2 else 1
        if x.dim() == 2:
            x = x.unsqueeze(0)
            h0 = None if h0 is None else h0.unsqueeze(1)
        hdim = None if h0 is None else 1

        def one(p, xe, he, n):
            return self.plain(p, xe, he, n, **opts)

        ldim = 0 if isinstance(lengths, torch.Tensor) and lengths.dim() == 1 else None
        return torch.func.vmap(
            one, in_dims=(0, bdim, hdim, ldim), out_dims=(bdim, 1), randomness=vmap_randomness()
        )(params, x, h0, lengths)

    def tapped(self, tap, params, x, h0, lengths, **opts):  # type: ignore[override]
        """One example ``x [T, D]`` (with or without ``lengths``): each layer and direction adds its tap
        to the gates' input part ``[T, G*H]`` (whose gradient is ``dz_ih``) and keeps its
        input, ``h_prev`` and (GRU) the reset gates ``r``, from which ``dz_hh`` follows:
        the pieces of :meth:`_Recurrence.backward`'s emits."""
        kind = self._kind(opts)
        index = {k: tap.index(v) for k, v in params.items() if v is not None}
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or None in index.values():
            return NotImplemented
        hidden = next(v for k, v in params.items() if k.startswith("weight_hh")).shape[1]
        # [T, 1, 1]: with lengths, the reverse direction's first step (the last valid one)
        # starts from init, not from the (zero) output of the padding step after it
        valid = _rec.mask(kind, lengths, x.shape[0], 1, False, x.device)

        def direction(sfx, layer_in, x_gates, init, run):
            keys = [k + sfx for k in _NAMES]  # weight_ih, bias_ih, weight_hh, bias_hh

            def build(saved, g):
                size, steps = g.shape[:2]
                dz_ih = g.reshape(size, steps, -1)
                x3, h3 = (t.reshape(size, steps, -1) for t in saved[:2])
                if kind == "gru":
                    r = saved[2].reshape(size, steps, hidden)
                    dz_hh = torch.cat([dz_ih[..., : 2 * hidden], r * dz_ih[..., 2 * hidden:]], dim=-1)
                else:
                    dz_hh = dz_ih
                found = [(index.get(k), kind_, data) for k, kind_, data in
                         zip(keys, (_OUTER, _ROWSUM, _OUTER, _ROWSUM),
                             ((dz_ih, x3), (dz_ih,), (dz_hh, h3), (dz_hh,)))]
                return [piece for piece in found if piece[0] is not None]

            saved = [layer_in]
            h, res = run(tap.out(x_gates, saved, build), with_r=kind == "gru")
            out, r = res if kind == "gru" else (res, None)
            first = init.unsqueeze(0)  # [1, 1, H]
            if sfx.endswith("_reverse"):
                prev = torch.cat([out[1:], first])
                if valid is not None:  # padding steps have dz = 0: their h_prev is moot
                    after = torch.cat([valid[1:], torch.zeros_like(valid[:1])])
                    prev = torch.where(after, prev, first)
            else:
                prev = torch.cat([first, out[:-1]])
            saved.append(prev)
            if r is not None:
                saved.append(r)
            return h, out

        detached = {k: None if v is None else v.detach() for k, v in params.items()}
        o = self._layer_opts(opts)
        return _rec._layer(kind, detached, x, h0, o.get("num_layers", 1), o.get("bidirectional", False),
                           opts.get("batch_first", False), o.get("dropout", 0.0),
                           o.get("training", False), lengths, direction)


# --------------------------------------------------------------------------------- cells


class CellRule(Rule):
    """Per-sample rule of :func:`psgfunc.functional.gru_cell` / ``rnn_cell`` (batch dim 0).

    The step is :class:`_Recurrence` with ``T = 1``: ``W_ih``/``b_ih`` through the linear
    rule, ``W_hh``/``b_hh`` emitted by the recurrence's backward.
    """

    def __init__(self, plain: Any, kind: str | None):
        super().__init__(plain)
        self.kind = kind

    def batched(self, params, h, x, **opts):  # type: ignore[override]
        fn = "gru_cell" if self.kind == "gru" else "rnn_cell"
        kind = self.kind or _rec._kind(opts.get("nonlinearity", "tanh"), fn)
        gates = 3 if kind == "gru" else 1
        w_ih, w_hh = params["weight_ih"], params["weight_hh"]
        hidden, in_size = _rec._cell_sizes(shared(w_ih), shared(w_hh), "weight_ih", "weight_hh",
                                           fn, gates)
        size = w_ih.shape[0]
        if not _all_shared(params):
            return torch.func.vmap(lambda p, hh, xx: self.plain(p, hh, xx, **opts),
                                   in_dims=(0, None if h is None else 0, 0))(
                params, h, x if x.dim() == 2 else x.unsqueeze(0)
            )
        if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2) or x.shape[-1] != in_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{fn}: x must be [B, D] (or [D] for one example) with D={in_size}, got {shape}")
        one = x.dim() == 1
        xb = x.unsqueeze(0) if one else x
        if xb.shape[0] != size:
            raise ValueError(
                f"{fn}: x holds {xb.shape[0]} examples (dim 0) but the params are expanded for {size}"
            )
        if h is None:
            hb = xb.new_zeros(size, hidden)
        else:
            hb = h.unsqueeze(0) if one and isinstance(h, torch.Tensor) else h
            if not isinstance(hb, torch.Tensor) or tuple(hb.shape) != (size, hidden):
                shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise ValueError(
                    f"{fn}: h has shape {shape} but x of shape {tuple(x.shape)} needs "
                    f"{tuple(x.shape[:-1]) + (hidden,)}"
                )
        _, h_new = _recurrence(kind, params, "", xb.unsqueeze(1), hb, None, False)
        if one:
            h_new = h_new.squeeze(0)
        return h_new, h_new

    def vmapped(self, params, h, x, **opts):  # type: ignore[override]
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            return NotImplemented
        if h is not None and (not isinstance(h, torch.Tensor) or h.dim() != 2):
            return NotImplemented
        return self.batched(params, h, x, **opts)


def _plain_gru(params, x, h0, lengths, **options):
    return PF.gru.plain(params, x, h0, lengths=lengths, **options)


def _plain_rnn(params, x, h0, lengths, **options):
    return PF.rnn.plain(params, x, h0, lengths=lengths, **options)


GRU = RecurrentRule(_plain_gru, "gru")
RNN = RecurrentRule(_plain_rnn, None)
GRU_CELL = CellRule(PF.gru_cell.plain, "gru")
RNN_CELL = CellRule(PF.rnn_cell.plain, None)


@_rules.register_rule(PF.gru)
def _gru(params, x, h0=None, *, num_layers=1, bidirectional=False, batch_first=False, dropout=0.0,
         training=False, lengths=None):
    # tensors travel as positional args (vmap unwraps those); options as keywords
    return call_rule(GRU, params, x, h0, lengths, num_layers=num_layers,
                     bidirectional=bidirectional, batch_first=batch_first, dropout=dropout,
                     training=training)


@_rules.register_rule(PF.rnn)
def _rnn(params, x, h0=None, *, nonlinearity="tanh", num_layers=1, bidirectional=False,
         batch_first=False, dropout=0.0, training=False, lengths=None):
    return call_rule(RNN, params, x, h0, lengths, nonlinearity=nonlinearity, num_layers=num_layers,
                     bidirectional=bidirectional, batch_first=batch_first, dropout=dropout,
                     training=training)


@_rules.register_rule(PF.gru_cell)
def _gru_cell(params, h, x):
    return call_rule(GRU_CELL, params, h, x)


@_rules.register_rule(PF.rnn_cell)
def _rnn_cell(params, h, x, *, nonlinearity="tanh"):
    return call_rule(RNN_CELL, params, h, x, nonlinearity=nonlinearity)
