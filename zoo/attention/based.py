"""Based (Arora et al. 2024): linear attention with the second-order Taylor
expansion of exp as its feature map, on a small feature dimension, meant to
be stacked with sliding-window softmax layers ('based;local(window=64)')."""

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo import registry
from zoo.attention.recurrence import GatedRecurrence, RecurrencePart


@registry.register("attention", "based")
@dataclasses.dataclass(frozen=True)
class Based(GatedRecurrence):
  """Linear attention out_t = sum_s phi(q_t).phi(k_s) v_s / sum_s
  phi(q_t).phi(k_s) with phi(q).phi(k) = 1 + q.k / sqrt(f) + (q.k)^2 /
  (2 f), the Taylor expansion of exp(q.k / sqrt(f)) as the paper's code
  has it, on q and k mapped per head to `feature_dim` = f (16); the
  normaliser is the op's last output column, values being [v, 1] as the
  paper does. An ungated recurrence: the state keeps every token.

  Not as the paper: phi's quadratic part keeps x_i x_j once for i <= j
  (f (f + 1) / 2 features, the off-diagonal ones scaled to count twice),
  the same dot products as the paper's f^2 with a state 1 + f + f (f + 1)
  / 2 = 153 x (head_dim + 1) at f = 16 instead of 273 x ...; q and k are
  the layer's projections mapped per head from head_dim to f (a factored
  projection of x, as expressive as the paper's when head_dim >= f); no
  short convolution by default (`short_conv`: the paper puts its short
  convolutions in separate layers)."""

  feature_dim: int = 16

  gates = ()

  def __post_init__(self):
    super().__post_init__()
    if self.feature_dim < 1:
      raise ValueError(f"attention based(feature_dim=...) must be >= 1; got "
                       f"{self.feature_dim}")

  def state_dims(self, head_dim):
    f = self.feature_dim
    return 1 + f + f * (f + 1) // 2, head_dim + 1

  def layer_part(self, *, embed_dim, num_heads, num_kv_heads, head_dim, rngs,
                 dtype, param_dtype):
    del embed_dim
    return BasedPart(feature_dim=self.feature_dim, short_conv=self.short_conv,
                     num_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype)


def taylor_features(x_xF):
  """phi(x) = [1, x / f^(1/4), x_i x_j / sqrt(f) for i < j, x_i^2 /
  sqrt(2 f)] (fp32): phi(q).phi(k) = 1 + q.k / sqrt(f) + (q.k)^2 / (2 f)."""
  f = x_xF.shape[-1]
  x = x_xF.astype(jnp.float32)
  i, j = np.triu_indices(f)
  scale = np.where(i == j, (2.0 * f)**-0.5, f**-0.5).astype(np.float32)
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x * f**-0.25,
                          x[..., i] * x[..., j] * scale], axis=-1)


class BasedPart(RecurrencePart):
  """q and k mapped to f per head and through phi, values with a ones
  column in; the normaliser divided out."""

  def __init__(self, *, feature_dim, short_conv, num_heads, num_kv_heads,
               head_dim, rngs, dtype, param_dtype):
    super().__init__(short_conv=short_conv, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs,
                     dtype=dtype, param_dtype=param_dtype)
    init = nnx.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=0)
    self.dtype = dtype
    self.q_map_HxKxF = nnx.Param(init(
        rngs.params(), (num_heads, head_dim, feature_dim), param_dtype))
    self.k_map_GxKxF = nnx.Param(init(
        rngs.params(), (num_kv_heads, head_dim, feature_dim), param_dtype))

  def prepare(self, x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK):
    del x_BxTxD
    to_features = lambda x, w: taylor_features(jnp.einsum(
        "bthk,hkf->bthf", x, w[...].astype(self.dtype)))
    v_BxTxGxV = jnp.concatenate(
        [v_BxTxGxK, jnp.ones_like(v_BxTxGxK[..., :1])], axis=-1)
    return (to_features(q_BxTxHxK, self.q_map_HxKxF),
            to_features(k_BxTxGxK, self.k_map_GxKxF), v_BxTxGxV, {})

  def output(self, x_BxTxD, out_BxTxHxV):
    del x_BxTxD
    num_BxTxHxK = out_BxTxHxV[..., :-1].astype(jnp.float32)
    den_BxTxHx1 = out_BxTxHxV[..., -1:].astype(jnp.float32)
    out = num_BxTxHxK / jnp.where(den_BxTxHx1 > 0, den_BxTxHx1, 1.0)
    return out.astype(out_BxTxHxV.dtype)
