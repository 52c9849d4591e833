"""No positions, and absolute encodings added to the token embeddings.

`embed(x_BxTxD, offset, max_len)` places x's rows at positions offset ..
offset + T - 1 of a sequence of at most max_len (T by default); decoding
passes the cache's position as a traced offset and its capacity as max_len,
so the rows come from the same table a full forward pass reads.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo import registry
from zoo.sharding import logical
from zoo.position.base import EMBED_STD, Position


@registry.register("position", "none")
class NoPosition(Position):
  """No positional information: attention stays permutation-equivariant."""

  def __init__(self, **context):
    del context


def sinusoid_table(length: int, dim: int, max_scale: float) -> np.ndarray:
  """LxD table of sin (first half) and cos (second half) at geometric
  frequencies, as in Vaswani et al. 2017."""
  half = dim // 2
  inv_freq = max_scale ** (-np.arange(half) / max(half - 1, 1))
  angles_LxHalf = np.arange(length)[:, None] * inv_freq[None, :]
  table = np.zeros((length, dim), np.float32)
  table[:, :half] = np.sin(angles_LxHalf)
  table[:, half:2 * half] = np.cos(angles_LxHalf)
  return table


@registry.register("position", "sinusoidal")
class Sinusoidal(Position):
  """Fixed sinusoidal embeddings (Vaswani et al. 2017); any length."""

  kind = "absolute"

  def __init__(self, max_scale: float = 10000.0, *, embed_dim: int, **context):
    del context
    self.max_scale = max_scale
    self.embed_dim = embed_dim

  def embed(self, x_BxTxD, offset=0, max_len=None):
    t = x_BxTxD.shape[1]
    table_LxD = sinusoid_table(max_len or t, self.embed_dim, self.max_scale)
    rows_TxD = jax.lax.dynamic_slice_in_dim(
        jnp.asarray(table_LxD, x_BxTxD.dtype), offset, t)
    return x_BxTxD + rows_TxD[None]


@registry.register("position", "learned")
class Learned(Position):
  """A learned vector per absolute position; `max_len` defaults to the
  model's sequence length and may not be shorter. Initialised at the token
  embeddings' scale (std 1.0), not GPT-2's 0.02 (which, beside unit-scale
  tokens, starts positions 50x weaker)."""

  kind = "absolute"

  def __init__(self, max_len: int | None = None, *, embed_dim: int,
               seq_len: int, rngs: nnx.Rngs, param_dtype=jnp.float32,
               **context):
    del context
    max_len = seq_len if max_len is None else max_len
    if max_len < seq_len:
      raise ValueError(
          f"position learned(max_len={max_len}) is shorter than the sequence "
          f"length {seq_len}; use max_len >= {seq_len} or a relative encoding "
          "(rope, alibi, t5)")
    init = logical(nnx.initializers.normal(EMBED_STD), None, "embed")
    self.table = nnx.Param(init(rngs.params(), (max_len, embed_dim),
                                param_dtype))

  def embed(self, x_BxTxD, offset=0, max_len=None):
    t = x_BxTxD.shape[1]
    if max(t, max_len or 0) > self.table.shape[0]:
      raise ValueError(f"position learned: sequence of {max(t, max_len or 0)}"
                       f" is longer than the table of {self.table.shape[0]}")
    rows_TxD = jax.lax.dynamic_slice_in_dim(self.table[...], offset, t)
    return x_BxTxD + rows_TxD.astype(x_BxTxD.dtype)[None]

  def max_length(self):
    return self.table.shape[0]
