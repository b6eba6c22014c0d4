"""The DP-LSTM family: ``torch.nn.LSTM`` / ``LSTMCell`` / ``Linear`` with per-sample gradients.

Opacus's ``DPLSTM``, ``DPLSTMLayer``, ``BidirectionalDPLSTMLayer``, ``DPLSTMCell`` and
``LSTMLinear``, with their constructor signatures, on psgfunc's rules. Every forward is one
call of :func:`psgfunc.functional.lstm` (or ``lstm_cell`` / ``linear``) with the module's
parameters expanded to the batch, so the work per step is the plain LSTM's and each weight's
per-sample gradient is one contraction over time (see
:mod:`psgfunc.per_sample.rules.lstm`). After ``loss.backward()`` on a batch of ``B``
examples every parameter ``p`` has ``p.grad_sample`` ``[B, *p.shape]`` (rows in the
caller's batch order, also for an unsorted ``PackedSequence``) and ``p.grad``.

Unlike the feed-forward shells these take no ``max_batch_size`` (the seed's signatures
have none): any batch size is accepted. A keyword-only ``max_batch_size`` may be given to
enforce one; :func:`psgfunc.nn.expand_weights` sets it on the layers it converts.

Differences from Opacus 1.6, on purpose (each has a test in ``tests/nn/test_dplstm.py``):
dropout is applied only between layers, to each layer's output, in training mode, drawing
the same masks as ``nn.LSTM`` under the same seed (Opacus applies it at every time step and
after the last layer); every output keeps the input's dtype (Opacus returns a float32
``h_n`` for float64 packed input); an unbatched ``[T, D]`` input is one sequence, exactly
as in ``nn.LSTM`` (Opacus reads it as ``[T, B]``), and its ``grad_sample`` has ``B = 1``;
``DPLSTM``'s ``state_dict`` has ``nn.LSTM``'s keys in ``nn.LSTM``'s order.

Time-major tensors: ``DPLSTM`` with ``batch_first=False``, ``DPLSTMLayer`` and
``BidirectionalDPLSTMLayer`` read the batch from dim 1 and return ``[T, B, *]``; every other
shell reads dim 0. In a model converted by :func:`psgfunc.nn.expand_weights` each forward is
recorded (:mod:`psgfunc.nn._forward`): a shell whose input has the leading sizes of a
recurrent output with the batch at the other dim must get it transposed, else a ValueError
(use ``batch_first=True``, or ``out.transpose(0, 1)``). With ``T == B`` the sizes cannot
tell, so the transpose must show in the memory layout (a transposed view, or elementwise ops
on one); ``out.transpose(0, 1).contiguous()`` is then refused rather than guessed. The same
holds the other way: ``[T, B]`` ids through an ``Embedding`` (batch at dim 0) into a
time-major LSTM raise. Shells called outside such a model are not checked.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import psgfunc.functional as PF
from psgfunc.nn import _forward
from psgfunc.nn._base import ExpandedModule, check_max_batch_size
from psgfunc.per_sample import module_call
from psgfunc.per_sample._expanded import expanded_call

__all__ = ["DPLSTM", "DPLSTMLayer", "BidirectionalDPLSTMLayer", "DPLSTMCell", "LSTMLinear"]

State = tuple[torch.Tensor, torch.Tensor]


class _AnyBatch(ExpandedModule):
    """Shared by the family: an optional ``max_batch_size`` (None: no limit)."""

    max_batch_size: int | None = None

    def _set_optional_max(self, max_batch_size: int | None) -> None:
        self.max_batch_size = (
            None if max_batch_size is None else check_max_batch_size(max_batch_size, type(self).__name__)
        )

    def _check_batch(self, size: int, where: str) -> int:
        # (no gradients, in evaluation: nothing per example, no limit)
        if self.max_batch_size is not None and size > self.max_batch_size and torch.is_grad_enabled():
            raise ValueError(
                f"{type(self).__name__}: {where} holds a batch of {size} examples but "
                f"max_batch_size={self.max_batch_size}; split the batch, or raise or drop "
                "max_batch_size (None: no limit)"
            )
        return size

    def extra_repr(self) -> str:
        base = super(ExpandedModule, self).extra_repr()  # the torch.nn layer's, if any
        if self.max_batch_size is None:
            return base
        tail = f"max_batch_size={self.max_batch_size}"
        return f"{base}, {tail}" if base else tail


def _register(module: nn.Module, params: dict[str, torch.Tensor]) -> None:
    for name, value in params.items():
        module.register_parameter(name, nn.Parameter(value))


def _adopt(shell: nn.Module, layer: nn.Module) -> nn.Module:
    """Move ``layer``'s own ``Parameter`` objects into ``shell`` (same names, same order)."""
    mine, theirs = list(shell._parameters), list(layer._parameters)
    if mine != theirs:  # pragma: no cover - both are built from the same arguments
        raise ValueError(f"{type(shell).__name__} has parameters {mine} but the layer has {theirs}")
    for name, value in layer._parameters.items():
        shell._parameters[name] = value
    shell.train(layer.training)
    return shell


