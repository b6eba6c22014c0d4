"""GRU and Elman RNN shells: ``torch.nn.GRU`` / ``RNN`` / ``GRUCell`` / ``RNNCell`` with
per-sample gradients.

Opacus's ``DPGRU``, ``DPRNN``, ``DPGRUCell`` and ``DPRNNCell``, with their constructor
signatures, on psgfunc's rules (:mod:`psgfunc.per_sample.rules.recurrent`). Each IS its
``torch.nn`` layer (a subclass): same parameters, initialisation and ``state_dict``, so
weights load both ways with ``strict=True``. Every forward is one call of
:func:`psgfunc.functional.gru` / ``rnn`` / ``gru_cell`` / ``rnn_cell`` with the parameters
expanded to the batch; after ``loss.backward()`` every parameter has ``grad_sample``
``[B, *p.shape]`` and ``grad``. Conventions (time-major tensors, ``PackedSequence`` input,
dropout between layers, an unbatched ``[T, D]`` sequence, the optional keyword-only
``max_batch_size``) are :class:`psgfunc.nn.DPLSTM`'s; see :mod:`psgfunc.nn.lstm`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

import psgfunc.functional as PF
from psgfunc.nn import _forward
from psgfunc.nn.lstm import _accumulating_call, _adopt, _AnyBatch, _repack
from psgfunc.per_sample import module_call

__all__ = ["DPGRU", "DPRNN", "DPGRUCell", "DPRNNCell"]


def _no_projection(proj_size: Any, owner: str) -> None:
    if proj_size != 0:
        raise ValueError(
            f"{owner}: proj_size={proj_size!r} is not supported (only nn.LSTM has projections); "
            "use proj_size=0"
        )


class _Sequence(_AnyBatch):
    """The forward shared by :class:`DPGRU` and :class:`DPRNN`."""

    def _layer_call(self) -> Any:
        raise NotImplementedError

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor | PackedSequence,
        state_init: torch.Tensor | None = None,
        *,
        hx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | PackedSequence, torch.Tensor]:
        """Run the layer over ``x``.

        Args:
            x: ``[T, B, D]`` (``[B, T, D]`` with ``batch_first``), a ``PackedSequence``, or
                one unbatched sequence ``[T, D]``.
            state_init: ``h_0`` ``[L*P, B, H]`` (``[L*P, H]`` unbatched), in the caller's
                batch order (also for a packed input), or None for zeros.
            hx: the torch.nn name for ``state_init`` (keyword only).

        Returns:
            ``(output, h_n)``: ``output`` ``[T, B, P*H]`` (packed when ``x`` was), ``h_n``
            ``[L*P, B, H]``.

        Raises:
            ValueError: ``x`` not 2-D/3-D or of the wrong feature size, a state of the wrong
                shape or dtype, or more than ``max_batch_size`` examples.
        """
        owner = type(self).__name__
        if hx is not None:
            if state_init is not None:
                raise ValueError(f"{owner}: pass the initial state as state_init or hx, not both")
            state_init = hx
        if state_init is not None and not isinstance(state_init, torch.Tensor):
            raise ValueError(
                f"{owner}: state_init must be a tensor h_0 [L*P, B, H] or None, got "
                f"{type(state_init).__name__}"
            )
        layer = self._layer_call()
        options = dict(num_layers=self.num_layers, bidirectional=self.bidirectional,
                       dropout=float(self.dropout), training=self.training)
        params = self._expanded_params()
        if isinstance(x, PackedSequence):
            padded, lengths = pad_packed_sequence(x)  # [T, B, D], the caller's batch order
            size = self._check_batch(padded.shape[1], "the PackedSequence")
            _forward.consume(self, x, size, None)
            out, h_n = module_call(layer, params, size, padded, state_init, lengths=lengths,
                                   **options)
            return _forward.produce(self, _repack(out, lengths, x), 0), _forward.produce(self, h_n, 1)
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{owner}: x must be [T, B, {self.input_size}] ([B, T, {self.input_size}] with "
                f"batch_first), a PackedSequence, or one unbatched sequence [T, "
                f"{self.input_size}]; got {shape}"
            )
        batch_dim = None if x.dim() == 2 else 0 if self.batch_first else 1
        size = 1 if batch_dim is None else x.shape[batch_dim]
        self._check_batch(size, "x")
        _forward.consume(self, x, size, batch_dim)
        out, h_n = module_call(layer, params, size, x, state_init, batch_first=self.batch_first,
                               **options)
        if batch_dim is not None:
            _forward.produce(self, out, batch_dim)
            _forward.produce(self, h_n, 1)
        return out, h_n


def _shell_from(cls: type, layer: nn.Module, max_batch_size: int | None, **extra: Any) -> Any:
    p = next(layer.parameters(), None)
    with warnings.catch_warnings():  # torch.nn's dropout warning was given for `layer`
        warnings.simplefilter("ignore")
        shell = cls(
            layer.input_size, layer.hidden_size, layer.num_layers, layer.bias, layer.batch_first,
            layer.dropout, layer.bidirectional, max_batch_size=max_batch_size, device="meta",
            dtype=None if p is None else p.dtype, **extra,
        )
    _adopt(shell, layer)
    shell._init_flat_weights()
    return shell


class DPGRU(_Sequence, nn.GRU):
    """``torch.nn.GRU`` (multi-layer, optionally bidirectional) with per-sample gradients.

    Shapes, as ``nn.GRU`` (``P`` directions, ``L`` layers): ``x`` ``[T, B, D]`` (``[B, T,
    D]`` with ``batch_first``) -> ``output`` ``[T, B, P*H]``, ``h_n`` ``[L*P, B, H]``; a
    ``PackedSequence`` -> a ``PackedSequence`` packed as the input; one unbatched sequence
    ``[T, D]`` -> ``[T, P*H]``, ``[L*P, H]`` (``grad_sample`` then has ``B = 1``).

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional:
            ``nn.GRU``'s (``dropout`` between layers, in training mode, the same masks as
            ``nn.GRU`` under one seed).
        proj_size: Opacus's argument; only 0.
        max_batch_size: keyword-only; None (default) accepts any batch size.
        device, dtype: keyword-only, for the parameters.
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
        proj_size: int = 0,
        *,
        max_batch_size: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _no_projection(proj_size, "DPGRU")
        super().__init__(
            input_size, hidden_size, num_layers=num_layers, bias=bias, batch_first=batch_first,
            dropout=dropout, bidirectional=bidirectional, device=device, dtype=dtype,
        )
        self._set_optional_max(max_batch_size)

    @classmethod
    def from_gru(cls, layer: nn.GRU, max_batch_size: int | None = None) -> DPGRU:
        """A ``DPGRU`` holding ``layer``'s own ``Parameter`` objects (no copy)."""
        return _shell_from(cls, layer, max_batch_size)

    def _layer_call(self) -> Any:
        return PF.gru


