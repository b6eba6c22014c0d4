"""``expand_weights``: turn the layers of a ``torch.nn`` model into ``psgfunc.nn`` shells.

Conversion is table-driven: :data:`CONVERTERS` maps a ``torch.nn`` layer type (matched
exactly, so a subclass with its own forward is never converted by mistake) to a function
``(layer, max_batch_size) -> shell``. To support another layer, add an entry::

    from psgfunc.nn.convert import CONVERTERS
    CONVERTERS[nn.LSTM] = lambda layer, max_batch_size: DPLSTM.from_lstm(layer, max_batch_size)

A converter must return a shell (a :class:`~psgfunc.nn._base.ExpandedModule`) that holds the
layer's own ``Parameter`` objects (use :func:`adopt_parameters`) and must raise ValueError,
saying why, for a configuration it cannot serve.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from psgfunc.nn import _forward
from psgfunc.nn._base import ExpandedModule, check_max_batch_size
from psgfunc.nn.attention import DPMultiheadAttention
from psgfunc.nn.conv import Conv1d, Conv2d, Conv3d
from psgfunc.nn.conv_transpose import ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from psgfunc.nn.embedding import Embedding
from psgfunc.nn.embedding_bag import EmbeddingBag
from psgfunc.nn.generic import install_outside_shells, make_generic
from psgfunc.nn.linear import Linear
from psgfunc.nn.lstm import DPLSTM, DPLSTMCell
from psgfunc.nn.normalization import (
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
)
from psgfunc.nn.recurrent import DPGRU, DPRNN, DPGRUCell, DPRNNCell

__all__ = ["expand_weights", "CONVERTERS", "HINTS", "adopt_parameters", "move_hooks"]

Converter = Callable[[nn.Module, int], nn.Module]


def adopt_parameters(shell: nn.Module, layer: nn.Module) -> nn.Module:
    """Move ``layer``'s ``Parameter`` objects and buffers into ``shell``; copy ``training``.

    ``shell`` is built with the same constructor arguments (best on ``device="meta"``: no
    memory, no draw from the random generator), so its parameter names match ``layer``'s.
    The very same ``Parameter`` objects end up in ``shell``: an optimizer built on the model
    before the conversion keeps updating the right tensors.
    """
    for registry in ("_parameters", "_buffers"):
        mine, theirs = getattr(shell, registry), getattr(layer, registry)
        if list(mine) != list(theirs):
            raise ValueError(
                f"adopt_parameters: {type(shell).__name__} has {registry[1:]} {list(mine)} but "
                f"{type(layer).__name__} has {list(theirs)}; build the shell with the layer's "
                "constructor arguments"
            )
        for name, value in theirs.items():
            mine[name] = value
    shell.train(layer.training)
    return shell


_HOOKS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
"""``nn.Module``'s per-module hook registries (dicts keyed by the handles' ids)."""


def move_hooks(layer: nn.Module, shell: nn.Module) -> None:
    """Move ``layer``'s module hooks to ``shell``, which replaces it in the model.

    The registries themselves move (the same dict objects, the shell's own hooks added
    after the layer's), so the ``RemovableHandle`` each registration returned, which
    refers to its dict, still removes the hook; ``layer`` is left with empty ones. A
    conversion that dropped them would silently stop a hook the user relies on (a feature
    extractor's forward hook, a gradient monitor's backward hook).
    """
    for name in _HOOKS:
        theirs = getattr(layer, name, None)
        if not theirs:  # none registered (or a torch without this registry)
            continue
        mine = getattr(shell, name, None)
        if mine:
            theirs.update(mine)
        setattr(shell, name, theirs)
        setattr(layer, name, type(theirs)())
        if name == "_backward_hooks":
            shell._is_full_backward_hook = layer._is_full_backward_hook


def _dtype(layer: nn.Module) -> Any:
    p = next(layer.parameters(recurse=False), None)
    return None if p is None else p.dtype


def _linear(layer: nn.Linear, max_batch_size: int) -> nn.Module:
    shell = Linear(
        layer.in_features,
        layer.out_features,
        max_batch_size,
        bias=layer.bias is not None,
        device="meta",
        dtype=_dtype(layer),
    )
    return adopt_parameters(shell, layer)


def _conv(cls: type) -> Converter:
    def convert(layer: nn.Module, max_batch_size: int) -> nn.Module:
        shell = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            max_batch_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device="meta",
            dtype=_dtype(layer),
        )
        return adopt_parameters(shell, layer)

    return convert


def _embedding(layer: nn.Embedding, max_batch_size: int) -> nn.Module:
    shell = Embedding(
        layer.num_embeddings,
        layer.embedding_dim,
        max_batch_size,
        padding_idx=layer.padding_idx,
        max_norm=layer.max_norm,
        norm_type=layer.norm_type,
        scale_grad_by_freq=layer.scale_grad_by_freq,
        sparse=layer.sparse,
        device="meta",
        dtype=_dtype(layer),
    )
    return adopt_parameters(shell, layer)


def _conv_transpose(cls: type) -> Converter:
    def convert(layer: nn.Module, max_batch_size: int) -> nn.Module:
        shell = cls(
            layer.in_channels, layer.out_channels, layer.kernel_size, max_batch_size,
            stride=layer.stride, padding=layer.padding, output_padding=layer.output_padding,
            groups=layer.groups, bias=layer.bias is not None, dilation=layer.dilation,
            padding_mode=layer.padding_mode, device="meta", dtype=_dtype(layer),
        )
        return adopt_parameters(shell, layer)

    return convert


def _embedding_bag(layer: nn.EmbeddingBag, max_batch_size: int) -> nn.Module:
    shell = EmbeddingBag(
        layer.num_embeddings, layer.embedding_dim, max_batch_size, max_norm=layer.max_norm,
        norm_type=layer.norm_type, scale_grad_by_freq=layer.scale_grad_by_freq, mode=layer.mode,
        sparse=layer.sparse, include_last_offset=layer.include_last_offset,
        padding_idx=layer.padding_idx, device="meta", dtype=_dtype(layer),
    )
    return adopt_parameters(shell, layer)


def _layer_norm(layer: nn.LayerNorm, max_batch_size: int) -> nn.Module:
    shell = LayerNorm(
        layer.normalized_shape,
        max_batch_size,
        eps=layer.eps,
        elementwise_affine=layer.elementwise_affine,
        device="meta",
        dtype=_dtype(layer),
        bias=getattr(layer, "bias", None) is not None,
    )
    return adopt_parameters(shell, layer)


def _group_norm(layer: nn.GroupNorm, max_batch_size: int) -> nn.Module:
    shell = GroupNorm(
        layer.num_groups,
        layer.num_channels,
        max_batch_size,
        eps=layer.eps,
        affine=layer.affine,
        device="meta",
        dtype=_dtype(layer),
        bias=getattr(layer, "bias", None) is not None,
    )
    return adopt_parameters(shell, layer)


def _instance_norm(cls: type) -> Converter:
    def convert(layer: nn.Module, max_batch_size: int) -> nn.Module:
        if layer.track_running_stats:
            raise ValueError(
                "with track_running_stats=True it keeps running statistics averaged over "
                "the examples of each batch, a release of the training data outside DP-SGD's "
                "accounting; build it with track_running_stats=False"
            )
        shell = cls(
            layer.num_features,
            max_batch_size,
            eps=layer.eps,
            momentum=layer.momentum,
            affine=layer.affine,
            device="meta",
            dtype=_dtype(layer),
            bias=getattr(layer, "bias", None) is not None,
        )
        return adopt_parameters(shell, layer)

    return convert


def _rms_norm(layer: nn.RMSNorm, max_batch_size: int) -> nn.Module:
    shell = RMSNorm(
        layer.normalized_shape,
        max_batch_size,
        eps=layer.eps,
        elementwise_affine=layer.elementwise_affine,
        device="meta",
        dtype=_dtype(layer),
    )
    return adopt_parameters(shell, layer)


CONVERTERS: dict[type, Converter] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv(Conv1d),
    nn.Conv2d: _conv(Conv2d),
    nn.Conv3d: _conv(Conv3d),
    nn.Embedding: _embedding,
    nn.EmbeddingBag: _embedding_bag,  # refuses max_norm, scale_grad_by_freq, sparse
    nn.ConvTranspose1d: _conv_transpose(ConvTranspose1d),
    nn.ConvTranspose2d: _conv_transpose(ConvTranspose2d),
    nn.ConvTranspose3d: _conv_transpose(ConvTranspose3d),
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.InstanceNorm1d: _instance_norm(InstanceNorm1d),  # refuses track_running_stats=True
    nn.InstanceNorm2d: _instance_norm(InstanceNorm2d),
    nn.InstanceNorm3d: _instance_norm(InstanceNorm3d),
    nn.RMSNorm: _rms_norm,
    nn.LSTM: DPLSTM.from_lstm,  # refuses proj_size != 0
    nn.LSTMCell: DPLSTMCell.from_lstm_cell,
    nn.GRU: DPGRU.from_gru,
    nn.RNN: DPRNN.from_rnn,
    nn.GRUCell: DPGRUCell.from_gru_cell,
    nn.RNNCell: DPRNNCell.from_rnn_cell,
    nn.MultiheadAttention: DPMultiheadAttention.from_multihead_attention,
}
"""``torch.nn`` type (exact) -> ``(layer, max_batch_size) -> shell``. Add entries to extend."""

HINTS: dict[type, str] = {
    nn.LSTM: "use psgfunc.nn.DPLSTM",
    nn.LSTMCell: "use psgfunc.nn.DPLSTMCell",
}
"""Extra advice, by exact type, for layers with parameters that have no converter."""


def _refusal(layer: nn.Module) -> str | None:
    """Why ``layer`` (without a converter) cannot be kept, or None when it is fine as is."""
    if isinstance(layer, _BatchNorm):
        return (
            "it normalises with statistics over the whole batch, so every output mixes "
            "examples and per-sample gradients do not exist; replace it with nn.GroupNorm("
            "num_groups, num_channels) (expand_weights converts it to psgfunc.nn.GroupNorm, "
            "affine parameters included), nn.LayerNorm or nn.InstanceNorm2d, which normalise "
            "each example on its own"
        )
    if isinstance(layer, _InstanceNorm) and layer.track_running_stats:
        return (
            "with track_running_stats=True it keeps running statistics averaged over "
            "the examples of each batch, a release of the training data outside DP-SGD's "
            "accounting; build it with track_running_stats=False"
        )
    return None


def _needs_generic(layer: nn.Module) -> bool:
    """Whether ``layer`` (without a converter) has trainable parameters of its own: it then
    becomes a :class:`~psgfunc.nn.generic.Generic` shell (its ops reach the op-level rules)."""
    return any(p.requires_grad for p in layer.parameters(recurse=False))


def expand_weights(module: nn.Module, max_batch_size: int) -> nn.Module:
    """Convert ``module``'s layers, in place and recursively, into ``psgfunc.nn`` shells.

    Every submodule whose exact type is in :data:`CONVERTERS` (``nn.Linear``,
    ``nn.Conv1d/2d/3d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.GroupNorm``,
    ``nn.InstanceNorm1d/2d/3d``, ``nn.RMSNorm``, ``nn.LSTM``, ``nn.LSTMCell``, ``nn.GRU``,
    ``nn.RNN``, ``nn.GRUCell``, ``nn.RNNCell``, ``nn.MultiheadAttention``: so
    ``nn.TransformerEncoderLayer``/``DecoderLayer`` with ``batch_first=True``) is
    replaced in its parent by the matching shell, which holds the SAME ``Parameter`` objects (no copy: values, ``requires_grad``
    and any optimizer already built on the model carry over) and the layer's ``training``
    flag. Outputs are unchanged; after ``loss.backward()`` on a batch of ``B <=
    max_batch_size`` examples every converted parameter has ``.grad_sample [B, *p.shape]``.
    Shells already in the model get the new ``max_batch_size``. Parameter-free layers (ReLU,
    Dropout, Flatten, pooling, ...) and layers whose parameters are all frozen stay as they
    are.

    Any other module with trainable parameters of its own (HF GPT-2's ``Conv1D``, HF
    ``LlamaRMSNorm``, a custom ``LayerScale``, a subclass of a converted type) becomes a
    :class:`~psgfunc.nn.generic.Generic` shell in place (:func:`~psgfunc.nn.generic.make_generic`:
    its class is swapped, the object, its ``Parameter`` objects and ``state_dict`` keys stay):
    its own forward runs under vmap over the examples with expanded parameters, so the torch
    ops that take a parameter (matmul/addmm/einsum, ``F.linear``, elementwise ``*``/``+``,
    norms, convolutions...) reach psgfunc's op-level rules; an op without a rule falls back
    to torch's vmap (exact, materialised) with a warning naming it.

    Plain torch ops on the model's trainable parameters outside any shell, in the returned
    model's forward (a module without parameters of its own that ties its head to the
    embedding: ``F.linear(h, self.emb.weight)``, ``h @ self.emb.weight.T``,
    ``self.emb.weight * x``), are served the same way while that forward runs: each op that
    has an op-level rule runs with the parameter expanded and hooked, under vmap over the
    examples, so its per-sample gradient (or fast-clipping pieces) joins the shells' for
    the same ``Parameter``. An op without a rule, or without an input batched like the
    forward, runs unchanged, and the backward then raises the ValueError naming the fix
    (see :mod:`psgfunc.nn.generic`).

    Nothing is converted unless everything can be: a model with a layer that cannot give
    per-sample gradients raises one ValueError listing every such layer by its qualified
    name (``"features.3"``): BatchNorm (any variant; it mixes examples), InstanceNorm with
    running statistics, and a converted type in a configuration its shell refuses
    (``nn.Embedding(max_norm=...)``).

    Module hooks registered on a replaced layer (forward, forward pre-, full backward and
    state-dict hooks) move to its shell (:func:`move_hooks`): they run on the shell as they
    ran on the layer, with the shell as their ``module`` argument, and the handles their
    registration returned still remove them.

    The returned model gets a forward pre-hook and a forward hook (added once, also on a
    model built from shells) that keep a record of each forward pass: every shell checks
    that it reads the forward's batch, and at the same dim as the layers whose outputs reach
    it (a time-major ``DPLSTM`` output read by a ``Linear`` raises a ValueError saying to use
    ``batch_first=True`` or to transpose); an ``Embedding`` given indices shared by every
    example (``[1, T]`` position ids) looks them up for each example of the forward. See
    :mod:`psgfunc.nn._forward`.

    What no conversion can see: an op between layers that mixes examples (``h -
    h.mean(0)``, a custom module that keeps batch statistics in a buffer) makes each
    example's gradient depend on the others, so clipping no longer bounds one example's
    influence. BatchNorm is refused for that reason; a module whose type is neither from
    ``torch`` nor a psgfunc shell and that holds buffers gets a ``UserWarning`` naming it and
    its buffers, to be checked by hand.

    Args:
        module: the model (changed in place).
        max_batch_size: the largest batch the model will see.

    Returns:
        ``module`` itself, or, when ``module`` is itself a convertible layer (e.g. a bare
        ``nn.Linear``), its new shell: always use the returned object.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: a non-positive ``max_batch_size``, or layers that cannot be converted
            (all listed, each with the reason and the fix).

    Warns:
        UserWarning: custom modules (types not from ``torch`` and not psgfunc shells) that
            hold buffers, each by qualified name with its buffer names.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"expand_weights: module must be a torch.nn.Module (the model to convert in "
            f"place), got {type(module).__name__} {module!r:.60}"
        )
    max_batch_size = check_max_batch_size(max_batch_size, "expand_weights")
    plan: list[tuple[nn.Module | None, str, nn.Module]] = []  # (parent or None for root, attr, shell)
    existing: list[ExpandedModule] = []  # shells already there: they get the new max_batch_size
    shells: dict[int, nn.Module] = {}  # id(layer) -> its shell (a layer used twice: one shell)
    problems: list[str] = []
    generic: list[nn.Module] = []  # modules with parameters and no converter: Generic shells
    buffered: list[str] = []  # custom modules with buffers: "qualname (Type): ['a', 'b']"
    seen: set[int] = set()
    converted: list[tuple[nn.Module, nn.Module]] = []  # (layer, its shell), once per layer

    def visit(parent: nn.Module | None, attr: str, qualname: str, layer: nn.Module) -> None:
        label = qualname or "<root>"
        if id(layer) not in seen and not isinstance(layer, ExpandedModule) and _custom(layer):
            names = [n for n, b in layer._buffers.items() if b is not None]
            if names:
                buffered.append(f"{label} ({type(layer).__name__}): {names}")
        if isinstance(layer, ExpandedModule):
            existing.append(layer)
            if getattr(layer, "_psg_serves_children", False):  # e.g. DPMultiheadAttention's out_proj
                return
        elif type(layer) in CONVERTERS:
            if id(layer) not in shells:
                try:
                    shells[id(layer)] = CONVERTERS[type(layer)](layer, max_batch_size)
                except ValueError as error:
                    problems.append(f"{label} ({type(layer).__name__}): {error}")
                    return
                converted.append((layer, shells[id(layer)]))
            plan.append((parent, attr, shells[id(layer)]))
            return
        else:
            reason = _refusal(layer)
            if reason is not None:
                if id(layer) not in seen:
                    problems.append(f"{label} ({type(layer).__name__}): {reason}")
                seen.add(id(layer))
                return
            if id(layer) not in seen and _needs_generic(layer):
                generic.append(layer)
        if id(layer) in seen:
            return
        seen.add(id(layer))
        # _modules, not named_children(): the latter drops a layer's second occurrence
        for name, child in layer._modules.items():
            if child is not None:
                visit(layer, name, f"{qualname}.{name}" if qualname else name, child)

    visit(None, "", "", module)
    if problems:
        raise ValueError(
            f"expand_weights: {len(problems)} layer(s) cannot give per-sample gradients; "
            "nothing was converted:\n  - " + "\n  - ".join(problems)
        )
    if buffered:
        warnings.warn(
            "expand_weights: custom module(s) hold buffers, which psgfunc cannot check: a "
            "buffer updated from the batch (running statistics, a memory of past inputs) "
            "mixes examples or releases data outside DP-SGD's accounting. Check that each one "
            "is constant or changes independently of the data (e.g. position ids):\n  - "
            + "\n  - ".join(buffered),
            UserWarning,
            stacklevel=2,
        )
    for layer in existing:
        layer.max_batch_size = max_batch_size
    for layer in generic:
        make_generic(layer, max_batch_size)  # in place: same object, same state_dict keys
    for layer, shell in converted:
        move_hooks(layer, shell)
    result = module
    for parent, attr, shell in plan:
        if parent is None:
            result = shell  # the root itself was a convertible layer
        else:
            setattr(parent, attr, shell)
    _forward.install(result)
    if not isinstance(result, ExpandedModule):  # a shell's (or generic shell's) forward serves itself
        install_outside_shells(result)  # plain ops on its parameters outside shells
    return result


def _custom(layer: nn.Module) -> bool:
    """Whether ``layer``'s type comes from neither torch nor psgfunc (user or third-party code)."""
    module = type(layer).__module__ or ""
    return not (module == "torch" or module.startswith(("torch.", "psgfunc.")))
