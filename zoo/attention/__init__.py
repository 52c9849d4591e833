"""Attention ops, one module per family; importing this registers them all."""

from zoo.attention import dense  # noqa: F401
from zoo.attention.base import AttentionOp, Bias, POSITION_KINDS  # noqa: F401
from zoo.attention import blockwise, local  # noqa: F401
from zoo.attention import linear, sparse  # noqa: F401
from zoo.attention import based, conv, gla, mamba2, retnet  # noqa: F401
from zoo.attention import deltanet, gated_deltanet  # noqa: F401
from zoo.attention import kernels  # noqa: F401
