"""Layer parts shared by the linear families: the short convolution.

A short convolution (causal, depthwise, a few positions wide, then SiLU) on
each of q, k and v lets a position mix in its last few neighbours before
the recurrence sees it; Zoology's and flash-linear-attention's linear
baselines all have one, and associative recall depends on it. Its decode
state is the last kernel - 1 inputs.

Shapes: B batch, T length, C channels (heads x head dim), W kernel width.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.attention.base import LayerPart


class ShortConv(nnx.Module):
  """y_t = silu(sum_w kernel[w] * x_{t - W + 1 + w}) per channel."""

  def __init__(self, channels: int, width: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.width, self.dtype = width, dtype
    self.kernel_CxW = nnx.Param(nnx.initializers.normal(width**-0.5)(
        rngs.params(), (channels, width), param_dtype))

  def __call__(self, x_BxTxC, state_BxCxV=None):
    """(y_BxTxC, state): the convolution over T new inputs after the V =
    W - 1 held in `state` (zeros for None), and the last V inputs."""
    b, t, c = x_BxTxC.shape
    v = self.width - 1
    held_BxVxC = (jnp.zeros((b, v, c), x_BxTxC.dtype) if state_BxCxV is None
                  else state_BxCxV.transpose(0, 2, 1).astype(x_BxTxC.dtype))
    full_BxUxC = jnp.concatenate([held_BxVxC, x_BxTxC], axis=1)
    kernel_CxW = self.kernel_CxW[...].astype(self.dtype)
    y_BxTxC = sum(full_BxUxC[:, w:w + t] * kernel_CxW[:, w]
                  for w in range(self.width))
    return jax.nn.silu(y_BxTxC), full_BxUxC[:, t:].transpose(0, 2, 1)

  def init_state(self, batch: int, dtype):
    return jnp.zeros((batch, self.kernel_CxW.shape[0], self.width - 1), dtype)


class ConvPart(LayerPart):
  """A short convolution on each of q, k and v (`width` 0: none)."""

  def __init__(self, *, num_heads: int, num_kv_heads: int, head_dim: int,
               width: int, rngs: nnx.Rngs, dtype, param_dtype):
    conv = lambda heads: ShortConv(heads * head_dim, width, rngs=rngs,
                                   dtype=dtype, param_dtype=param_dtype)
    self.q_conv, self.k_conv, self.v_conv = (
        conv(num_heads), conv(num_kv_heads), conv(num_kv_heads))

  def inputs(self, x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, state):
    del x_BxTxD
    held = (None,) * 3 if state is None else state
    out, new = [], []
    for conv, x, h in zip((self.q_conv, self.k_conv, self.v_conv),
                          (q_BxTxHxK, k_BxTxGxK, v_BxTxGxK), held):
      b, t = x.shape[:2]
      y, s = conv(x.reshape(b, t, -1), h)
      out.append(y.reshape(x.shape))
      new.append(s)
    return (*out, {}, tuple(new))

  def init_state(self, batch, dtype):
    return tuple(c.init_state(batch, dtype)
                 for c in (self.q_conv, self.k_conv, self.v_conv))
