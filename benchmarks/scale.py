"""Models at the scale DP users train: a GPT-2-small-shaped transformer and WRN-16-4.

The ``models`` suite's networks take about a millisecond a step, where Python overhead
decides the ratios. These two take tens to hundreds of milliseconds, where FLOPs and memory
traffic do. Both are written once as an architecture ``arch(ops, x)`` (see
:mod:`benchmarks.models`) in plain ``torch.nn`` layers, so that ``expand_weights`` and
Opacus see an ordinary model, and run per example through ``psgfunc.functional``.

:func:`scale_configs` returns configurations in the format of :mod:`benchmarks.methods`:

* ``GPT2``: GPT-2-small-shaped, 2 blocks: token and position ``nn.Embedding`` (vocab 8192,
  d = 768, T = 128), pre-LayerNorm blocks (attention: ``nn.Linear`` qkv 768->2304,
  ``F.scaled_dot_product_attention(is_causal=True)`` over 12 heads, ``nn.Linear`` proj;
  MLP 768-3072-768 with GELU), a final LayerNorm and the head TIED to the token embedding
  (``logits = F.linear(h, tok.weight)``: ``[B, T, 8192]``). The functional version ties
  the same leaf (``PF.linear({"weight": params["tok.weight"]}, h)``); the module version
  uses the embedding's weight in a plain ``F.linear`` in the root's forward, which a method
  that only sees layers may miss (Opacus's hooks) and ``expand_weights`` serves through the
  op-level rules: the CSV's note says what each method did. Batch sizes 4 and 8.
* ``WRN16-4``: Wide ResNet 16-4 with GroupNorm (De et al. 2022) on ``x [B, 3, 32, 32]``:
  conv3x3 3->16, three groups of 2 pre-activation basic blocks (widths 64, 128, 256,
  strides 1, 2, 2; GroupNorm(16) + ReLU before each conv3x3, a 1x1 conv shortcut where the
  shape changes), GroupNorm + ReLU, global average pooling, Linear(256, 10); convolutions
  without bias. Batch sizes 16 and 32.

The suite runs the methods in :data:`SCALE_METHODS` (``python -m benchmarks --suite scale``;
results in ``benchmarks/results/scale.csv``) and counts each step's FLOPs with
``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and attention;
elementwise ops count zero; the weight gradient of a grouped convolution counted once:
torch's formula counts it ``groups`` times, see ``benchmarks.methods.count_flops``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import psgfunc.functional as PF
from benchmarks.models import ModuleOps, Net, ParamOps

SCALE_METHODS = ["nn", "clip-fast", "dpopt-fast", "clip-fast-compiled", "opacus-ghost", "opacus-hooks"]
"""The methods of the scale suite (Opacus's when installed)."""


TIED_HEAD_NOTES = {
    "dpopt-fast": "exact: expand_weights serves the tied head's plain F.linear on the token "
                  "embedding's weight through the op-level rules, so the norms include the head's "
                  "share (a timing row from before that, if committed, missed it)",
    "opacus-hooks": "WRONG per-sample gradient of tok.weight: the hooks see the embedding's lookup, "
                    "not the tied head's F.linear (norms 3-4% low at the quick size)",
    "opacus-ghost": "WRONG norms of tok.weight: ghost clipping's hooks see the embedding's lookup, "
                    "not the tied head's F.linear (norms 2-4% low at the quick size: examples "
                    "under-clipped)",
}
"""What the module-based methods do with the GPT-2 model's tied head (the ``note`` column;
checked by ``tests/test_benchmarks.py``)."""


class ScaleModuleOps(ModuleOps):
    """:class:`benchmarks.models.ModuleOps` plus GroupNorm and the tied head."""

    group_norm = ModuleOps._call

    def tied_linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ root.<name>.weight.T``: a plain op on another layer's weight."""
        return F.linear(x, self.root.get_submodule(name).weight)


class ScaleParamOps(ParamOps):
    """:class:`benchmarks.models.ParamOps` plus GroupNorm and the tied head."""

    def group_norm(self, name: str, x: torch.Tensor, *, groups: int) -> torch.Tensor:
        return PF.group_norm(self._sub(name), x, groups)

    def tied_linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``PF.linear`` on the weight of layer ``name`` (the same leaf: a tied weight)."""
        return PF.linear({"weight": self.params[name + ".weight"]}, x)


class ScaleNet(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.arch(ScaleModuleOps(self), x)


def _functional_scale(arch: Any) -> Any:
    return lambda params, x: arch(ScaleParamOps(params), x)


# ------------------------------------------------------------------------- architectures


def gpt2(ops: Any, idx: torch.Tensor, *, blocks: int, heads: int) -> torch.Tensor:
    """``idx [B, T] -> logits [B, T, V]`` (one example: ``[T] -> [T, V]``)."""
    # a real [B, T] tensor, not a stride-0 expansion: Opacus's ghost-clipping embedding norm
    # views the ids as [-1, 1] and refuses an expanded tensor
    pos = torch.arange(idx.shape[-1], device=idx.device).expand_as(idx).contiguous()
    h = ops.embedding("tok", idx) + ops.embedding("pos", pos)  # [..., T, D]
    d = h.shape[-1]
    for i in range(blocks):
        a = ops.layer_norm(f"b{i}.ln1", h, shape=(d,))
        q, k, v = ops.linear(f"b{i}.qkv", a).unflatten(-1, (3, heads, d // heads)).unbind(-3)
        q, k, v = (t.transpose(-3, -2) for t in (q, k, v))  # [..., heads, T, D / heads]
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + ops.linear(f"b{i}.proj", att.transpose(-3, -2).flatten(-2))
        m = ops.layer_norm(f"b{i}.ln2", h, shape=(d,))
        h = h + ops.linear(f"b{i}.fc2", F.gelu(ops.linear(f"b{i}.fc1", m)))
    return ops.tied_linear("tok", ops.layer_norm("ln_f", h, shape=(d,)))


def wrn(ops: Any, x: torch.Tensor, *, groups: int, blocks: int) -> torch.Tensor:
    """``x [B, 3, H, W] -> [B, 10]`` (one example: ``[3, H, W] -> [10]``)."""
    single = x.dim() == 3
    h = ops.conv2d("stem", x.unsqueeze(0) if single else x, padding=1)
    for g, stride in enumerate((1, 2, 2)):
        for b in range(blocks):
            name, s = f"g{g}b{b}", stride if b == 0 else 1
            a = torch.relu(ops.group_norm(f"{name}.gn1", h, groups=groups))
            y = ops.conv2d(f"{name}.conv1", a, stride=s, padding=1)
            y = torch.relu(ops.group_norm(f"{name}.gn2", y, groups=groups))
            y = ops.conv2d(f"{name}.conv2", y, padding=1)
            short = ops.conv2d(f"{name}.short", a, stride=s) if b == 0 else h
            h = short + y
    h = torch.relu(ops.group_norm("gn", h, groups=groups)).mean((-2, -1))  # [N, C]
    out = ops.linear("fc", h)
    return out[0] if single else out


# ------------------------------------------------------------------------ configurations


def _gpt2_layers(vocab: int, d: int, ff: int, steps: int, blocks: int) -> dict[str, nn.Module]:
    layers: dict[str, nn.Module] = dict(tok=nn.Embedding(vocab, d), pos=nn.Embedding(steps, d))
    for i in range(blocks):
        layers.update({
            f"b{i}.ln1": nn.LayerNorm(d), f"b{i}.qkv": nn.Linear(d, 3 * d), f"b{i}.proj": nn.Linear(d, d),
            f"b{i}.ln2": nn.LayerNorm(d), f"b{i}.fc1": nn.Linear(d, ff), f"b{i}.fc2": nn.Linear(ff, d),
        })
    layers["ln_f"] = nn.LayerNorm(d)
    return layers


def _wrn_layers(widths: tuple[int, ...], stem: int, groups: int, blocks: int) -> dict[str, nn.Module]:
    layers: dict[str, nn.Module] = dict(stem=nn.Conv2d(3, stem, 3, padding=1, bias=False))
    c = stem
    for g, (w, stride) in enumerate(zip(widths, (1, 2, 2))):
        for b in range(blocks):
            name, s = f"g{g}b{b}", stride if b == 0 else 1
            layers[f"{name}.gn1"] = nn.GroupNorm(groups, c)
            layers[f"{name}.conv1"] = nn.Conv2d(c, w, 3, stride=s, padding=1, bias=False)
            layers[f"{name}.gn2"] = nn.GroupNorm(groups, w)
            layers[f"{name}.conv2"] = nn.Conv2d(w, w, 3, padding=1, bias=False)
            if b == 0:  # the shape changes in every group's first block (16 -> 64 as well)
                layers[f"{name}.short"] = nn.Conv2d(c, w, 1, stride=s, bias=False)
            c = w
    layers.update(gn=nn.GroupNorm(groups, c), fc=nn.Linear(c, 10))
    return layers


def _nested(layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Dotted names -> nested ``nn.ModuleDict``s (``add_module`` refuses dots)."""
    root: dict[str, Any] = {}
    for name, layer in layers.items():
        *path, last = name.split(".")
        node = root
        for part in path:
            node = node.setdefault(part, {})
        node[last] = layer

    def build(node: dict[str, Any]) -> Any:
        return {k: nn.ModuleDict(build(v)) if isinstance(v, dict) else v for k, v in node.items()}

    return build(root)


def scale_configs(quick: bool) -> dict[str, dict[str, Any]]:
    """name -> configuration (see :mod:`benchmarks.methods`), with ``batches``, the default
    batch sizes; ``quick``: tiny sizes, the same architectures."""
    if quick:
        vocab, d, heads, ff, steps, blocks = 64, 16, 2, 32, 8, 2
        widths, stem, groups, wrn_blocks, hw = (8, 8, 16), 4, 2, 1, 8
        gpt_batches, wrn_batches = (2,), (2,)
    else:
        vocab, d, heads, ff, steps, blocks = 8192, 768, 12, 3072, 128, 2
        widths, stem, groups, wrn_blocks, hw = (64, 128, 256), 16, 16, 2, 32
        gpt_batches, wrn_batches = (4, 8), (16, 32)

    def gpt2_arch(ops: Any, idx: torch.Tensor) -> torch.Tensor:
        return gpt2(ops, idx, blocks=blocks, heads=heads)

    def wrn_arch(ops: Any, x: torch.Tensor) -> torch.Tensor:
        return wrn(ops, x, groups=groups, blocks=wrn_blocks)

    def gpt2_net() -> Net:
        return ScaleNet(gpt2_arch, _nested(_gpt2_layers(vocab, d, ff, steps, blocks)))

    def wrn_net() -> Net:
        return ScaleNet(wrn_arch, _nested(_wrn_layers(widths, stem, groups, wrn_blocks)))

    depth = 6 * wrn_blocks + 4
    return {
        "GPT2": dict(
            desc=(f"GPT-2-shaped, {blocks} blocks: Embedding({vocab}, {d}) + positions, {heads}-head causal "
                  f"SDPA, MLP {d}-{ff}-{d} GELU, pre-LayerNorm, head tied to the token embedding, "
                  f"idx [B, {steps}] -> logits [B, {steps}, {vocab}]"),
            nn=gpt2_net, fn=_functional_scale(gpt2_arch),
            x=lambda b: torch.randint(0, vocab, (b, steps)), batches=gpt_batches,
            notes=TIED_HEAD_NOTES,
        ),
        "WRN16-4": dict(
            desc=(f"WRN-{depth} widths {stem}-{'-'.join(map(str, widths))}, GroupNorm({groups}) + ReLU, "
                  f"1x1 conv shortcuts, avgpool, Linear({widths[-1]}, 10), x [B, 3, {hw}, {hw}]"),
            nn=wrn_net, fn=_functional_scale(wrn_arch),
            x=lambda b: torch.randn(b, 3, hw, hw), batches=wrn_batches,
        ),
    }


__all__ = ["SCALE_METHODS", "scale_configs", "gpt2", "wrn", "ModuleOps", "ParamOps"]
