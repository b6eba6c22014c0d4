"""LSTM cell and multi-layer (bidirectional) LSTM, as ``torch.nn.LSTMCell`` / ``torch.nn.LSTM``.

The carry of every recurrent function here is ``(h, c)``: hidden state first, cell state
second, as in torch.nn (ARCHITECTURE.md rule 3). One step of the cell, with ``sigma`` the logistic
sigmoid and ``*`` the elementwise product, gates in torch's order ``i, f, g, o``::

    gates      = x W_ih^T + b_ih + h W_hh^T + b_hh          # [*, 4H]
    i, f, g, o = sigma(gates[0:H]), sigma(gates[H:2H]), tanh(gates[2H:3H]), sigma(gates[3H:4H])
    c'         = f * c + i * g
    h'         = o * tanh(c')

:func:`lstm` is :func:`psgfunc.scan` of that step over time, once per layer and direction.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F

from psgfunc._dispatch import no_autograd
from psgfunc._rules import dispatchable
from psgfunc.functional import _autocast
from psgfunc.functional.embedding import _values
from psgfunc.functional.linear import _uniform
from psgfunc.scan import scan

__all__ = ["lstm_cell", "lstm", "init_lstm_cell", "init_lstm"]

Carry = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------- cell


def _step(w_hh: torch.Tensor, carry: Carry, x_gates: torch.Tensor) -> tuple[Carry, torch.Tensor]:
    """One LSTM step given the input part of the gates (``x W_ih^T + b_ih (+ b_hh)``)."""
    h, c = carry
    if h.dim() == 2:
        gates = torch.addmm(x_gates, h, w_hh.t())
    else:
        gates = x_gates + _autocast.linear(h, w_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h, c), h


@dispatchable
def lstm_cell(
    params: dict[str, torch.Tensor], carry: Carry | None, x: torch.Tensor
) -> tuple[Carry, torch.Tensor]:
    """One LSTM step, as ``torch.nn.LSTMCell``, in scan-body form ``(carry, x) -> (carry, h)``.

    Shapes: one example ``[D] -> [H]``, a batch ``[B, D] -> [B, H]``; ``h`` and ``c`` are
    ``[H]`` / ``[B, H]`` to match ``x``.

    Math (gates in torch's order ``i, f, g, o``; ``sigma`` is the logistic sigmoid)::

        gates = x W_ih^T + b_ih + h W_hh^T + b_hh
        i, f, g, o = sigma(.), sigma(.), tanh(.), sigma(.)    # the 4 chunks of gates
        c' = f * c + i * g
        h' = o * tanh(c')

    So ``scan(partial(lstm_cell, params), (h0, c0), xs)`` runs an LSTM over ``xs`` [T, ...].

    Args:
        params: ``{"weight_ih": [4H, D], "weight_hh": [4H, H], "bias_ih": [4H],
            "bias_hh": [4H]}`` (nn.LSTMCell's names); either bias may be absent or None.
        carry: ``(h, c)``, or None for zeros (as ``nn.LSTMCell(x, None)``).
        x: the input ``[D]`` or ``[B, D]``.

    Returns:
        ``((h', c'), h')``: the new carry and, as the step's output, the new hidden state.

    Raises:
        ValueError: if ``x`` is not 1-D/2-D, its last size is not ``D``, or ``h``/``c`` are
            not shaped ``x.shape[:-1] + (H,)``.
    """
    w_ih, w_hh = params["weight_ih"], params["weight_hh"]
    hidden, in_size = _cell_sizes(w_ih, w_hh, "weight_ih", "weight_hh", "lstm_cell")
    if x.dim() not in (1, 2):
        raise ValueError(
            f"lstm_cell: x must be [D] (one example) or [B, D] (a batch), got shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[-1] != in_size:
        raise ValueError(
            f"lstm_cell: x has {x.shape[-1]} features in its last dim but weight_ih expects "
            f"D={in_size} (weight_ih is [4H, D] = {tuple(w_ih.shape)})"
        )
    want = (*x.shape[:-1], hidden)
    if carry is None:
        carry = (x.new_zeros(want), x.new_zeros(want))
    else:
        if not isinstance(carry, (tuple, list)) or len(carry) != 2:
            raise ValueError("lstm_cell: carry must be a pair (h, c) of tensors or None")
        for name, t in zip(("h", "c"), carry):
            if tuple(t.shape) != want:
                raise ValueError(
                    f"lstm_cell: carry {name} has shape {tuple(t.shape)} but x of shape "
                    f"{tuple(x.shape)} needs {want} (x.shape[:-1] + (H,))"
                )
    b_ih, b_hh = params.get("bias_ih"), params.get("bias_hh")
    x_gates = _autocast.linear(x, w_ih, b_ih)
    if b_hh is not None:
        x_gates = x_gates + b_hh
    return _step(w_hh, (carry[0], carry[1]), x_gates)


def init_lstm_cell(
    input_size: int,
    hidden_size: int,
    bias: bool = True,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`lstm_cell` with ``torch.nn.LSTMCell``'s default initialisation.

    Every tensor is drawn from ``U(-1/sqrt(H), 1/sqrt(H))`` in nn.LSTMCell's parameter
    order, so with ``generator=None`` and the same ``torch.manual_seed`` the values equal
    a fresh ``nn.LSTMCell(input_size, hidden_size, bias)``'s.

    Returns:
        ``{"weight_ih": [4H, D], "weight_hh": [4H, H], "bias_ih": [4H], "bias_hh": [4H]}``
        (no bias keys when ``bias=False``).
    """
    _check_sizes(input_size, hidden_size, 1, "init_lstm_cell")
    return _init_block(input_size, hidden_size, bias, "", dtype, device, generator)


# --------------------------------------------------------------------------------------- LSTM


@dispatchable
def lstm(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    state: Carry | None = None,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    lengths: Any = None,
) -> tuple[torch.Tensor, Carry]:
    """Multi-layer, optionally bidirectional LSTM, as ``torch.nn.LSTM``.

    Shapes (``P = 2`` if bidirectional else 1, ``L = num_layers``):

    - batch: ``[T, B, D] -> out [T, B, P*H]`` (``[B, T, D] -> [B, T, P*H]`` with
      ``batch_first``), ``h_n, c_n: [L*P, B, H]``;
    - one example: ``[T, D] -> out [T, P*H]``, ``h_n, c_n: [L*P, H]`` (``batch_first`` is
      then ignored, as in torch); this is the form a per-example loss sees under ``vmap``.

    Each layer and direction is :func:`psgfunc.scan` of the :func:`lstm_cell` step (see the
    module docstring for the math) with carry ``(h, c)``. The input projection
    ``x W_ih^T + b_ih + b_hh`` is computed once for all ``T`` steps before the loop, so the
    recurrence only computes ``h W_hh^T``. Outside ``torch.func`` transforms and forward-mode
    AD, the same loop runs as one ``autograd.Function`` per layer and direction whose
    backward is backpropagation through time written out (:func:`direction_backward`): the
    same values, a fraction of the autograd overhead; a double backward recomputes it as a
    differentiable scan. Under ``vmap``/``grad``/``jvp`` it is the scan itself. Layer
    ``l > 0`` reads the concatenation ``[forward, reverse]`` of layer ``l - 1``'s outputs;
    ``h_n[l * P + d]`` is the final state of layer ``l``, direction ``d`` (0 forward, 1
    reverse).

    Args:
        params: nn.LSTM's parameter names: for each layer ``k`` and suffix ``s`` in
            ``("",)`` or ``("", "_reverse")``: ``weight_ih_l{k}{s}`` ``[4H, D_k]`` (``D_0 = D``,
            ``D_k = P*H``), ``weight_hh_l{k}{s}`` ``[4H, H]``, and optionally
            ``bias_ih_l{k}{s}``, ``bias_hh_l{k}{s}`` ``[4H]``. So
            ``dict(nn.LSTM(...).named_parameters())`` works. ``proj_size`` is not supported.
        x: ``[T, B, D]``, ``[B, T, D]`` (batch_first) or ``[T, D]`` (one example).
        state: ``(h0, c0)``, each ``[L*P, B, H]`` (``[L*P, H]`` for one example), or None
            for zeros.
        num_layers: ``L``; must match the layers present in ``params``.
        bidirectional: run a reverse direction too; must match ``params``' ``_reverse`` keys.
        batch_first: ``x`` and ``out`` are ``[B, T, ...]`` (``h_n``/``c_n`` are not affected).
        dropout: probability in ``[0, 1)`` of zeroing an element of each layer's output
            before it enters the next layer; never after the last layer, never inside
            the recurrence, and only when ``training``. With the same ``torch.manual_seed``
            it draws the same masks as nn.LSTM in train mode on CPU (unpacked input).
            Under ``vmap`` it needs ``randomness="different"`` (or ``"same"``).
        training: apply ``dropout`` (like ``module.train()``); False is nn.LSTM in eval.
        lengths: valid length of each sequence: ``[B]`` integer tensor (or list of ints) for
            a batch, a Python int or 0-dim integer tensor for one example; ``0 <= length
            <= T``. Positions ``t >= length`` are padding: they do not update ``(h, c)``,
            their outputs are exactly zero and they get no gradient, and the reverse
            direction starts at each sequence's own last valid step; this equals nn.LSTM on
            ``pack_padded_sequence(x, lengths, enforce_sorted=False)`` followed by
            ``pad_packed_sequence(..., total_length=T)``. ``h_n``/``c_n`` are the states at
            each sequence's last valid step (``h0``/``c0`` for a length of 0, which
            pack_padded_sequence refuses). A length outside ``[0, T]`` raises, under
            ``vmap`` too (the batch's values are read beneath the transform); inside a
            ``torch.compile`` graph, which cannot raise on values, it makes that
            sequence's outputs NaN (``compiled_clipped_grad_sum`` then reruns the call
            eagerly, which raises).

    Returns:
        ``(out, (h_n, c_n))`` as nn.LSTM: ``out`` is the last layer's hidden state at every
        step (``[forward, reverse]`` concatenated on the last dim); ``h_n``/``c_n`` are the
        final states of every layer and direction. Dtype and device follow ``x``.

    Raises:
        ValueError: on ``x`` not 2-D/3-D, a feature size other than ``D``, a ``state``
            shape or dtype mismatch, ``lengths`` of the wrong shape/dtype or out of
            ``[0, T]``, ``dropout`` outside ``[0, 1)``, or ``params`` whose keys or shapes
            do not match ``num_layers``/``bidirectional``.
    """
    return _lstm(params, x, state, num_layers, bidirectional, batch_first, dropout, training, lengths)


def _lstm(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    state: Carry | None,
    num_layers: int,
    bidirectional: bool,
    batch_first: bool,
    dropout: float,
    training: bool,
    lengths: Any,
    direction: Any = None,
) -> tuple[torch.Tensor, Carry]:
    """:func:`lstm`; ``direction(sfx, layer_in, x_gates, init, run)``, if given, runs each
    layer and direction instead of ``run(x_gates) -> ((h, c), out)`` (the output tap of the
    compiled fast-clipping route adds to ``x_gates`` and keeps what its pieces need)."""
    num_dir, hidden, _ = _check_lstm_args(params, x, num_layers, bidirectional, dropout)
    batched = x.dim() == 3
    if batched:
        x = x.transpose(0, 1) if batch_first else x
    else:
        x = x.unsqueeze(1)
    steps, batch = x.shape[0], x.shape[1]

    h0, c0 = _initial_state(state, x, num_layers * num_dir, batch, hidden, batched)
    mask = _mask(lengths, steps, batch, batched, x.device)

    # Outside any torch.func transform, each layer/direction runs as one autograd.Function
    # with a hand-written backward (same values, far fewer autograd nodes); under vmap/grad
    # it is the scan of the step, which every transform understands.
    fused = not _in_functorch()
    mask_bt = None if mask is None or not fused else mask.transpose(0, 1)
    layer_in = x
    h_n: list[torch.Tensor] = []
    c_n: list[torch.Tensor] = []
    for layer in range(num_layers):
        outs = []
        for d in range(num_dir):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = params["weight_ih" + sfx], params["weight_hh" + sfx]
            b_ih, b_hh = params.get("bias_ih" + sfx), params.get("bias_hh" + sfx)
            bias = b_ih if b_hh is None else (b_hh if b_ih is None else b_ih + b_hh)
            x_gates = _autocast.linear(layer_in, w_ih, bias)  # [T, B, 4H], hoisted out of the loop
            k = layer * num_dir + d
            init = (h0[k], c0[k]) if h0 is not None else (x.new_zeros(batch, hidden),) * 2
            # autocast: x_gates is in its dtype; so are the recurrence and its state, as in nn.LSTM
            dtype = _autocast.autocast_dtype(x)
            if dtype is not None:
                w_hh, init = _autocast.cast(w_hh, dtype), tuple(_autocast.cast(t, dtype) for t in init)

            def run(xg: torch.Tensor, w_hh=w_hh, init=init, reverse=bool(d)) -> tuple[Carry, torch.Tensor]:
                if fused:
                    out, h, c = _FusedDirection.apply(xg.transpose(0, 1), init[0], init[1], w_hh, mask_bt, reverse)
                    return (h, c), out.transpose(0, 1)  # [T, B, H], contiguous (time-major storage)
                return _scan_direction(w_hh, xg, init, mask, reverse)

            (h, c), out = run(x_gates) if direction is None else direction(sfx, layer_in, x_gates, init, run)
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_in = outs[0] if num_dir == 1 else torch.cat(outs, dim=-1)
        if training and dropout > 0 and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, training=True)

    out, hn, cn = layer_in, torch.stack(h_n), torch.stack(c_n)
    poison = _poison(lengths, steps, out)
    if poison is not None:  # (traced: a length outside [0, T] makes its example NaN)
        out, hn, cn = out + poison, hn + poison, cn + poison
    if not batched:
        return out.squeeze(1), (hn.squeeze(1), cn.squeeze(1))
    return (out.transpose(0, 1) if batch_first else out), (hn, cn)


def _check_lstm_args(
    params: dict[str, torch.Tensor], x: Any, num_layers: Any, bidirectional: bool, dropout: Any
) -> tuple[int, int, int]:
    """Validate :func:`lstm`'s options and ``x`` (``[T, B, D]``/``[B, T, D]``/``[T, D]``).

    Shared with the expanded rule, which passes the shared (unexpanded) params.

    Returns:
        ``(num_dir, hidden_size, input_size)``.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"lstm: num_layers must be an int >= 1, got {num_layers!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"lstm: dropout must be a number in [0, 1), got {dropout!r}")
    num_dir = 2 if bidirectional else 1
    hidden, in_size = _lstm_sizes(params, num_layers, num_dir)
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"lstm: x must be [T, B, D] ([B, T, D] with batch_first) or [T, D] for one "
            f"example, got {shape}"
        )
    if x.shape[-1] != in_size:
        raise ValueError(
            f"lstm: x has {x.shape[-1]} features in its last dim but weight_ih_l0 expects "
            f"input_size D={in_size}; x must be [..., {in_size}]"
        )
    return num_dir, hidden, in_size


def init_lstm(
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bias: bool = True,
    bidirectional: bool = False,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`lstm` with ``torch.nn.LSTM``'s names, key order and initialisation.

    Every tensor is drawn from ``U(-1/sqrt(H), 1/sqrt(H))``, in nn.LSTM's
    ``named_parameters()`` order (layer by layer, forward then reverse, each
    ``weight_ih, weight_hh, bias_ih, bias_hh``), which is also the dict's key order. So
    with ``generator=None`` and the same ``torch.manual_seed`` the values equal a fresh
    ``nn.LSTM(input_size, hidden_size, num_layers, bias, bidirectional=...)``'s.

    Returns:
        ``{"weight_ih_l0": [4H, D], "weight_hh_l0": [4H, H], "bias_ih_l0": [4H],
        "bias_hh_l0": [4H], ..., "bias_hh_l{L-1}_reverse": [4H]}``; layers ``k > 0`` take
        ``P*H`` inputs; no bias keys when ``bias=False``.
    """
    _check_sizes(input_size, hidden_size, num_layers, "init_lstm")
    num_dir = 2 if bidirectional else 1
    params: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        layer_in = input_size if layer == 0 else hidden_size * num_dir
        for d in range(num_dir):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            params.update(_init_block(layer_in, hidden_size, bias, sfx, dtype, device, generator))
    return params


# ------------------------------------------------------- one layer and direction, two ways


def _scan_direction(
    w_hh: torch.Tensor,
    x_gates: torch.Tensor,
    init: Carry,
    mask: torch.Tensor | None,
    reverse: bool,
) -> tuple[Carry, torch.Tensor]:
    """``scan`` of the step over ``x_gates`` ``[T, B, 4H]`` (``mask`` ``[T, B, 1]`` bool)."""
    if mask is None:
        return scan(lambda carry, xg: _step(w_hh, carry, xg), init, x_gates, reverse=reverse)

    def masked(carry: Carry, inp: tuple[torch.Tensor, torch.Tensor]) -> Any:
        xg, valid = inp
        (h, c), _ = _step(w_hh, carry, xg)
        h_new = torch.where(valid, h, carry[0])
        c_new = torch.where(valid, c, carry[1])
        return (h_new, c_new), torch.where(valid, h, torch.zeros_like(h))

    return scan(masked, init, (x_gates, mask), reverse=reverse)


def _in_functorch() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) or a forward-mode AD level
    (``torch.autograd.forward_ad``) is active: then the layer runs as a plain scan."""
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is not None and functorch.peek_interpreter_stack() is not None:
        return True
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def _bt_buffer(like: torch.Tensor, batch: int, steps: int, size: int, time_major: bool) -> torch.Tensor:
    """An uninitialised ``[B, T, size]`` tensor, stored time-major (``[T, B, size]``) or not."""
    if time_major:
        return like.new_empty(steps, batch, size).transpose(0, 1)
    return like.new_empty(batch, steps, size)


def _carries(all_: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``all_ [B, T+1, H]`` (the initial carry at ``0``, or at ``T`` when ``reverse``) ->
    ``(previous, after)``, both ``[B, T, H]`` views: the carry each step started from and
    the carry it left."""
    steps = all_.shape[1] - 1
    first, rest = all_[:, :steps], all_[:, 1:]
    return (rest, first) if reverse else (first, rest)


