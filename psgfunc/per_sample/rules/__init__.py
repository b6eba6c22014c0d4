"""Per-sample rules for the expanded method, one module per layer family.

Importing this package registers every rule with :mod:`psgfunc._rules`.
"""

from psgfunc.per_sample.rules import attention as _attention  # noqa: F401
from psgfunc.per_sample.rules import conv as _conv  # noqa: F401
from psgfunc.per_sample.rules import conv_transpose as _conv_transpose  # noqa: F401
from psgfunc.per_sample.rules import embedding as _embedding  # noqa: F401
from psgfunc.per_sample.rules import embedding_bag as _embedding_bag  # noqa: F401
from psgfunc.per_sample.rules import layer_norm as _layer_norm  # noqa: F401
from psgfunc.per_sample.rules import linear as _linear  # noqa: F401
from psgfunc.per_sample.rules import lstm as _lstm  # noqa: F401
from psgfunc.per_sample.rules import matmul as _matmul  # noqa: F401
from psgfunc.per_sample.rules import norms as _norms  # noqa: F401
from psgfunc.per_sample.rules import recurrent as _recurrent  # noqa: F401
