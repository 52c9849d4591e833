"""Rotary position embedding (RoPE, Su et al. 2021).

Convention: half split (GPT-NeoX, Llama). Head dim i < K/2 is paired with
i + K/2, and the pair is rotated by the angle pos * theta^(-2i/K):

    out[i]       = x[i] cos(a_i) - x[i + K/2] sin(a_i)
    out[i + K/2] = x[i + K/2] cos(a_i) + x[i] sin(a_i)

so q.k after rotation depends on positions only through their offset.
"""

import jax.numpy as jnp

from zoo import registry
from zoo.position.base import Position


def rotate_half_split(x_BxTxHxK, positions_T, theta: float):
  """Rotates pairs (i, i + K/2) of the last axis by positions_T * freq_i, in
  fp32; the output has the input's dtype."""
  k = x_BxTxHxK.shape[-1]
  inv_freq_Half = theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)
  angles_TxHalf = positions_T.astype(jnp.float32)[:, None] * inv_freq_Half
  cos_1xTx1xHalf = jnp.cos(angles_TxHalf)[None, :, None, :]
  sin_1xTx1xHalf = jnp.sin(angles_TxHalf)[None, :, None, :]
  x1, x2 = jnp.split(x_BxTxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_1xTx1xHalf - x2 * sin_1xTx1xHalf,
                         x2 * cos_1xTx1xHalf + x1 * sin_1xTx1xHalf], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


@registry.register("position", "rope")
class Rope(Position):
  """Rotary embeddings: q and k rotated by position (half-split pairs);
  relative, any length, no parameters."""

  kind = "rotary"

  def __init__(self, theta: float = 10000.0, *, embed_dim: int,
               num_heads: int, **context):
    del context
    head_dim = embed_dim // num_heads
    if head_dim % 2:
      raise ValueError(
          f"position rope needs an even head_dim; model.embed_dim={embed_dim} "
          f"// model.num_heads={num_heads} = {head_dim}")
    if theta <= 0:
      raise ValueError(f"position rope(theta={theta}) must be > 0")
    self.theta = float(theta)

  def rotate(self, x_BxTxHxK, positions_T):
    return rotate_half_split(x_BxTxHxK, positions_T, self.theta)