class DPRNN(_Sequence, nn.RNN):
    """``torch.nn.RNN`` (Elman, tanh or relu) with per-sample gradients.

    Shapes and behaviour as :class:`DPGRU`. The signature is Opacus's: ``nonlinearity``
    comes after ``proj_size`` (pass it by keyword to be safe; ``nn.RNN`` has it 4th).

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional:
            ``nn.RNN``'s.
        proj_size: Opacus's argument; only 0.
        nonlinearity: ``"tanh"`` or ``"relu"``.
        max_batch_size, device, dtype: keyword-only, as :class:`DPGRU`.
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
        proj_size: int = 0,
        nonlinearity: str = "tanh",
        *,
        max_batch_size: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _no_projection(proj_size, "DPRNN")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"DPRNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(
            input_size, hidden_size, num_layers=num_layers, nonlinearity=nonlinearity, bias=bias,
            batch_first=batch_first, dropout=dropout, bidirectional=bidirectional, device=device,
            dtype=dtype,
        )
        self._set_optional_max(max_batch_size)

    @classmethod
    def from_rnn(cls, layer: nn.RNN, max_batch_size: int | None = None) -> DPRNN:
        """A ``DPRNN`` holding ``layer``'s own ``Parameter`` objects (no copy)."""
        return _shell_from(cls, layer, max_batch_size, nonlinearity=layer.nonlinearity)

    def _layer_call(self) -> Any:
        return functools.partial(PF.rnn, nonlinearity=self.nonlinearity)


