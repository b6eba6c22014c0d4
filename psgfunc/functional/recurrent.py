"""GRU and Elman RNN cells and layers, as ``torch.nn.GRU(Cell)`` / ``torch.nn.RNN(Cell)``.

The carry of these recurrences is the hidden state ``h`` alone. One GRU step, with
``sigma`` the logistic sigmoid, ``*`` the elementwise product and gates in torch's order
``r, z, n``::

    r  = sigma(x W_ir^T + b_ir + h W_hr^T + b_hr)
    z  = sigma(x W_iz^T + b_iz + h W_hz^T + b_hz)
    n  = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))
    h' = (1 - z) * n + z * h

One RNN step: ``h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)`` with ``act`` tanh or relu.

:func:`gru` and :func:`rnn` are :func:`psgfunc.scan` of that step over time, once per layer
and direction, with :func:`psgfunc.functional.lstm`'s options and conventions (layers,
directions, ``batch_first``, ``lengths`` with packed-sequence semantics, dropout between
layers).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from psgfunc._rules import dispatchable
from psgfunc.functional import _autocast
from psgfunc.functional.linear import _uniform
from psgfunc.scan import scan

__all__ = [
    "gru_cell", "gru", "rnn_cell", "rnn", "init_gru", "init_gru_cell", "init_rnn", "init_rnn_cell",
]

_NONLINEARITIES = ("tanh", "relu")


# ``psgfunc.functional.lstm`` the module (the package re-exports a function of that name)
_lstm_module = importlib.import_module("psgfunc.functional.lstm")


# --------------------------------------------------------------------------------------- steps


def step(
    kind: str, w_hh: torch.Tensor, b_hh: torch.Tensor | None, h: torch.Tensor, x_gates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step given the input part ``x_gates = x W_ih^T + b_ih`` (``[*, G*H]``).

    ``kind`` is ``"gru"``, ``"tanh"`` or ``"relu"``. Returns ``(h', r)`` where ``r`` is the
    GRU's reset gate (None for an RNN): the compiled route's tap needs it.
    """
    gh = _autocast.linear(h, w_hh, b_hh)
    if kind == "gru":
        xr, xz, xn = x_gates.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return n + z * (h - n), r
    pre = x_gates + gh
    return (torch.tanh(pre) if kind == "tanh" else torch.relu(pre)), None


