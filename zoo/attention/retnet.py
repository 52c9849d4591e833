"""RetNet's retention (Sun et al. 2023) as a gated linear recurrence: a
fixed decay per head, S_t = gamma_h S_{t-1} + k_t v_t^T, o_t = S_t^T q_t."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from zoo import registry
from zoo.attention.recurrence import (GatedRecurrence, HeadNorm,
                                      RecurrencePart, head_projection)


@registry.register("attention", "retnet")
@dataclasses.dataclass(frozen=True)
class RetNet(GatedRecurrence):
  """Retention: a recurrence with the fixed decay gamma_h = 1 - 2^(-5-h)
  of kv head h (its state's head), keys scaled by head_dim^-1/2, then a
  GroupNorm of each head's output and a swish output gate, out *
  silu(W_G x), as the paper's multi-scale retention.

  The paper's xPos relative position is what rotary positions
  (`position='rope'`) give here: rotating q and k before the recurrence
  makes q_t.k_s depend on t - s only, so this op takes rotary positions
  as well as none and absolute. Not as the paper: values have the head
  dim (the paper doubles it), the decays run over the kv heads (with fewer
  kv heads than heads, query heads of a group share theirs), and no short
  convolution by default (`short_conv`, as the paper)."""

  positions = frozenset({"none", "absolute", "rotary"})

  def layer_part(self, *, embed_dim, num_heads, num_kv_heads, head_dim, rngs,
                 dtype, param_dtype):
    return RetNetPart(embed_dim=embed_dim, short_conv=self.short_conv,
                      num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=head_dim, rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype)


def log_decays(kv_heads: int) -> np.ndarray:
  """log gamma_h = log(1 - 2^(-5-h)) of each kv head, float32."""
  return np.log1p(-2.0 ** (-5.0 - np.arange(kv_heads))).astype(np.float32)


class RetNetPart(RecurrencePart):
  """Scaled keys and the fixed log decays in; GroupNorm and the swish
  output gate out."""

  def __init__(self, *, embed_dim, short_conv, num_heads, num_kv_heads,
               head_dim, rngs, dtype, param_dtype):
    super().__init__(short_conv=short_conv, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs,
                     dtype=dtype, param_dtype=param_dtype)
    self.gate = head_projection(embed_dim, num_heads, head_dim, rngs=rngs,
                                dtype=dtype, param_dtype=param_dtype)
    self.norm = HeadNorm(num_heads, head_dim, centre=True, dtype=dtype,
                         param_dtype=param_dtype)

  def prepare(self, x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK):
    b, t, g, d = k_BxTxGxK.shape
    g_BxTxG = jnp.broadcast_to(log_decays(g), (b, t, g))
    return q_BxTxHxK, k_BxTxGxK * d**-0.5, v_BxTxGxK, {"g": g_BxTxG}

  def output(self, x_BxTxD, out_BxTxHxK):
    return self.norm(out_BxTxHxK) * jax.nn.silu(self.gate(x_BxTxD))
