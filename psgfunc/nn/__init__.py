"""Module shells with per-sample gradients: BastionLab's ``psg.nn`` family on psgfunc's rules.

Each shell has the constructor of its ``torch.nn`` counterpart plus ``max_batch_size`` (in
the position BastionLab put it), the same parameters and ``state_dict`` (weights load both
ways with ``strict=True``), and a forward that is one call into ``psgfunc.functional``
through ``psgfunc.per_sample.module_call``. After ``loss.backward()`` on a batch of
``B <= max_batch_size`` examples (batch dim first) every parameter ``p`` has

* ``p.grad_sample`` ``[B, *p.shape]``: the gradient of the loss with respect to example b's
  copy of ``p`` (a mean loss scales it by ``1/B``), and
* ``p.grad``: the ordinary gradient (the sum of ``p.grad_sample`` over the batch).

Rows are examples. Several backward calls of ONE forward pass add up in ``.grad_sample``,
like ``.grad`` (``l1.backward(retain_graph=True); l2.backward()``); the rows of another
forward pass are never added: clear between batches (``psgfunc.nn.zero_grad(model)`` clears
``.grad`` and ``.grad_sample`` of every parameter of any model; a shell's own
``zero_grad()`` does the same for its parameters; ``optimizer.zero_grad()`` and a
container's ``model.zero_grad()`` clear ``.grad`` only), or a backward of the next forward
pass raises a ValueError. So does a backward in which a shell's parameter is also used
outside any psgfunc layer in a way nothing serves (e.g. ``h @ emb.weight.T`` in a model
not passed to ``expand_weights``, or an op without a per-sample rule): its
``.grad_sample`` would miss that use. See ``psgfunc.per_sample._rows``.

``expand_weights(model, max_batch_size)`` converts a ``torch.nn`` model's layers into these
shells in place; a module with parameters and no converter becomes a ``Generic`` shell, whose
own forward reaches the op-level per-sample rules (``psgfunc.nn.generic``); so do plain
torch ops on the model's parameters in the converted model's forward outside any shell (a
head tied to the embedding, ``F.linear(h, self.emb.weight)``).
"""

from psgfunc.nn._base import ExpandedModule, zero_grad
from psgfunc.nn.attention import DPMultiheadAttention
from psgfunc.nn.conv import Conv1d, Conv2d, Conv3d, expanded_convolution
from psgfunc.nn.conv_transpose import ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from psgfunc.nn.convert import CONVERTERS, expand_weights
from psgfunc.nn.embedding import Embedding
from psgfunc.nn.embedding_bag import EmbeddingBag
from psgfunc.nn.generic import Generic, make_generic
from psgfunc.nn.linear import ConvLinear, Linear
from psgfunc.nn.lstm import DPLSTM, BidirectionalDPLSTMLayer, DPLSTMCell, DPLSTMLayer, LSTMLinear
from psgfunc.nn.normalization import (
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
)
from psgfunc.nn.recurrent import DPGRU, DPRNN, DPGRUCell, DPRNNCell

__all__ = [
    # BastionLab psg.nn family
    "Linear",
    "ConvLinear",
    "Embedding",
    "LayerNorm",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "expanded_convolution",
    "expand_weights",
    # issue 13: normalisation layers
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "RMSNorm",
    # issue 13: transposed convolutions, embedding bags
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "EmbeddingBag",
    # Opacus DP-LSTM family
    "DPLSTM",
    "DPLSTMLayer",
    "BidirectionalDPLSTMLayer",
    "DPLSTMCell",
    "LSTMLinear",
    # GRU / RNN (Opacus's signatures)
    "DPGRU",
    "DPRNN",
    "DPGRUCell",
    "DPRNNCell",
    "DPMultiheadAttention",
    # any other module with parameters (issue 13): op-level rules
    "Generic",
    "make_generic",
    # helpers
    "zero_grad",
    "ExpandedModule",
    "CONVERTERS",
]