def _kind(nonlinearity: Any, fn: str) -> str:
    if nonlinearity not in _NONLINEARITIES:
        raise ValueError(f"{fn}: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return nonlinearity


def _gates(kind: str) -> int:
    return 3 if kind == "gru" else 1


def _cell_sizes(
    w_ih: torch.Tensor, w_hh: torch.Tensor, ih_name: str, hh_name: str, fn: str, gates: int
) -> tuple[int, int]:
    """``(H, D)`` from ``weight_ih`` [G*H, D] and ``weight_hh`` [G*H, H], checking both."""
    g = f"{gates}H" if gates > 1 else "H"
    if not isinstance(w_hh, torch.Tensor) or w_hh.dim() != 2 or w_hh.shape[0] != gates * w_hh.shape[1]:
        shape = tuple(w_hh.shape) if isinstance(w_hh, torch.Tensor) else type(w_hh).__name__
        raise ValueError(f"{fn}: {hh_name} must be [{g}, H], got {shape}")
    hidden = w_hh.shape[1]
    if not isinstance(w_ih, torch.Tensor) or w_ih.dim() != 2 or w_ih.shape[0] != gates * hidden:
        shape = tuple(w_ih.shape) if isinstance(w_ih, torch.Tensor) else type(w_ih).__name__
        raise ValueError(
            f"{fn}: {ih_name} must be [{g}, D] = [{gates * hidden}, D] (H={hidden} from "
            f"{hh_name}), got {shape}"
        )
    return hidden, w_ih.shape[1]


def _cell(kind: str, params: dict[str, torch.Tensor], h: Any, x: Any, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    w_ih, w_hh = params["weight_ih"], params["weight_hh"]
    gates = _gates(kind)
    hidden, in_size = _cell_sizes(w_ih, w_hh, "weight_ih", "weight_hh", fn, gates)
    if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be [D] (one example) or [B, D] (a batch), got {shape}")
    if x.shape[-1] != in_size:
        raise ValueError(
            f"{fn}: x has {x.shape[-1]} features in its last dim but weight_ih expects "
            f"D={in_size} (weight_ih is {tuple(w_ih.shape)})"
        )
    want = (*x.shape[:-1], hidden)
    if h is None:
        h = x.new_zeros(want)
    elif not isinstance(h, torch.Tensor) or tuple(h.shape) != want:
        shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(
            f"{fn}: h has shape {shape} but x of shape {tuple(x.shape)} needs {want} "
            f"(x.shape[:-1] + (H,)), or pass None for zeros"
        )
    for name in ("bias_ih", "bias_hh"):
        b = params.get(name)
        if b is not None and tuple(b.shape) != (gates * hidden,):
            raise ValueError(f"{fn}: {name} must be [{gates * hidden}], got {tuple(b.shape)}")
    x_gates = _autocast.linear(x, w_ih, params.get("bias_ih"))
    h_new, _ = step(kind, w_hh, params.get("bias_hh"), h, x_gates)
    return h_new, h_new


@dispatchable
def gru_cell(
    params: dict[str, torch.Tensor], h: torch.Tensor | None, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One GRU step, as ``torch.nn.GRUCell``, in scan-body form ``(h, x) -> (h', h')``.

    Shapes: one example ``[D] -> [H]``, a batch ``[B, D] -> [B, H]``; ``h`` is ``[H]`` /
    ``[B, H]`` to match ``x``.

    Math (gates in torch's order ``r, z, n``)::

        r = sigma(x W_ir^T + b_ir + h W_hr^T + b_hr);  z = sigma(... W_iz, b_iz, W_hz, b_hz)
        n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))
        h' = (1 - z) * n + z * h

    So ``scan(partial(gru_cell, params), h0, xs)`` runs a GRU over ``xs`` [T, ...].

    Args:
        params: ``{"weight_ih": [3H, D], "weight_hh": [3H, H], "bias_ih": [3H],
            "bias_hh": [3H]}`` (nn.GRUCell's names); either bias may be absent or None.
        h: the hidden state, or None for zeros.
        x: the input ``[D]`` or ``[B, D]``.

    Returns:
        ``(h', h')``: the new carry and, as the step's output, the new hidden state.

    Raises:
        ValueError: if ``x`` is not 1-D/2-D, its last size is not ``D``, ``h`` is not shaped
            ``x.shape[:-1] + (H,)`` or a weight/bias has the wrong shape.
    """
    return _cell("gru", params, h, x, "gru_cell")


@dispatchable
def rnn_cell(
    params: dict[str, torch.Tensor], h: torch.Tensor | None, x: torch.Tensor, *,
    nonlinearity: str = "tanh",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Elman RNN step, as ``torch.nn.RNNCell``, in scan-body form ``(h, x) -> (h', h')``.

    Shapes: one example ``[D] -> [H]``, a batch ``[B, D] -> [B, H]``.

    Math: ``h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)``, ``act`` = tanh or relu.

    Args:
        params: ``{"weight_ih": [H, D], "weight_hh": [H, H], "bias_ih": [H], "bias_hh": [H]}``
            (nn.RNNCell's names); either bias may be absent or None.
        h: the hidden state ``[H]`` / ``[B, H]``, or None for zeros.
        x: the input ``[D]`` or ``[B, D]``.
        nonlinearity: ``"tanh"`` or ``"relu"``.

    Returns:
        ``(h', h')``.

    Raises:
        ValueError: as :func:`gru_cell`, or an unknown ``nonlinearity``.
    """
    return _cell(_kind(nonlinearity, "rnn_cell"), params, h, x, "rnn_cell")


# --------------------------------------------------------------------------------- layers


@dispatchable
def gru(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    lengths: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-layer, optionally bidirectional GRU, as ``torch.nn.GRU``.

    Shapes (``P = 2`` if bidirectional else 1, ``L = num_layers``):

    - batch: ``[T, B, D] -> out [T, B, P*H]`` (``[B, T, D] -> [B, T, P*H]`` with
      ``batch_first``), ``h_n: [L*P, B, H]``;
    - one example: ``[T, D] -> out [T, P*H]``, ``h_n: [L*P, H]`` (``batch_first`` is then
      ignored, as in torch).

    Each layer and direction is :func:`psgfunc.scan` of the :func:`gru_cell` step (see the
    module docstring); the input projection ``x W_ih^T + b_ih`` is computed for all steps
    before the loop. Layer ``l > 0`` reads ``[forward, reverse]`` of layer ``l - 1``'s
    outputs; ``h_n[l * P + d]`` is the final state of layer ``l``, direction ``d``.

    Args:
        params: nn.GRU's parameter names: for each layer ``k`` and suffix ``s`` in ``("",)``
            or ``("", "_reverse")``: ``weight_ih_l{k}{s}`` ``[3H, D_k]`` (``D_0 = D``,
            ``D_k = P*H``), ``weight_hh_l{k}{s}`` ``[3H, H]``, optionally ``bias_ih_l{k}{s}``
            and ``bias_hh_l{k}{s}`` ``[3H]``: ``dict(nn.GRU(...).named_parameters())``.
        x: ``[T, B, D]``, ``[B, T, D]`` (batch_first) or ``[T, D]`` (one example).
        h0: ``[L*P, B, H]`` (``[L*P, H]`` for one example), or None for zeros.
        num_layers: ``L``; must match the layers in ``params``.
        bidirectional: run a reverse direction too; must match ``params``' ``_reverse`` keys.
        batch_first: ``x`` and ``out`` are ``[B, T, ...]`` (``h_n`` is not affected).
        dropout: probability in ``[0, 1)`` of zeroing an element of each layer's output
            before the next layer (never after the last), only when ``training``.
        training: apply ``dropout``.
        lengths: valid length of each sequence, ``[B]`` integers (an int for one example),
            ``0 <= length <= T``: steps ``t >= length`` do not update ``h``, their outputs
            are zero and they get no gradient; the reverse direction starts at each
            sequence's last valid step. Equals nn.GRU on ``pack_padded_sequence(x, lengths,
            enforce_sorted=False)`` then ``pad_packed_sequence(..., total_length=T)``;
            ``h_n`` is the state at each sequence's last valid step (``h0`` for length 0).

    Returns:
        ``(out, h_n)`` as nn.GRU, dtype and device of ``x``.

    Raises:
        ValueError: on ``x`` not 2-D/3-D, a feature size other than ``D``, an ``h0`` of the
            wrong shape or dtype, bad ``lengths`` or ``dropout``, or ``params`` that do not
            match ``num_layers``/``bidirectional``.
    """
    return _layer("gru", params, x, h0, num_layers, bidirectional, batch_first, dropout, training,
                  lengths)


@dispatchable
def rnn(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    nonlinearity: str = "tanh",
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    lengths: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-layer, optionally bidirectional Elman RNN, as ``torch.nn.RNN``.

    Shapes and options as :func:`gru`; each step is ``h' = act(x W_ih^T + b_ih + h W_hh^T +
    b_hh)`` with ``act`` = ``nonlinearity`` (``"tanh"`` or ``"relu"``); weights are
    ``weight_ih_l{k}{s}`` ``[H, D_k]``, ``weight_hh_l{k}{s}`` ``[H, H]``, biases ``[H]``
    (``dict(nn.RNN(...).named_parameters())``).

    Returns:
        ``(out, h_n)`` as nn.RNN.

    Raises:
        ValueError: as :func:`gru`, or an unknown ``nonlinearity``.
    """
    kind = _kind(nonlinearity, "rnn")
    return _layer(kind, params, x, h0, num_layers, bidirectional, batch_first, dropout, training,
                  lengths)


def _name(kind: str) -> str:
    return "gru" if kind == "gru" else "rnn"


def check_layer_args(
    kind: str, params: dict[str, torch.Tensor], x: Any, num_layers: Any, bidirectional: bool,
    dropout: Any,
) -> tuple[int, int, int]:
    """Validate the options and ``x``; returns ``(num_dir, hidden_size, input_size)``."""
    fn = _name(kind)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{fn}: num_layers must be an int >= 1, got {num_layers!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{fn}: dropout must be a number in [0, 1), got {dropout!r}")
    num_dir = 2 if bidirectional else 1
    hidden, in_size = _layer_sizes(kind, params, num_layers, num_dir)
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"{fn}: x must be [T, B, D] ([B, T, D] with batch_first) or [T, D] for one "
            f"example, got {shape}"
        )
    if x.shape[-1] != in_size:
        raise ValueError(
            f"{fn}: x has {x.shape[-1]} features in its last dim but weight_ih_l0 expects "
            f"input_size D={in_size}; x must be [..., {in_size}]"
        )
    return num_dir, hidden, in_size


def _layer_sizes(kind: str, params: dict[str, torch.Tensor], num_layers: int, num_dir: int) -> tuple[int, int]:
    fn, gates = _name(kind), _gates(kind)
    expected = set()
    for layer in range(num_layers):
        for d in range(num_dir):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            expected.update(n + sfx for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    extra = [k for k in params if k not in expected]
    if extra:
        hint = ""
        if any(k.endswith("_reverse") for k in extra) and num_dir == 1:
            hint = " (params are bidirectional: pass bidirectional=True)"
        raise ValueError(
            f"{fn}: unexpected params keys {sorted(extra)}{hint}; pass exactly the "
            f"named_parameters() of nn.{fn.upper()}(..., num_layers={num_layers}, "
            f"bidirectional={num_dir == 2})"
        )
    missing = [k for k in sorted(expected) if k.startswith("weight") and params.get(k) is None]
    if missing:
        raise ValueError(
            f"{fn}: params lack {missing} needed for num_layers={num_layers}, "
            f"bidirectional={num_dir == 2}; check both against the params"
        )
    hidden, in_size = _cell_sizes(params["weight_ih_l0"], params["weight_hh_l0"], "weight_ih_l0",
                                  "weight_hh_l0", fn, gates)
    for layer in range(num_layers):
        for d in range(num_dir):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            h, d_in = _cell_sizes(params["weight_ih" + sfx], params["weight_hh" + sfx],
                                  "weight_ih" + sfx, "weight_hh" + sfx, fn, gates)
            want_in = in_size if layer == 0 else num_dir * hidden
            if h != hidden or d_in != want_in:
                raise ValueError(
                    f"{fn}: weight_ih{sfx} is {tuple(params['weight_ih' + sfx].shape)} and "
                    f"weight_hh{sfx} {tuple(params['weight_hh' + sfx].shape)}, but H={hidden} "
                    f"and this layer's input size is {want_in}: expected [{gates * hidden}, "
                    f"{want_in}] and [{gates * hidden}, {hidden}]"
                )
            for b in ("bias_ih" + sfx, "bias_hh" + sfx):
                t = params.get(b)
                if t is not None and tuple(t.shape) != (gates * hidden,):
                    raise ValueError(f"{fn}: {b} must be [{gates * hidden}], got {tuple(t.shape)}")
    return hidden, in_size


def initial_state(
    kind: str, h0: Any, x: torch.Tensor, n_states: int, batch: int, hidden: int, batched: bool
) -> torch.Tensor | None:
    """``h0`` as ``[L*P, B, H]`` (None for zeros), checked."""
    if h0 is None:
        return None
    fn = _name(kind)
    want = (n_states, batch, hidden) if batched else (n_states, hidden)
    if not isinstance(h0, torch.Tensor) or tuple(h0.shape) != want:
        got = tuple(h0.shape) if isinstance(h0, torch.Tensor) else type(h0).__name__
        what = "[L*P, B, H]" if batched else "[L*P, H] (x is one example [T, D])"
        raise ValueError(f"{fn}: h0 must be {what} = {want}, got {got}")
    if h0.dtype != x.dtype:
        raise ValueError(f"{fn}: h0 has dtype {h0.dtype} but x has {x.dtype}; cast one of them")
    return h0 if batched else h0.unsqueeze(1)


def mask(kind: str, lengths: Any, steps: int, batch: int, batched: bool, device: Any) -> torch.Tensor | None:
    """``[T, B, 1]`` bool, True where ``t < lengths[b]`` (see :func:`gru`'s ``lengths``)."""
    # (traced by the compiled route: _lstm_module._mask builds the mask without its checks)
    try:
        return _lstm_module._mask(lengths, steps, batch, batched, device)
    except ValueError as error:
        raise ValueError(str(error).replace("lstm:", f"{_name(kind)}:", 1)) from None


def scan_direction(
    kind: str,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
    x_gates: torch.Tensor,
    init: torch.Tensor,
    mask: torch.Tensor | None,
    reverse: bool,
    with_r: bool = False,
) -> tuple[torch.Tensor, Any]:
    """``scan`` of the step over ``x_gates [T, B, G*H]`` (``mask [T, B, 1]`` bool).

    Returns ``(h_n, out)``, or ``(h_n, (out, r))`` with ``with_r`` (GRU: the reset gates).
    """

    def body(h: torch.Tensor, inp: Any) -> Any:
        xg, valid = inp if mask is not None else (inp, None)
        h_new, r = step(kind, w_hh, b_hh, h, xg)
        out = h_new
        if valid is not None:
            out = torch.where(valid, h_new, torch.zeros_like(h_new))
            h_new = torch.where(valid, h_new, h)
        return h_new, ((out, r) if with_r else out)

    return scan(body, init, x_gates if mask is None else (x_gates, mask), reverse=reverse)


Direction = Callable[..., Any]


def _layer(
    kind: str,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    h0: Any,
    num_layers: int,
    bidirectional: bool,
    batch_first: bool,
    dropout: float,
    training: bool,
    lengths: Any,
    direction: Direction | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gru` / :func:`rnn`; ``direction(sfx, layer_in, x_gates, init, run)``, if given,
    runs each layer and direction instead of ``run(x_gates) -> (h_n, out)`` (the compiled
    route's tap)."""
    num_dir, hidden, _ = check_layer_args(kind, params, x, num_layers, bidirectional, dropout)
    batched = x.dim() == 3
    if batched:
        x = x.transpose(0, 1) if batch_first else x
    else:
        x = x.unsqueeze(1)
    steps, batch = x.shape[0], x.shape[1]
    h0 = initial_state(kind, h0, x, num_layers * num_dir, batch, hidden, batched)
    valid = mask(kind, lengths, steps, batch, batched, x.device)
    layer_in = x
    h_n: list[torch.Tensor] = []
    for layer in range(num_layers):
        outs = []
        for d in range(num_dir):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_hh, b_hh = params["weight_hh" + sfx], params.get("bias_hh" + sfx)
            x_gates = _autocast.linear(layer_in, params["weight_ih" + sfx], params.get("bias_ih" + sfx))
            k = layer * num_dir + d
            init = h0[k] if h0 is not None else x.new_zeros(batch, hidden)

            def run(xg: torch.Tensor, w_hh=w_hh, b_hh=b_hh, init=init, reverse=bool(d), with_r=False) -> Any:
                return scan_direction(kind, w_hh, b_hh, xg, init, valid, reverse, with_r)

            h, out = run(x_gates) if direction is None else direction(sfx, layer_in, x_gates, init, run)
            outs.append(out)
            h_n.append(h)
        layer_in = outs[0] if num_dir == 1 else torch.cat(outs, dim=-1)
        if training and dropout > 0 and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, training=True)
    out, hn = layer_in, torch.stack(h_n)
    poison = _lstm_module._poison(lengths, steps, out)
    if poison is not None:  # (traced: a length outside [0, T] makes its example NaN)
        out, hn = out + poison, hn + poison
    if not batched:
        return out.squeeze(1), hn.squeeze(1)
    return (out.transpose(0, 1) if batch_first else out), hn


# ----------------------------------------------------------------------------------- init


def _check_sizes(input_size: Any, hidden_size: Any, num_layers: Any, fn: str) -> None:
    for name, value, low in (
        ("input_size", input_size, 0), ("hidden_size", hidden_size, 1), ("num_layers", num_layers, 1)
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{fn}: {name} must be an int >= {low}, got {value!r}")


def _init_block(
    gates: int, input_size: int, hidden_size: int, bias: bool, sfx: str,
    dtype: torch.dtype | None, device: Any, generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """One cell's tensors, drawn in torch.nn's order: weight_ih, weight_hh, bias_ih, bias_hh."""
    bound = 1.0 / math.sqrt(hidden_size)
    kw = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    gh = gates * hidden_size
    shapes = {"weight_ih": (gh, input_size), "weight_hh": (gh, hidden_size)}
    if bias:
        shapes.update(bias_ih=(gh,), bias_hh=(gh,))
    return {name + sfx: _uniform(shape, bound, generator, **kw) for name, shape in shapes.items()}


def _init_layers(
    gates: int, input_size: int, hidden_size: int, num_layers: int, bias: bool, bidirectional: bool,
    dtype: Any, device: Any, generator: Any, fn: str,
) -> dict[str, torch.Tensor]:
    _check_sizes(input_size, hidden_size, num_layers, fn)
    num_dir = 2 if bidirectional else 1
    params: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        layer_in = input_size if layer == 0 else hidden_size * num_dir
        for d in range(num_dir):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            params.update(_init_block(gates, layer_in, hidden_size, bias, sfx, dtype, device, generator))
    return params


def init_gru(
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bias: bool = True,
    batch_first: bool = False,
    dropout: float = 0.0,
    bidirectional: bool = False,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`gru` with ``torch.nn.GRU``'s names, key order and initialisation.

    Takes nn.GRU's constructor arguments (``batch_first`` and ``dropout`` do not affect the
    params; pass them to :func:`gru`). Every tensor is drawn from ``U(-1/sqrt(H), 1/sqrt(H))``
    in nn.GRU's ``named_parameters()`` order, so with ``generator=None`` and the same
    ``torch.manual_seed`` the values equal a fresh ``nn.GRU``'s.

    Returns:
        ``{"weight_ih_l0": [3H, D], "weight_hh_l0": [3H, H], "bias_ih_l0": [3H],
        "bias_hh_l0": [3H], ...}``; layers ``k > 0`` take ``P*H`` inputs; no bias keys when
        ``bias=False``.
    """
    return _init_layers(3, input_size, hidden_size, num_layers, bias, bidirectional, dtype,
                        device, generator, "init_gru")


def init_rnn(
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    nonlinearity: str = "tanh",
    bias: bool = True,
    batch_first: bool = False,
    dropout: float = 0.0,
    bidirectional: bool = False,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`rnn` with ``torch.nn.RNN``'s names, key order and initialisation.

    Takes nn.RNN's constructor arguments (``nonlinearity``, ``batch_first`` and ``dropout``
    do not affect the params); draws as nn.RNN does (``U(-1/sqrt(H), 1/sqrt(H))``).

    Returns:
        ``{"weight_ih_l0": [H, D], "weight_hh_l0": [H, H], "bias_ih_l0": [H],
        "bias_hh_l0": [H], ...}``.
    """
    _kind(nonlinearity, "init_rnn")
    return _init_layers(1, input_size, hidden_size, num_layers, bias, bidirectional, dtype,
                        device, generator, "init_rnn")


def init_gru_cell(
    input_size: int,
    hidden_size: int,
    bias: bool = True,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`gru_cell` as a fresh ``torch.nn.GRUCell``'s (same draws under one
    seed): ``{"weight_ih": [3H, D], "weight_hh": [3H, H], "bias_ih": [3H], "bias_hh": [3H]}``."""
    _check_sizes(input_size, hidden_size, 1, "init_gru_cell")
    return _init_block(3, input_size, hidden_size, bias, "", dtype, device, generator)


def init_rnn_cell(
    input_size: int,
    hidden_size: int,
    bias: bool = True,
    nonlinearity: str = "tanh",
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Params for :func:`rnn_cell` as a fresh ``torch.nn.RNNCell``'s (same draws under one
    seed): ``{"weight_ih": [H, D], "weight_hh": [H, H], "bias_ih": [H], "bias_hh": [H]}``."""
    _kind(nonlinearity, "init_rnn_cell")
    _check_sizes(input_size, hidden_size, 1, "init_rnn_cell")
    return _init_block(1, input_size, hidden_size, bias, "", dtype, device, generator)