def _seq_state(state: Any, owner: str) -> Any:
    if state is None:
        return None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(
            f"{owner}: state_init must be a pair (h_0, c_0) of tensors or None, got "
            f"{type(state).__name__}"
        )
    return tuple(state)


# ---------------------------------------------------------------------------------- DPLSTM


class DPLSTM(_AnyBatch, nn.LSTM):
    """``torch.nn.LSTM`` (multi-layer, optionally bidirectional) with per-sample gradients.

    Dimensions: ``B`` batch, ``T`` time, ``D`` input size, ``H`` hidden size, ``L`` layers,
    ``P`` directions (2 if bidirectional else 1).

    Shapes, as ``nn.LSTM``: ``x`` ``[T, B, D]`` (``[B, T, D]`` with ``batch_first``) ->
    ``output`` ``[T, B, P*H]`` (``[B, T, P*H]``), ``h_n``/``c_n`` ``[L*P, B, H]``; a
    ``PackedSequence`` (sorted or not) -> a ``PackedSequence`` with the input's
    ``batch_sizes``/``sorted_indices``; one unbatched sequence ``[T, D]`` -> ``[T, P*H]``
    and ``[L*P, H]`` (then ``grad_sample`` has ``B = 1``).

    It IS an ``nn.LSTM`` (subclass): same parameters, initialisation (same draws under the
    same seed), ``state_dict`` keys, order and shapes, so weights load both ways with
    ``strict=True``. ``proj_size`` is not supported. The forward is one call of
    :func:`psgfunc.functional.lstm` with the parameters expanded to the batch; a packed
    input is run padded with its lengths (padding steps get no gradient) and packed again.

    Args:
        input_size: ``D``.
        hidden_size: ``H``.
        num_layers: ``L``.
        bias: use ``b_ih`` and ``b_hh``.
        batch_first: ``x``/``output`` are ``[B, T, *]`` (not ``h_n``/``c_n``). Without it the
            output is time-major: transpose it before a batch-first layer (in a converted
            model an untransposed one raises; see the module docstring).
        dropout: probability of zeroing each element of every layer's output except the
            last's, in training mode (``nn.LSTM``'s dropout, same masks under one seed).
        bidirectional: add a reverse direction.
        max_batch_size: keyword-only; None (default) accepts any batch size.
        device: keyword-only, where to allocate the parameters.
        dtype: keyword-only, their floating dtype.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0,
        bidirectional: bool = False,
        *,
        max_batch_size: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers=num_layers, bias=bias, batch_first=batch_first,
            dropout=dropout, bidirectional=bidirectional, proj_size=0, device=device, dtype=dtype,
        )
        self._set_optional_max(max_batch_size)

    @classmethod
    def from_lstm(cls, layer: nn.LSTM, max_batch_size: int | None = None) -> DPLSTM:
        """A ``DPLSTM`` holding ``layer``'s own ``Parameter`` objects (no copy).

        Raises:
            ValueError: if ``layer.proj_size != 0`` (LSTM with projections).
        """
        if layer.proj_size != 0:
            raise ValueError(
                f"nn.LSTM with proj_size={layer.proj_size} is not supported (psgfunc.functional."
                "lstm has no projection weight_hr); use proj_size=0, or follow the LSTM with "
                "an nn.Linear"
            )
        p = next(layer.parameters(), None)
        with warnings.catch_warnings():  # nn.LSTM's dropout warning was given for `layer`
            warnings.simplefilter("ignore")
            shell = cls(
                layer.input_size, layer.hidden_size, layer.num_layers, layer.bias,
                layer.batch_first, layer.dropout, layer.bidirectional,
                max_batch_size=max_batch_size, device="meta",
                dtype=None if p is None else p.dtype,
            )
        _adopt(shell, layer)
        shell._init_flat_weights()
        return shell

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor | PackedSequence,
        state_init: State | None = None,
        *,
        hx: State | None = None,
    ) -> tuple[torch.Tensor | PackedSequence, State]:
        """Run the LSTM over ``x``.

        Args:
            x: ``[T, B, D]`` (``[B, T, D]`` with ``batch_first``), a ``PackedSequence``, or
                one unbatched sequence ``[T, D]``.
            state_init: ``(h_0, c_0)``, each ``[L*P, B, H]`` (``[L*P, H]`` unbatched), in the
                caller's batch order (also for a packed input), or None for zeros.
            hx: ``nn.LSTM``'s name for ``state_init`` (keyword only).

        Returns:
            ``(output, (h_n, c_n))`` as ``nn.LSTM``: ``output`` ``[T, B, P*H]`` (packed when
            ``x`` was), ``h_n``/``c_n`` ``[L*P, B, H]``, dtype of ``x``.

        Raises:
            ValueError: ``x`` not 2-D/3-D or of the wrong feature size, a state of the wrong
                shape or dtype, or more than ``max_batch_size`` examples.
        """
        if hx is not None:
            if state_init is not None:
                raise ValueError("DPLSTM: pass the initial state as state_init or hx, not both")
            state_init = hx
        state = _seq_state(state_init, "DPLSTM")
        options = dict(
            num_layers=self.num_layers, bidirectional=self.bidirectional,
            dropout=float(self.dropout), training=self.training,
        )
        params = self._expanded_params()
        if isinstance(x, PackedSequence):
            padded, lengths = pad_packed_sequence(x)  # [T, B, D], the caller's batch order
            size = self._check_batch(padded.shape[1], "the PackedSequence")
            _forward.consume(self, x, size, None)
            out, (h_n, c_n) = module_call(PF.lstm, params, size, padded, state,
                                          lengths=lengths, **options)
            return _forward.produce(self, _repack(out, lengths, x), 0), (_forward.produce(self, h_n, 1), c_n)
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"DPLSTM: x must be [T, B, {self.input_size}] ([B, T, {self.input_size}] with "
                f"batch_first), a PackedSequence, or one unbatched sequence [T, "
                f"{self.input_size}]; got {shape}"
            )
        batch_dim = None if x.dim() == 2 else 0 if self.batch_first else 1
        size = 1 if batch_dim is None else x.shape[batch_dim]
        self._check_batch(size, "x")
        _forward.consume(self, x, size, batch_dim)  # time-major: see the class docstring
        out, (h_n, c_n) = module_call(PF.lstm, params, size, x, state,
                                      batch_first=self.batch_first, **options)
        if batch_dim is not None:
            _forward.produce(self, out, batch_dim)
            _forward.produce(self, h_n, 1)
        return out, (h_n, c_n)


def _repack(out: torch.Tensor, lengths: torch.Tensor, like: PackedSequence) -> PackedSequence:
    """Pack ``out`` ``[T, B, *]`` (caller's order) exactly as ``like`` was packed."""
    order = like.sorted_indices
    if order is not None:
        out, lengths = out.index_select(1, order), lengths.index_select(0, order.cpu())
    data = pack_padded_sequence(out, lengths, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


# ------------------------------------------------------------------------------ the layers


def _padded(x: Any, batch_sizes: torch.Tensor | None, owner: str) -> tuple[torch.Tensor, Any]:
    """``x`` as ``[T, B, D]`` plus lengths (None without ``batch_sizes``)."""
    if batch_sizes is None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{owner}: x must be [T, B, D] (time first; pass batch_sizes for packed data), "
                f"got {shape}"
            )
        return x, None
    if isinstance(x, (tuple, list)):
        x = torch.cat(list(x), 0)
    batch_sizes = torch.as_tensor(batch_sizes, dtype=torch.long, device="cpu")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != int(batch_sizes.sum()):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"{owner}: with batch_sizes, x must be the packed data [sum(batch_sizes), D] = "
            f"[{int(batch_sizes.sum())}, D] or its split into T tensors [batch_sizes[t], D]; "
            f"got {shape}"
        )
    padded, lengths = pad_packed_sequence(PackedSequence(x, batch_sizes))
    return padded, lengths


