"""Small whole models for the benchmark, each written once and run three ways.

A model is an *architecture* ``arch(ops, x)``: a function that calls its layers by name
through ``ops`` (``ops.linear("fc1", h)``, ``ops.conv2d("c1", h, padding=1)``, ...) and
plain torch ops in between, with negative dims only, so that the same code runs

* on a batch, with ``torch.nn`` submodules (:class:`Net`: the non-private model, the model
  ``psgfunc.nn.expand_weights`` converts and the model Opacus wraps), and
* on ONE example, with ``psgfunc.functional`` on a params dict named like the module's
  ``named_parameters()`` (``fn`` of the configuration, for ``per_sample_grads`` and
  ``clipped_grad_sum``).

:func:`model_configs` returns configurations in the format of :mod:`benchmarks.methods`:

* ``MLP``: 512-512-512-10 with ReLU, ``x [B, 512]``;
* ``DigitsCNN``: the CNN of ``examples/dp_cnn_digits.py`` (3x3 convs 1->16->32 with ReLU
  and 2x2 max pooling, then Linear 128->10), ``x [B, 8, 8]``;
* ``EmbLSTM``: text classifier, Embedding(20000, 100) -> LSTM(100, 100) -> Linear(100, 2)
  on the last step, ``idx [B, 64]`` (``expand_weights`` makes the LSTM a
  ``psgfunc.nn.DPLSTM``; Opacus gets ``opacus.layers.DPLSTM``, the LSTM it supports);
* ``Transformer``: one pre-LayerNorm transformer block (Embedding(5000, 128), 4-head
  self-attention from Linear q/k/v/o, LayerNorm, MLP 128-512-128 with GELU), mean pooling
  and Linear(128, 10), ``idx [B, 32]``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import psgfunc.functional as PF

Arch = Callable[[Any, torch.Tensor], torch.Tensor]


class ModuleOps:
    """``ops`` over a module's submodules: ``ops.linear("fc", h)`` is ``root.fc(h)``.

    Keyword arguments (padding, shapes) are the modules' own and are ignored here."""

    def __init__(self, root: nn.Module):
        self.root = root

    def _call(self, name: str, x: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.root.get_submodule(name)(x)

    linear = conv2d = embedding = layer_norm = _call

    def lstm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.root.get_submodule(name)(x)[0]


class ParamOps:
    """``ops`` over a params dict: ``ops.linear("fc", h)`` is ``PF.linear(params["fc.*"], h)``."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.params = params
        self._layers: dict[str, dict[str, torch.Tensor]] | None = None

    def _sub(self, name: str) -> dict[str, torch.Tensor]:
        # the flat dict split by layer once per call of the model (filtering it by prefix
        # for every layer was the harness's own cost, ~10 us a layer, in every step timed)
        if self._layers is None:
            layers: dict[str, dict[str, torch.Tensor]] = {}
            for k, v in self.params.items():
                layer, _, leaf = k.rpartition(".")
                layers.setdefault(layer, {})[leaf] = v
            self._layers = layers
        return self._layers.get(name, {})

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return PF.linear(self._sub(name), x)

    def conv2d(self, name: str, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return PF.conv2d(self._sub(name), x, **kwargs)

    def embedding(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        return PF.embedding(self._sub(name), idx)

    def layer_norm(self, name: str, x: torch.Tensor, *, shape: tuple[int, ...]) -> torch.Tensor:
        return PF.layer_norm(self._sub(name), x, shape)

    def lstm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return PF.lstm(self._sub(name), x, batch_first=True)[0]


class Net(nn.Module):
    """A ``torch.nn`` model: named layers and an architecture that calls them."""

    def __init__(self, arch: Arch, layers: dict[str, nn.Module]):
        super().__init__()
        self.arch = arch
        for name, layer in layers.items():
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.arch(ModuleOps(self), x)


# ------------------------------------------------------------------------- architectures


def mlp(ops: Any, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(ops.linear("fc1", x))
    h = torch.relu(ops.linear("fc2", h))
    return ops.linear("fc3", h)


def digits_cnn(ops: Any, x: torch.Tensor) -> torch.Tensor:
    h = x.unsqueeze(-3)  # [B, 8, 8] -> [B, 1, 8, 8] (one example: [1, 8, 8])
    h = F.max_pool2d(torch.relu(ops.conv2d("c1", h, padding=1)), 2)
    h = F.max_pool2d(torch.relu(ops.conv2d("c2", h, padding=1)), 2)
    return ops.linear("fc", h.flatten(-3))


def emb_lstm(ops: Any, idx: torch.Tensor) -> torch.Tensor:
    h = ops.lstm("lstm", ops.embedding("emb", idx))  # [B, T, H] (one example: [T, H])
    return ops.linear("fc", h[..., -1, :])


def transformer(ops: Any, idx: torch.Tensor, heads: int = 4) -> torch.Tensor:
    e = ops.embedding("emb", idx)  # [B, T, D]
    d = e.shape[-1]

    def split(t: torch.Tensor) -> torch.Tensor:  # [..., T, D] -> [..., heads, T, D / heads]
        return t.unflatten(-1, (heads, d // heads)).transpose(-3, -2)

    a = ops.layer_norm("ln1", e, shape=(d,))
    q, k, v = (split(ops.linear(n, a)) for n in ("q", "k", "v"))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
    h = e + ops.linear("o", att.transpose(-3, -2).flatten(-2))
    m = ops.layer_norm("ln2", h, shape=(d,))
    h = h + ops.linear("ff2", F.gelu(ops.linear("ff1", m)))
    return ops.linear("head", h.mean(-2))


# ------------------------------------------------------------------------ configurations


def _functional(arch: Arch) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    return lambda params, x: arch(ParamOps(params), x)


def _opacus_lstm(build: Callable[[], Net], size: int, hidden: int) -> Callable[[], nn.Module]:
    def opacus_nn() -> nn.Module:
        from opacus.layers import DPLSTM

        model = build()
        model.lstm = DPLSTM(size, hidden, batch_first=True)
        return model

    return opacus_nn


def model_configs(quick: bool) -> dict[str, dict[str, Any]]:
    """name -> configuration (see :mod:`benchmarks.methods`); ``quick``: tiny sizes."""
    width, classes = (32, 10) if quick else (512, 10)
    ch = 4 if quick else 16
    vocab, dim, hidden, steps = (100, 8, 8, 6) if quick else (20000, 100, 100, 64)
    t_vocab, t_dim, t_ff, t_steps = (100, 16, 32, 5) if quick else (5000, 128, 512, 32)

    def mlp_net() -> Net:
        return Net(mlp, dict(fc1=nn.Linear(width, width), fc2=nn.Linear(width, width),
                             fc3=nn.Linear(width, classes)))

    def cnn_net() -> Net:
        return Net(digits_cnn, dict(c1=nn.Conv2d(1, ch, 3, padding=1),
                                    c2=nn.Conv2d(ch, 2 * ch, 3, padding=1),
                                    fc=nn.Linear(8 * ch, 10)))

    def lstm_net() -> Net:
        return Net(emb_lstm, dict(emb=nn.Embedding(vocab, dim),
                                  lstm=nn.LSTM(dim, hidden, batch_first=True),
                                  fc=nn.Linear(hidden, 2)))

    def transformer_net() -> Net:
        layers: dict[str, nn.Module] = dict(emb=nn.Embedding(t_vocab, t_dim), ln1=nn.LayerNorm(t_dim))
        layers.update({n: nn.Linear(t_dim, t_dim) for n in ("q", "k", "v", "o")})
        layers.update(ln2=nn.LayerNorm(t_dim), ff1=nn.Linear(t_dim, t_ff), ff2=nn.Linear(t_ff, t_dim),
                      head=nn.Linear(t_dim, 10))
        return Net(transformer, layers)

    return {
        "MLP": dict(
            desc=f"MLP {width}-{width}-{width}-{classes}, x [B, {width}]",
            nn=mlp_net, fn=_functional(mlp), x=lambda b: torch.randn(b, width),
        ),
        "DigitsCNN": dict(
            desc=f"digits CNN conv 1-{ch}-{2 * ch} k3 + pool + Linear({8 * ch}, 10), x [B, 8, 8]",
            nn=cnn_net, fn=_functional(digits_cnn), x=lambda b: torch.rand(b, 8, 8),
        ),
        "EmbLSTM": dict(
            desc=f"Embedding({vocab}, {dim}) + LSTM({dim}, {hidden}) + Linear({hidden}, 2), idx [B, {steps}]",
            nn=lstm_net, fn=_functional(emb_lstm), x=lambda b: torch.randint(0, vocab, (b, steps)),
            opacus_nn=_opacus_lstm(lstm_net, dim, hidden),
        ),
        "Transformer": dict(
            desc=f"Embedding({t_vocab}, {t_dim}) + 4-head attention + LayerNorm + MLP {t_dim}-{t_ff}-{t_dim} + Linear({t_dim}, 10), idx [B, {t_steps}]",
            nn=transformer_net, fn=_functional(transformer), x=lambda b: torch.randint(0, t_vocab, (b, t_steps)),
        ),
    }
