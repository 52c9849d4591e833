"""DeltaNet (Schlag et al. 2021, "Linear Transformers Are Secretly Fast
Weight Programmers"; trained in parallel over the sequence as Yang et al.
2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length"): the delta rule S_t = (I - beta_t k_t k_t^T) S_{t-1} +
beta_t k_t v_t^T, o_t = S_t^T q_t (zoo/attention/delta.py), with the layer
of Yang et al. 2024 as flash-linear-attention builds it (`DeltaNetPart`).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from zoo import registry
from zoo.attention import parts
from zoo.attention.base import LayerPart
from zoo.attention.delta import DeltaRule, l2_normalise
from zoo.sharding import EMBED, HEADS, KV, logical


@registry.register("attention", "deltanet")
@dataclasses.dataclass(frozen=True)
class DeltaNet(DeltaRule):
  """The delta rule without a forget gate, o_t = S_t^T q_t with S_t =
  (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T; gate `beta` BxTxG.
  Causal only; `chunk` positions per step of the chunked (WY) form;
  `short_conv` the width of the layer's short convolutions (4, as fla;
  0: none, then SiLU alone on q, k, v)."""

  def layer_part(self, *, embed_dim, num_heads, num_kv_heads, head_dim, rngs,
                 dtype, param_dtype):
    return DeltaNetPart(embed_dim=embed_dim, num_heads=num_heads,
                        num_kv_heads=num_kv_heads, head_dim=head_dim,
                        short_conv=self.short_conv, rngs=rngs, dtype=dtype,
                        param_dtype=param_dtype)


def project(layer, x_BxTxD):
  """`layer` applied to the B*T tokens as one axis (one contraction for its
  weight gradient, as the shared layer's projections)."""
  b, t = x_BxTxD.shape[:2]
  y = layer(x_BxTxD.reshape(b * t, -1))
  return y.reshape(b, t, *y.shape[1:])


class DeltaNetPart(LayerPart):
  """DeltaNet's layer around the op, as Yang et al. 2024 and fla: short
  convolutions with SiLU on q, k and v (SiLU alone without them), q and k
  L2-normalised per head (q also scaled by K^-1/2, fla's kernel default),
  beta = sigmoid(W_beta x) per kv head, and the output RMS-normalised per
  head (one scale shared by the heads, as fla)."""

  def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int,
               head_dim: int, short_conv: int, rngs: nnx.Rngs, dtype,
               param_dtype):
    self.dtype = dtype
    self.conv = (parts.ConvPart(num_heads=num_heads, num_kv_heads=num_kv_heads,
                                head_dim=head_dim, width=short_conv, rngs=rngs,
                                dtype=dtype, param_dtype=param_dtype)
                 if short_conv else None)
    self.beta = nnx.Linear(
        embed_dim, num_kv_heads, use_bias=False, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs, kernel_init=logical(
            nnx.initializers.lecun_normal(), EMBED, HEADS))
    self.norm = nnx.RMSNorm(head_dim, epsilon=1e-5, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs,
                            scale_init=logical(nnx.initializers.ones, KV))

  def inputs(self, x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, state):
    if self.conv is None:
      q_BxTxHxK, k_BxTxGxK, v_BxTxGxK = (
          jax.nn.silu(x) for x in (q_BxTxHxK, k_BxTxGxK, v_BxTxGxK))
    else:
      q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, _, state = self.conv.inputs(
          x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, state)
    q_BxTxHxK = l2_normalise(q_BxTxHxK) * q_BxTxHxK.shape[-1]**-0.5
    beta_BxTxG = jax.nn.sigmoid(project(self.beta, x_BxTxD).astype(
        jnp.float32))
    return (q_BxTxHxK, l2_normalise(k_BxTxGxK), v_BxTxGxK,
            self.gates(x_BxTxD, beta_BxTxG), state)

  def gates(self, x_BxTxD, beta_BxTxG):
    """The op's gate keywords."""
    del x_BxTxD
    return {"beta": beta_BxTxG}

  def output(self, x_BxTxD, out_BxTxHxK):
    del x_BxTxD
    return self.norm(out_BxTxHxK)

  def init_state(self, batch, dtype):
    return None if self.conv is None else self.conv.init_state(batch, dtype)