def _flip(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Reverse each sequence of ``x`` ``[T, B, *]`` within its own length (an involution)."""
    if lengths is None:
        return x.flip(0)
    steps = x.shape[0]
    t = torch.arange(steps).unsqueeze(1)
    n = lengths.to(torch.long).unsqueeze(0)
    idx = torch.where(t < n, n - 1 - t, t).to(x.device)  # [T, B]
    return x.gather(0, idx.unsqueeze(-1).expand_as(x))


def _unpadded(out: torch.Tensor, lengths: torch.Tensor, x: Any) -> Any:
    """``out`` ``[T, B, *]`` packed back into the form ``x`` came in."""
    data = pack_padded_sequence(out, lengths, enforce_sorted=True).data
    if isinstance(x, (tuple, list)):
        return type(x)(data.split([t.shape[0] for t in x]))
    return data


class _LayerBase(_AnyBatch):
    bidirectional = False

    def __init__(self, input_size: int, hidden_size: int, bias: bool, dropout: float,
                 max_batch_size: int | None, device: Any, dtype: torch.dtype | None) -> None:
        super().__init__()
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout!r}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.bias, self.dropout = bool(bias), float(dropout)
        _register(self, PF.init_lstm(input_size, hidden_size, 1, bias=bias,
                                     bidirectional=self.bidirectional, dtype=dtype, device=device))
        self._set_optional_max(max_batch_size)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, bias={self.bias}, dropout={self.dropout}"
        return s if self.max_batch_size is None else f"{s}, max_batch_size={self.max_batch_size}"

    def _run(self, x: Any, state: Any, batch_sizes: Any, reverse: bool) -> Any:
        owner = type(self).__name__
        padded, lengths = _padded(x, batch_sizes, owner)
        size = self._check_batch(padded.shape[1], "x")
        _forward.consume(self, x, size, 1 if lengths is None else None)  # time-major
        inp = _flip(padded, lengths) if reverse else padded
        out, (h_n, c_n) = module_call(
            PF.lstm, self._expanded_params(), size, inp, state, bidirectional=self.bidirectional,
            lengths=lengths,
        )
        if reverse:
            out = _flip(out, lengths)
        if self.dropout > 0 and self.training:  # on the layer's output, as nn.LSTM between layers
            out = F.dropout(out, self.dropout, training=True)
        if lengths is not None:
            out = _unpadded(out, lengths, x)
        else:
            _forward.produce(self, out, 1)
        _forward.produce(self, h_n, 1)  # [P, B, H]
        return out, (h_n, c_n)


class DPLSTMLayer(_LayerBase):
    """One LSTM layer, one direction, with per-sample gradients.

    Shapes: ``x`` ``[T, B, D]`` -> ``output`` ``[T, B, H]``, ``h_n``/``c_n`` ``[B, H]``.
    With ``batch_sizes`` (a ``PackedSequence``'s), ``x`` is the packed data
    ``[sum(batch_sizes), D]`` or its split into ``T`` tensors ``[batch_sizes[t], D]``, and
    ``output`` comes back in the same form; ``h_n``/``c_n`` are each sequence's state at
    its own last step, in the packed (sorted) order.

    ``reverse=True`` runs each sequence backwards within its own length (the reverse half
    of a bidirectional ``nn.LSTM`` layer). ``dropout`` applies to ``output`` in training
    mode, never inside the recurrence nor to ``h_n``/``c_n`` (stacking layers with dropout
    on all but the last reproduces ``nn.LSTM``).

    Parameters and ``state_dict`` are those of ``nn.LSTM(input_size, hidden_size, 1,
    bias)``: ``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0`` (whatever
    ``reverse``), with its initialisation.

    Args:
        input_size: ``D``.
        hidden_size: ``H``.
        bias: use ``b_ih`` and ``b_hh``.
        dropout: see above, in ``[0, 1)``.
        reverse: run backwards in time.
        max_batch_size, device, dtype: keyword-only, as :class:`DPLSTM`.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, dropout: float = 0,
                 reverse: bool = False, *, max_batch_size: int | None = None, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, hidden_size, bias, dropout, max_batch_size, device, dtype)
        self.reverse = bool(reverse)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", reverse=True" if self.reverse else "")

    def forward(self, x: Any, state_init: State | None = None,
                batch_sizes: torch.Tensor | None = None) -> tuple[Any, State]:
        """``(output, (h_n, c_n))``; ``state_init`` is ``(h_0, c_0)`` ``[B, H]`` each, or None."""
        state = _seq_state(state_init, "DPLSTMLayer")
        if state is not None:
            state = tuple(t.unsqueeze(0) if isinstance(t, torch.Tensor) else t for t in state)
        out, (h_n, c_n) = self._run(x, state, batch_sizes, self.reverse)
        return out, (h_n.squeeze(0), c_n.squeeze(0))