def direction_forward(
    x_gates: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    mask: torch.Tensor | None,
    reverse: bool,
    time_major: bool,
    bias: torch.Tensor | None = None,
    w_ih: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """One layer and direction of the LSTM over a batch, without autograd.

    The loop does one in-place ``addmm`` and seven small elementwise ops per step (with a
    mask, two more) and writes every intermediate the backward needs into preallocated
    ``[B, T, *]`` buffers whose per-step views are made up front, outside the loop; it runs
    in inference mode (:func:`psgfunc._dispatch.no_autograd`). Both ``tanh`` are computed
    as such: the sigmoid identities ``tanh(z) = 2 sigma(2 z) - 1`` (and ``1 - 2 sigma(-2
    c)``), cheaper ops, err by the roundoff of values near 1, not relatively to ``tanh``:
    where the pre-activations and cell states are small they gave outputs and gradients
    off by 1e-3 of their size in float32 (inputs of 1e-4, zero biases; nn.LSTM: 1e-7) and
    3e-8 in float64 (inputs of 1e-8). The g gate's ``tanh`` reads a contiguous copy of its
    slice: on a strided slice torch's CPU ``tanh`` is about four times slower.

    Args:
        x_gates: ``[B, T, 4H]``, ``x W_ih^T`` plus both biases, any strides.
        h0, c0: ``[B, H]``.
        w_hh: ``[4H, H]``.
        mask: ``[B, T, 1]`` bool, True at valid steps, or None (all valid).
        reverse: run from ``t = T - 1`` down to 0.
        time_major: store the buffers as ``[T, B, *]`` (then the returned ``[B, T, *]``
            views have contiguous per-step slices and transpose to contiguous time-major).
            Per-step slices with a row stride are slow for some ops, so the loops are meant
            to run with ``time_major=True``.
        bias: ``[4H]`` added to ``x_gates`` (e.g. ``b_hh``), or None.
        w_ih: ``[4H, D]``, or None. If given, ``x_gates`` is the layer's input ``x [B, T,
            D]`` and the input part of the pre-activations, ``x W_ih^T + bias``, is one
            matmul over all ``B * T`` rows, written straight into the loop's buffer.

    Returns:
        ``(out [B, T, H], h_n [B, H], c_n [B, H], saved)``; ``out`` is zero at masked steps,
        where the carry is held; ``saved`` is for :func:`direction_backward`: ``(act [B, T,
        4H], tanh_c [B, T, H], h_all, c_all [B, T+1, H])``, the gates (``i, f, o`` after
        the sigmoid, ``g`` after the tanh), ``tanh`` of each step's new cell state, and the
        carries with the initial one at index 0 (``T`` when ``reverse``; see
        :func:`_carries`).
    """
    batch, steps = x_gates.shape[:2]
    gates4, hidden = w_hh.shape
    sl_g = slice(2 * hidden, 3 * hidden)
    # [H, 4H] contiguous, not a transposed view: the step's small addmm ran ~10% faster
    w_t = w_hh.t().contiguous()
    # act holds the input part of the pre-activations, then (in place, step by step) the
    # pre-activations and the gates
    act = _bt_buffer(x_gates, batch, steps, gates4, time_major)
    if w_ih is not None:
        if time_major:  # [T*B, D] @ [D, 4H] into the time-major buffer
            x_tm = x_gates.transpose(0, 1).reshape(steps * batch, w_ih.shape[1])
            flat = act.transpose(0, 1).view(steps * batch, gates4)
            torch.mm(x_tm, w_ih.t(), out=flat) if bias is None else torch.addmm(bias, x_tm, w_ih.t(), out=flat)
        else:
            act.copy_(F.linear(x_gates, w_ih, bias))
    elif bias is None:
        act.copy_(x_gates)
    else:
        torch.add(x_gates, bias, out=act)
    tanh_g = _bt_buffer(x_gates, batch, steps, hidden, time_major)  # into act's g slice at the end
    tanh_c = _bt_buffer(x_gates, batch, steps, hidden, time_major)
    h_all = _bt_buffer(x_gates, batch, steps + 1, hidden, time_major)
    c_all = _bt_buffer(x_gates, batch, steps + 1, hidden, time_major)
    first = steps if reverse else 0
    h_all[:, first] = h0
    c_all[:, first] = c0
    _, h_after = _carries(h_all, reverse)
    _, c_after = _carries(c_all, reverse)
    a_t, z_g_t, g_t = act.unbind(1), act[..., sl_g].unbind(1), tanh_g.unbind(1)
    i_t, f_t = act[..., :hidden].unbind(1), act[..., hidden : 2 * hidden].unbind(1)
    o_t = act[..., 3 * hidden :].unbind(1)
    tc_t, h_t, c_t = tanh_c.unbind(1), h_after.unbind(1), c_after.unbind(1)
    m_t = None if mask is None else mask.unbind(1)
    h, c = h0, c_all[:, first]
    addcmul, mul, tanh = torch.addcmul, torch.mul, torch.tanh
    with no_autograd():  # every step's results go into the buffers above (out= or in place)
        for t in range(steps - 1, -1, -1) if reverse else range(steps):
            a = a_t[t].addmm_(h, w_t)
            g = g_t[t].copy_(z_g_t[t]).tanh_()  # (tanh of a strided slice is ~4x slower)
            a.sigmoid_()  # i, f, o (and g's slice, overwritten by tanh_g after the loop)
            if m_t is None:
                c = mul(f_t[t], c, out=c_t[t]).addcmul_(i_t[t], g)
                h = mul(o_t[t], tanh(c, out=tc_t[t]), out=h_t[t])
            else:
                valid = m_t[t]
                c_new = addcmul(f_t[t] * c, i_t[t], g)
                h = torch.where(valid, o_t[t] * tanh(c_new, out=tc_t[t]), h, out=h_t[t])
                c = torch.where(valid, c_new, c, out=c_t[t])
    act[..., sl_g] = tanh_g
    last = 0 if reverse else steps
    out = h_after if mask is None else h_after.masked_fill(~mask, 0)
    return out, h_all[:, last].clone(), c_all[:, last].clone(), (act, tanh_c, h_all, c_all)


def direction_backward(
    saved: tuple[torch.Tensor, ...],
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    mask: torch.Tensor | None,
    reverse: bool,
    time_major: bool,
    d_out: torch.Tensor | None,
    d_hn: torch.Tensor | None,
    d_cn: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backpropagation through time for :func:`direction_forward`, without autograd.

    With ``(i, f, g, o) = (sigma(z_i), sigma(z_f), tanh(z_g), sigma(z_o))``,
    ``c' = f c + i g`` and ``h' = o tanh(c')``, each step (the latest first) does::

        dc     = dc' + dh' * o * (1 - tanh(c')^2)
        dz     = (dc * g * i(1-i),  dc * c * f(1-f),  dc * i * (1-g^2),  dh' * tanh(c') * o(1-o))
        dh, dc = dz W_hh,  dc * f

    where the factors not involving ``dh'``/``dc`` are computed for all steps at once
    beforehand. At masked steps ``dz`` is exactly zero and ``dh``/``dc`` pass through.

    Returns:
        ``(dz [B, T, 4H], h_prev [B, T, H], dh0 [B, H], dc0 [B, H])``: ``dz`` is the gradient
        of the gate pre-activations (so of ``x_gates``; a bias gets ``dz`` summed over
        steps), and the gradient of ``W_hh`` is ``sum_t dz_t^T h_prev_t`` (per example, or
        summed over the batch too); ``h_prev`` is a view of the saved carries.
    """
    act, tanh_c, h_all, c_all = saved
    batch, steps, gates4 = act.shape
    hidden = gates4 // 4
    dh = torch.zeros_like(h0) if d_hn is None else d_hn
    dc = torch.zeros_like(c0) if d_cn is None else d_cn
    dz = _bt_buffer(act, batch, steps, gates4, time_major)
    h_prev, _ = _carries(h_all, reverse)
    if steps == 0:
        return dz, h_prev, dh, dc
    c_prev, _ = _carries(c_all, reverse)
    sl_i, sl_f = slice(0, hidden), slice(hidden, 2 * hidden)
    sl_g, sl_o = slice(2 * hidden, 3 * hidden), slice(3 * hidden, gates4)
    i, g, o = act[..., sl_i], act[..., sl_g], act[..., sl_o]
    # p: dz / d(dc) for i, f, g and dz / d(dh') for o;  k: d(c') / d(h') through h' = o tanh(c')
    one = act.new_tensor(1.0)
    p = torch.addcmul(act, act, act, value=-1)  # a (1 - a): sigma' for i, f, o
    torch.addcmul(one, g, g, value=-1, out=p[..., sl_g])  # tanh' for g
    p[..., sl_i].mul_(g)
    p[..., sl_f].mul_(c_prev)
    p[..., sl_g].mul_(i)
    p[..., sl_o].mul_(tanh_c)
    k = torch.addcmul(one, tanh_c, tanh_c, value=-1).mul_(o)
    if d_out is None:
        d_out = torch.zeros_like(tanh_c)
    keep_t = hold_t = None
    if mask is not None:
        p = p.masked_fill(~mask, 0)
        keep = mask.to(act.dtype)
        d_out = d_out * keep
        keep_t, hold_t = keep.unsqueeze(2).unbind(1), (1 - keep).unsqueeze(2).unbind(1)
    order = list(range(steps) if reverse else range(steps - 1, -1, -1))
    f_t, dout_t = act[..., sl_f].unsqueeze(2).unbind(1), d_out.unbind(1)
    if keep_t is None:
        # q = [dc, dc, dc, dh'] of the step being processed ([B, 4, H], also seen as [B, 4H]),
        # so that dz = p * q is one op; addmm writes dh' into q's last row, addcmul dc into
        # the first three (broadcast), and dcf = dc * f is what the earlier step adds up
        q = act.new_empty(batch, 4, hidden)
        q2, q3, q0, qh, qh3 = q.view(batch, gates4), q[:, :3], q[:, :1], q[:, 3], q[:, 3:]
        p_t, dz_t = p.unbind(1), dz.unbind(1)
        k3_t = k.unsqueeze(2).expand(batch, steps, 3, hidden).unbind(1)  # (out= does not broadcast)
        torch.add(dh, dout_t[order[0]], out=qh)
        dcf = dc.unsqueeze(1)
        addcmul, mul, addmm = torch.addcmul, torch.mul, torch.addmm
        with no_autograd():  # dcf is the only tensor the loop makes, and it stays inside
            for t, t_next in zip(order, order[1:]):
                addcmul(dcf, qh3, k3_t[t], out=q3)
                mul(p_t[t], q2, out=dz_t[t])
                dcf = q0 * f_t[t]
                addmm(dout_t[t_next], dz_t[t], w_hh, out=qh)
            t = order[-1]
            addcmul(dcf, qh3, k3_t[t], out=q3)
            mul(p_t[t], q2, out=dz_t[t])
        return dz, h_prev, torch.mm(dz_t[t], w_hh), (q0 * f_t[t]).squeeze(1)
    # [B, 1, H] views, so dc broadcasts over the i, f, g rows of dz [B, 3, H]
    p4 = p.unflatten(-1, (4, hidden))
    dz4 = dz.unflatten(-1, (4, hidden))
    p3_t, po_t = p4[:, :, :3].unbind(1), p4[:, :, 3:].unbind(1)
    dz_t, dz3_t, dzo_t = dz.unbind(1), dz4[:, :, :3].unbind(1), dz4[:, :, 3:].unbind(1)
    k_t = k.unsqueeze(2).unbind(1)
    dh3 = act.new_empty(batch, 1, hidden)  # dh' of the step being processed
    dc = dc.unsqueeze(1)
    dh = dh.unsqueeze(1)
    for t in order:
        torch.addcmul(dout_t[t].unsqueeze(1), dh, keep_t[t], out=dh3)
        dc_tot = torch.addcmul(dc * keep_t[t], dh3, k_t[t])
        torch.mul(p3_t[t], dc_tot, out=dz3_t[t])
        torch.mul(po_t[t], dh3, out=dzo_t[t])
        dh = torch.mm(dz_t[t], w_hh).unsqueeze(1).addcmul_(dh, hold_t[t])
        dc = (dc_tot * f_t[t]).addcmul_(dc, hold_t[t])
    return dz, h_prev, dh.squeeze(1), dc.squeeze(1)


class _FusedDirection(torch.autograd.Function):
    """One layer/direction with a hand-written BPTT backward (ordinary autograd only).

    ``(x_gates [B, T, 4H], h0 [B, H], c0 [B, H], w_hh [4H, H], mask, reverse) ->
    (out [B, T, H], h_n, c_n)``; buffers are stored time-major. A double backward
    (``create_graph=True``) recomputes the direction as a differentiable scan.
    """

    @staticmethod
    def forward(ctx: Any, x_gates, h0, c0, w_hh, mask, reverse):  # type: ignore[override]
        out, h_n, c_n, saved = direction_forward(x_gates, h0, c0, w_hh, mask, reverse, True)
        ctx.save_for_backward(x_gates, h0, c0, w_hh, *saved)
        ctx.mask, ctx.reverse = mask, reverse
        return out, h_n, c_n

    @staticmethod
    def backward(ctx: Any, d_out, d_hn, d_cn):  # type: ignore[override]
        x_gates, h0, c0, w_hh, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable recomputation
            return _recompute_grads(ctx, x_gates, h0, c0, w_hh, d_out, d_hn, d_cn) + (None, None)
        dz, h_prev, dh0, dc0 = direction_backward(
            tuple(saved), h0, c0, w_hh, ctx.mask, ctx.reverse, True, d_out, d_hn, d_cn
        )
        d_w = None
        if need[3]:
            gates4, hidden = w_hh.shape
            d_w = dz.transpose(0, 1).reshape(-1, gates4).t() @ h_prev.transpose(0, 1).reshape(-1, hidden)
        return (
            dz if need[0] else None,
            dh0 if need[1] else None,
            dc0 if need[2] else None,
            d_w,
            None,
            None,
        )


def _recompute_grads(ctx, x_gates, h0, c0, w_hh, d_out, d_hn, d_cn) -> tuple[Any, ...]:
    """Gradients of :class:`_FusedDirection` via a differentiable scan (for double backward)."""
    mask = ctx.mask
    inputs = (x_gates, h0, c0, w_hh)
    with torch.enable_grad():
        (h, c), out = _scan_direction(
            w_hh, x_gates.transpose(0, 1), (h0, c0),
            None if mask is None else mask.transpose(0, 1), ctx.reverse,
        )
        wanted = [k for k in range(4) if ctx.needs_input_grad[k]]
        grads = torch.autograd.grad(
            (out.transpose(0, 1), h, c), [inputs[k] for k in wanted], (d_out, d_hn, d_cn),
            create_graph=True, allow_unused=True,
        )
    result: list[Any] = [None] * 4
    for k, g in zip(wanted, grads):
        result[k] = torch.zeros_like(inputs[k]) if g is None else g
    return tuple(result)


# ------------------------------------------------------------------------------------ helpers


_KEY = re.compile(r"^(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?$")


def _cell_sizes(
    w_ih: torch.Tensor, w_hh: torch.Tensor, ih_name: str, hh_name: str, fn: str
) -> tuple[int, int]:
    """``(H, D)`` from ``weight_ih`` [4H, D] and ``weight_hh`` [4H, H], checking both."""
    if w_hh.dim() != 2 or w_hh.shape[0] != 4 * w_hh.shape[1]:
        raise ValueError(f"{fn}: {hh_name} must be [4H, H], got {tuple(w_hh.shape)}")
    hidden = w_hh.shape[1]
    if w_ih.dim() != 2 or w_ih.shape[0] != 4 * hidden:
        raise ValueError(
            f"{fn}: {ih_name} must be [4H, D] = [{4 * hidden}, D] (H={hidden} from {hh_name}), "
            f"got {tuple(w_ih.shape)}"
        )
    return hidden, w_ih.shape[1]


def _lstm_sizes(params: dict[str, torch.Tensor], num_layers: int, num_dir: int) -> tuple[int, int]:
    """Check ``params`` against ``num_layers``/``num_dir``; return ``(H, D)``."""
    expected = set()
    for layer in range(num_layers):
        for d in range(num_dir):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            expected.update(n + sfx for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    extra = [k for k in params if k not in expected]
    if extra:
        hint = ""
        if any("_hr_" in k for k in extra):
            hint = " (weight_hr_* comes from proj_size > 0, which lstm does not support)"
        elif any(k.endswith("_reverse") for k in extra) and num_dir == 1:
            hint = " (params are bidirectional: pass bidirectional=True)"
        elif any(_KEY.match(k) and int(_KEY.match(k).group(3)) >= num_layers for k in extra):
            hint = f" (params have more than num_layers={num_layers} layers)"
        raise ValueError(
            f"lstm: unexpected params keys {sorted(extra)}{hint}; pass exactly the "
            f"named_parameters() of nn.LSTM(..., num_layers={num_layers}, "
            f"bidirectional={num_dir == 2})"
        )
    missing = [
        k for k in sorted(expected) if k.startswith("weight") and params.get(k) is None
    ]
    if missing:
        raise ValueError(
            f"lstm: params lack {missing} needed for num_layers={num_layers}, "
            f"bidirectional={num_dir == 2}; check both against the params"
        )
    hidden, in_size = _cell_sizes(
        params["weight_ih_l0"], params["weight_hh_l0"], "weight_ih_l0", "weight_hh_l0", "lstm"
    )
    for layer in range(num_layers):
        for d in range(num_dir):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            h, d_in = _cell_sizes(
                params["weight_ih" + sfx], params["weight_hh" + sfx],
                "weight_ih" + sfx, "weight_hh" + sfx, "lstm",
            )
            want_in = in_size if layer == 0 else num_dir * hidden
            if h != hidden or d_in != want_in:
                raise ValueError(
                    f"lstm: weight_ih{sfx} is {tuple(params['weight_ih' + sfx].shape)} and "
                    f"weight_hh{sfx} {tuple(params['weight_hh' + sfx].shape)}, but H={hidden} "
                    f"and this layer's input size is {want_in}: expected [{4 * hidden}, "
                    f"{want_in}] and [{4 * hidden}, {hidden}]"
                )
            for b in ("bias_ih" + sfx, "bias_hh" + sfx):
                t = params.get(b)
                if t is not None and tuple(t.shape) != (4 * hidden,):
                    raise ValueError(f"lstm: {b} must be [{4 * hidden}], got {tuple(t.shape)}")
    return hidden, in_size


def _initial_state(
    state: Any, x: torch.Tensor, n_states: int, batch: int, hidden: int, batched: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(h0, c0)`` as ``[L*P, B, H]`` tensors (None for zeros), checked."""
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError("lstm: state must be a pair (h0, c0) of tensors or None")
    want = (n_states, batch, hidden) if batched else (n_states, hidden)
    out = []
    for name, t in zip(("h0", "c0"), state):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            what = "[L*P, B, H]" if batched else "[L*P, H] (x is one example [T, D])"
            raise ValueError(f"lstm: state {name} must be {what} = {want}, got {got}")
        if t.dtype != x.dtype:
            raise ValueError(
                f"lstm: state {name} has dtype {t.dtype} but x has {x.dtype}; cast one of them"
            )
        out.append(t if batched else t.unsqueeze(1))
    return out[0], out[1]


def _mask(
    lengths: Any, steps: int, batch: int, batched: bool, device: torch.device
) -> torch.Tensor | None:
    """``[T, B, 1]`` bool, True where ``t < lengths[b]``; None when ``lengths`` is None."""
    if lengths is None:
        return None
    if torch.compiler.is_compiling() and isinstance(lengths, torch.Tensor) \
            and not lengths.dtype.is_floating_point and not lengths.dtype.is_complex \
            and lengths.dtype != torch.bool and tuple(lengths.shape) == ((batch,) if batched else ()):
        # traced (the compiled route): the range check below reads values and vmap wrappers,
        # which the tracer cannot (it broke the graph, and the compiled step then failed to
        # trace lstm with lengths); the eager planning run of the same call checked the shape
        # and dtype, and the range of its first example only; _poison marks the rest
        valid = torch.arange(steps, device=device).unsqueeze(1) < lengths.to(device).reshape(1, -1)
        return valid.unsqueeze(-1)
    if isinstance(lengths, bool):
        raise ValueError(f"lstm: lengths must be integers, got {lengths!r}")
    if not isinstance(lengths, torch.Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"lstm: lengths must be a [B] integer tensor (or an int for one example), "
                f"got {type(lengths).__name__}"
            ) from None
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lstm: lengths must have an integer dtype, got {lengths.dtype}")
    want = (batch,) if batched else ()
    if tuple(lengths.shape) != want:
        what = f"[B] = [{batch}] for x of batch size {batch}" if batched else (
            "a Python int or a 0-dim tensor for one example [T, D]"
        )
        raise ValueError(f"lstm: lengths must be {what}, got shape {tuple(lengths.shape)}")
    # (under vmap, per_sample_grads(method="vmap"), the values of all examples at once)
    values = _values(lengths)
    if bool((values < 0).any()) or bool((values > steps).any()):
        raise ValueError(
            f"lstm: lengths must lie in [0, T] = [0, {steps}], got "
            f"min {int(values.min())} and max {int(values.max())}"
        )
    lengths = lengths.to(device).reshape(want)
    valid = torch.arange(steps, device=device).unsqueeze(1) < lengths.reshape(1, -1)
    return valid.unsqueeze(-1)


def _poison(lengths: Any, steps: int, like: torch.Tensor) -> torch.Tensor | None:
    """While ``torch.compile`` traces: ``[1, B, 1]`` (``[1, 1, 1]`` for one example), NaN
    for a sequence whose length is outside ``[0, T]`` and 0 elsewhere, to add to the
    layer's outputs; None otherwise (eagerly :func:`_mask` raises instead).

    A graph cannot raise on values, and a mask alone would treat such a length as clamped.
    The NaN makes that example's loss and norm NaN; the compiled route then runs the call
    again eagerly (its non-finite-norm fallback), where :func:`_mask` raises the
    ValueError naming the lengths. Adding 0 changes no value and no gradient."""
    if not torch.compiler.is_compiling() or not isinstance(lengths, torch.Tensor):
        return None
    bad = (lengths < 0) | (lengths > steps)
    nan = torch.full((), math.nan, dtype=like.dtype, device=like.device)
    return torch.where(bad.to(like.device), nan, torch.zeros_like(nan)).reshape(1, -1, 1)


def _check_sizes(input_size: int, hidden_size: int, num_layers: int, fn: str) -> None:
    for name, value, low in (
        ("input_size", input_size, 0), ("hidden_size", hidden_size, 1), ("num_layers", num_layers, 1)
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{fn}: {name} must be an int >= {low}, got {value!r}")


def _init_block(
    input_size: int,
    hidden_size: int,
    bias: bool,
    sfx: str,
    dtype: torch.dtype | None,
    device: Any,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """One cell's tensors, drawn in nn.LSTM's order: weight_ih, weight_hh, bias_ih, bias_hh."""
    bound = 1.0 / math.sqrt(hidden_size)
    kw = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    shapes = {"weight_ih": (4 * hidden_size, input_size), "weight_hh": (4 * hidden_size, hidden_size)}
    if bias:
        shapes.update(bias_ih=(4 * hidden_size,), bias_hh=(4 * hidden_size,))
    return {name + sfx: _uniform(shape, bound, generator, **kw) for name, shape in shapes.items()}