# ----------------------------------------------------------------------------------- cells


class _Cell(_AnyBatch):
    def _cell_call(self) -> Any:
        raise NotImplementedError

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        h_prev: torch.Tensor | None = None,
        batch_size_t: int | None = None,
    ) -> torch.Tensor:
        """One step: ``h'``.

        Args:
            x: ``[B, D]`` (``[batch_size_t, D]``) or one example ``[D]``.
            h_prev: ``[B, H]`` (``[H]``), or None for zeros.
            batch_size_t: use only the first ``batch_size_t`` rows of ``h_prev`` (a packed
                sequence's step); calls on fewer examples add to the first rows of
                ``grad_sample``.
        """
        owner = type(self).__name__
        if batch_size_t is not None and h_prev is not None:
            h_prev = h_prev[:batch_size_t]
        if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{owner}: x must be [B, {self.input_size}] or [{self.input_size}], got {shape}")
        size = self._check_batch(1 if x.dim() == 1 else x.shape[0], "x")
        h, _ = _accumulating_call(self._cell_call(), self._expanded_params(), size, h_prev, x)
        return h


def _cell_from(cls: type, layer: nn.Module, max_batch_size: int | None, **extra: Any) -> Any:
    p = next(layer.parameters(), None)
    shell = cls(layer.input_size, layer.hidden_size, layer.bias, max_batch_size=max_batch_size,
                device="meta", dtype=None if p is None else p.dtype, **extra)
    return _adopt(shell, layer)


class DPGRUCell(_Cell, nn.GRUCell):
    """``torch.nn.GRUCell`` with per-sample gradients: one GRU step.

    Shapes: ``x`` ``[B, D]``, ``h_prev`` ``[B, H]`` -> ``h'`` ``[B, H]``; unbatched ``[D]``
    / ``[H]`` as ``nn.GRUCell``. ``grad_sample`` adds up over calls, like ``.grad`` (calls
    on fewer examples add to the first rows). Same parameters, ``state_dict`` and
    initialisation as ``nn.GRUCell``.

    Args:
        input_size: ``D``.
        hidden_size: ``H``.
        bias: use ``b_ih`` and ``b_hh``.
        max_batch_size, device, dtype: keyword-only, as :class:`DPGRU`.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *,
                 max_batch_size: int | None = None, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
        self._set_optional_max(max_batch_size)

    @classmethod
    def from_gru_cell(cls, layer: nn.GRUCell, max_batch_size: int | None = None) -> DPGRUCell:
        """A ``DPGRUCell`` holding ``layer``'s own ``Parameter`` objects (no copy)."""
        return _cell_from(cls, layer, max_batch_size)

    def _cell_call(self) -> Any:
        return PF.gru_cell


class DPRNNCell(_Cell, nn.RNNCell):
    """``torch.nn.RNNCell`` with per-sample gradients: ``h' = act(x W_ih^T + b_ih + h
    W_hh^T + b_hh)``; shapes and behaviour as :class:`DPGRUCell`.

    Args:
        input_size: ``D``.
        hidden_size: ``H``.
        bias: use ``b_ih`` and ``b_hh``.
        nonlinearity: ``"tanh"`` or ``"relu"``.
        max_batch_size, device, dtype: keyword-only, as :class:`DPGRU`.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", *, max_batch_size: int | None = None,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"DPRNNCell: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, bias=bias, nonlinearity=nonlinearity,
                         device=device, dtype=dtype)
        self._set_optional_max(max_batch_size)

    @classmethod
    def from_rnn_cell(cls, layer: nn.RNNCell, max_batch_size: int | None = None) -> DPRNNCell:
        """A ``DPRNNCell`` holding ``layer``'s own ``Parameter`` objects (no copy)."""
        return _cell_from(cls, layer, max_batch_size, nonlinearity=layer.nonlinearity)

    def _cell_call(self) -> Any:
        return functools.partial(PF.rnn_cell, nonlinearity=self.nonlinearity)