class BidirectionalDPLSTMLayer(_LayerBase):
    """One bidirectional LSTM layer with per-sample gradients.

    Shapes: ``x`` ``[T, B, D]`` -> ``output`` ``[T, B, 2H]`` (forward then reverse features),
    ``h_n``/``c_n`` ``[2, B, H]``; with ``batch_sizes``, packed data as
    :class:`DPLSTMLayer`. ``state_init`` is ``(h_0, c_0)``, each ``[2, B, H]``, or None.

    Parameters and ``state_dict`` are those of ``nn.LSTM(input_size, hidden_size, 1, bias,
    bidirectional=True)``. ``dropout`` applies to ``output`` in training mode only.

    Args:
        input_size: ``D``.
        hidden_size: ``H``.
        bias: use ``b_ih`` and ``b_hh``.
        dropout: in ``[0, 1)``.
        max_batch_size, device, dtype: keyword-only, as :class:`DPLSTM`.
    """

    bidirectional = True

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, dropout: float = 0,
                 *, max_batch_size: int | None = None, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, hidden_size, bias, dropout, max_batch_size, device, dtype)

    def forward(self, x: Any, state_init: State | None = None,
                batch_sizes: torch.Tensor | None = None) -> tuple[Any, State]:
        """``(output, (h_n, c_n))``."""
        return self._run(x, _seq_state(state_init, "BidirectionalDPLSTMLayer"), batch_sizes, False)


