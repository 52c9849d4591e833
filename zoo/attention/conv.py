"""A short-convolution layer for hybrid stacks: no attention at all.

Zoology's associative-recall models put a short convolution layer before
the sequence mixer under test (its BaseConv): with it, the value token
after a key can carry that key, and one mixer layer can then look the key
up. `conv` is that layer in the zoo's stacks, `'conv;gla'` or
`'conv;standard'`: each position's output is its own value after a causal
depthwise convolution of the values (`parts.ShortConv`, SiLU); queries
and keys are not used. Zoology's BaseConv also multiplies by a second
projection of x (a gate); this layer keeps the plain convolution, the
block's MLP being the nonlinearity after it.

Shapes: B batch, T length, H query heads, G kv heads, K head dim.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo import registry
from zoo.attention import parts
from zoo.attention.base import POSITION_KINDS, AttentionOp, LayerPart


@registry.register("attention", "conv")
@dataclasses.dataclass(frozen=True)
class Conv(AttentionOp):
  """No attention: out_t = v_t after a causal depthwise convolution of
  width `width` (SiLU) over the values, each query head reading its kv
  head. A layer of hybrid stacks ('conv;standard'), as Zoology's BaseConv
  layer before the mixer under test. Causal only; its decode state is
  the convolution's last width - 1 values."""

  width: int = 4

  positions = frozenset(POSITION_KINDS)  # q and k, where positions go, unused
  any_value_dim = True

  def __post_init__(self):
    if self.width < 1:
      raise ValueError(
          f"attention conv(width=...) must be >= 1; got {self.width}")

  def allows(self, i, j, *, t, causal, num_heads):
    del t, num_heads, causal
    return (np.asarray(i) == np.asarray(j))[None]

  def layer_part(self, *, embed_dim, num_heads, num_kv_heads, head_dim, rngs,
                 dtype, param_dtype):
    del embed_dim, num_heads
    return ValueConv(channels=num_kv_heads * head_dim, width=self.width,
                     rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def attend(self, q, k, v, *, causal, mask, bias, **gates):
    del k, bias, gates
    if not causal:
      raise ValueError("attention conv is causal; it has no bidirectional "
                       "form (use it in a decoder)")
    if q.shape[1] != v.shape[1]:
      raise ValueError(f"attention conv needs q_len == kv_len; got "
                       f"{q.shape[1]} and {v.shape[1]}")
    out = _per_query_head(v, q.shape[2])
    if mask is not None:
      out = jnp.where(mask[..., None, None], out, 0)
    return out.astype(q.dtype)

  def init_state(self, batch, capacity, kv_heads, head_dim, dtype):
    """None: the convolution's state is the layer part's."""
    del batch, capacity, kv_heads, head_dim, dtype
    return None

  def state_size(self, length, kv_heads, head_dim):
    del length
    return (self.width - 1) * kv_heads * head_dim

  def prefill(self, state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, *, index, bias,
              **gates):
    del k_BxTxGxK, index, bias, gates
    return _per_query_head(v_BxTxGxK, q_BxTxHxK.shape[2]).astype(
        q_BxTxHxK.dtype), state

  def decode_step(self, state, q_BxHxK, k_BxGxK, v_BxGxK, *, index, bias,
                  **gates):
    del k_BxGxK, index, bias, gates
    return _per_query_head(v_BxGxK[:, None], q_BxHxK.shape[1])[:, 0].astype(
        q_BxHxK.dtype), state


def _per_query_head(v_BxTxGxK, num_heads: int):
  """BxTxGxK -> BxTxHxK, each kv head repeated for its query heads."""
  return jnp.repeat(v_BxTxGxK, num_heads // v_BxTxGxK.shape[2], axis=2)


class ValueConv(LayerPart):
  """The short convolution on v (its decode state: the last width - 1
  values)."""

  def __init__(self, *, channels: int, width: int, rngs: nnx.Rngs, dtype,
               param_dtype):
    self.conv = parts.ShortConv(channels, width, rngs=rngs, dtype=dtype,
                                param_dtype=param_dtype)

  def inputs(self, x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, state):
    del x_BxTxD
    b, t = v_BxTxGxK.shape[:2]
    y, state = self.conv(v_BxTxGxK.reshape(b, t, -1), state)
    return q_BxTxHxK, k_BxTxGxK, y.reshape(v_BxTxGxK.shape), {}, state

  def init_state(self, batch, dtype):
    return self.conv.init_state(batch, dtype)
