"""Pure layers: ``init_*`` builds a params dict named as torch.nn's state_dict; the layer computes.

Every layer is a plain function ``layer(params, x, ...)`` that accepts one example or a batch
wherever the matching torch op does, so it can be used under ``torch.func.vmap`` and
``torch.func.grad`` and inside :func:`psgfunc.per_sample_grads`.
"""

from psgfunc.functional.attention import init_multi_head_attention, multi_head_attention
from psgfunc.functional.conv import conv1d, conv2d, conv3d, init_conv
from psgfunc.functional.conv_transpose import (
    conv_transpose1d,
    conv_transpose2d,
    conv_transpose3d,
    init_conv_transpose,
)
from psgfunc.functional.embedding import embedding, init_embedding
from psgfunc.functional.embedding_bag import embedding_bag, init_embedding_bag
from psgfunc.functional.linear import init_linear, linear
from psgfunc.functional.lstm import init_lstm, init_lstm_cell, lstm, lstm_cell
from psgfunc.functional.normalization import (
    group_norm,
    init_group_norm,
    init_instance_norm,
    init_layer_norm,
    init_rms_norm,
    instance_norm,
    layer_norm,
    rms_norm,
)
from psgfunc.functional.recurrent import (
    gru,
    gru_cell,
    init_gru,
    init_gru_cell,
    init_rnn,
    init_rnn_cell,
    rnn,
    rnn_cell,
)

__all__ = [
    "linear",
    "init_linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "init_conv",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "init_conv_transpose",
    "embedding",
    "init_embedding",
    "embedding_bag",
    "init_embedding_bag",
    "layer_norm",
    "init_layer_norm",
    "group_norm",
    "init_group_norm",
    "instance_norm",
    "init_instance_norm",
    "rms_norm",
    "init_rms_norm",
    "lstm_cell",
    "lstm",
    "init_lstm",
    "init_lstm_cell",
    "gru_cell",
    "gru",
    "rnn_cell",
    "rnn",
    "init_gru",
    "init_gru_cell",
    "init_rnn",
    "init_rnn_cell",
    "multi_head_attention",
    "init_multi_head_attention",
]