# ------------------------------------------------------------------- cell and LSTMLinear


def _accumulating_call(layer: Callable[..., Any], params: dict[str, torch.Tensor], size: int,
                       *args: Any) -> Any:
    """:func:`~psgfunc.per_sample.module_call`, except that the calls of one forward pass on
    different batch sizes add up with rows aligned at the top: a call on ``n`` examples adds
    to rows ``0..n-1`` (the steps of a packed sequence, whose batch shrinks to the first
    ``batch_sizes[t]`` sequences), in ``grad_sample`` and in fast-clipping records alike.
    Calls of different forward passes never add up (a ``ValueError``, as ``module_call``).
    """
    return expanded_call(layer, params, size, args, {}, top_aligned=True)


class DPLSTMCell(_AnyBatch, nn.LSTMCell):
    """``torch.nn.LSTMCell`` with per-sample gradients: one LSTM step.

    Math (gates in torch's order ``i, f, g, o``)::

        i, f, g, o = split(x W_ih^T + b_ih + h W_hh^T + b_hh)
        c' = sigma(f) * c + sigma(i) * tanh(g);   h' = sigma(o) * tanh(c')

    Shapes: ``x`` ``[B, D]``, ``h_prev``/``c_prev`` ``[B, H]`` -> ``(h', c')`` ``[B, H]``;
    unbatched ``[D]``/``[H]`` as ``nn.LSTMCell`` (``grad_sample`` then has ``B = 1``).
    With ``batch_size_t = n`` the step runs on the first ``n`` rows of ``h_prev``/``c_prev``
    (a packed sequence's step) and ``x`` is ``[n, D]``.

    ``grad_sample`` adds up over calls, like ``.grad``: calls on fewer examples add to the
    first rows, so a loop over a packed sequence's steps leaves one ``[B, *shape]``
    gradient. Each call builds one ``[B, 4H, *]`` per weight; to run a whole sequence use
    :class:`DPLSTM`, which builds one per layer. It IS an ``nn.LSTMCell``: same parameters,
    ``state_dict`` and initialisation.

    Args:
        input_size: ``D``.
        hidden_size: ``H``.
        bias: use ``b_ih`` and ``b_hh``.
        max_batch_size, device, dtype: keyword-only, as :class:`DPLSTM`.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *,
                 max_batch_size: int | None = None, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
        self._set_optional_max(max_batch_size)

    @classmethod
    def from_lstm_cell(cls, layer: nn.LSTMCell, max_batch_size: int | None = None) -> DPLSTMCell:
        """A ``DPLSTMCell`` holding ``layer``'s own ``Parameter`` objects (no copy)."""
        p = next(layer.parameters(), None)
        shell = cls(layer.input_size, layer.hidden_size, layer.bias,
                    max_batch_size=max_batch_size, device="meta",
                    dtype=None if p is None else p.dtype)
        return _adopt(shell, layer)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        h_prev: torch.Tensor | State | None = None,
        c_prev: torch.Tensor | None = None,
        batch_size_t: int | None = None,
    ) -> State:
        """One step: ``(h', c')``.

        Args:
            x: ``[B, D]`` (``[batch_size_t, D]``) or one example ``[D]``.
            h_prev: ``[B, H]``, or ``nn.LSTMCell``'s ``hx = (h, c)`` pair (then leave
                ``c_prev`` None), or None with ``c_prev`` None for zeros.
            c_prev: ``[B, H]``.
            batch_size_t: use only the first ``batch_size_t`` rows of the state.
        """
        if c_prev is None and isinstance(h_prev, (tuple, list)):
            h_prev, c_prev = h_prev
        if (h_prev is None) != (c_prev is None):
            raise ValueError("DPLSTMCell: pass both h_prev and c_prev, or neither (zeros)")
        if batch_size_t is not None and h_prev is not None:
            h_prev, c_prev = h_prev[:batch_size_t], c_prev[:batch_size_t]
        if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DPLSTMCell: x must be [B, {self.input_size}] or [{self.input_size}], got {shape}")
        size = self._check_batch(1 if x.dim() == 1 else x.shape[0], "x")
        carry = None if h_prev is None else (h_prev, c_prev)
        (h, c), _ = _accumulating_call(PF.lstm_cell, self._expanded_params(), size, carry, x)
        return h, c


class LSTMLinear(_AnyBatch, nn.Linear):
    """``torch.nn.Linear`` whose ``grad_sample`` adds up over the calls of one step.

    Shapes: ``[B, *, in_features] -> [B, *, out_features]``, batch dim 0. Used at every time
    step of a recurrence, the per-sample gradients of all calls sum into one ``grad_sample``
    ``[B, *shape]`` (calls on fewer examples add to the first rows, as a packed sequence's
    later steps). Parameters, ``state_dict`` and initialisation are ``nn.Linear``'s.

    Args:
        in_features: input size.
        out_features: output size.
        bias: learn an additive bias.
        max_batch_size, device, dtype: keyword-only, as :class:`DPLSTM`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 max_batch_size: int | None = None, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._set_optional_max(max_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"LSTMLinear: x must be [B, *, {self.in_features}] with the batch at dim 0, got "
                f"{shape}; for one example use x.unsqueeze(0)"
            )
        size = self._check_batch(x.shape[0], "x")
        return _accumulating_call(PF.linear, self._expanded_params(), size, x)

