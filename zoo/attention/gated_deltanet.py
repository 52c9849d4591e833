"""Gated DeltaNet (Yang et al. 2025, "Gated Delta Networks: Improving
Mamba2 with Delta Rule"): the delta rule with a scalar forget gate per kv
head, S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
o_t = S_t^T q_t (zoo/attention/delta.py), the gate parametrised as
Mamba-2's and the output gated (`GatedDeltaNetPart`).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from zoo import registry
from zoo.attention.delta import DeltaRule
from zoo.attention.deltanet import DeltaNetPart, project
from zoo.sharding import EMBED, HEADS, KV, logical

# Mamba-2's initial ranges: the decay rate A and the step dt.
_A_RANGE = (1.0, 16.0)
_DT_RANGE = (1e-3, 1e-1)
_DT_FLOOR = 1e-4


@registry.register("attention", "gated_deltanet")
@dataclasses.dataclass(frozen=True)
class GatedDeltaNet(DeltaRule):
  """The gated delta rule, o_t = S_t^T q_t with S_t = exp(g_t) (I - beta_t
  k_t k_t^T) S_{t-1} + beta_t k_t v_t^T; gates `beta` and `g` (log forget
  gate <= 0), each BxTxG. Causal only; `chunk` positions per step of the
  chunked (WY) form; `short_conv` the width of the layer's short
  convolutions (4, as the paper; 0: none, then SiLU alone on q, k, v)."""

  gates = ("beta", "g")

  def layer_part(self, *, embed_dim, num_heads, num_kv_heads, head_dim, rngs,
                 dtype, param_dtype):
    return GatedDeltaNetPart(
        embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, short_conv=self.short_conv, rngs=rngs, dtype=dtype,
        param_dtype=param_dtype)


def _a_log_init(key, shape, dtype):
  """log A, A uniform in _A_RANGE."""
  return jnp.log(jax.random.uniform(key, shape, minval=_A_RANGE[0],
                                    maxval=_A_RANGE[1])).astype(dtype)


def _dt_bias_init(key, shape, dtype):
  """softplus^-1(dt), dt log-uniform in _DT_RANGE (at least _DT_FLOOR), so
  softplus(dt_bias) = dt at initialisation."""
  dt = jnp.maximum(_DT_FLOOR, jnp.exp(jax.random.uniform(
      key, shape, minval=math.log(_DT_RANGE[0]),
      maxval=math.log(_DT_RANGE[1]))))
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class GatedDeltaNetPart(DeltaNetPart):
  """DeltaNet's layer (short convolutions, L2-normalised q and k, beta =
  sigmoid(W_beta x)) plus the paper's forget gate and output gate: g =
  -exp(A_log) * softplus(W_a x + dt_bias) per kv head, initialised as
  Mamba-2's (A from [1, 16], where fla draws from [0, 16]; dt log-uniform
  in [1e-3, 0.1]), and the output RMSNorm(o) * silu(W_g x) per head. fla's
  layer widens the value heads to twice the keys (expand_v = 2); here they
  are as wide, as the shared layer's projections make them."""

  def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int,
               head_dim: int, short_conv: int, rngs: nnx.Rngs, dtype,
               param_dtype):
    super().__init__(embed_dim=embed_dim, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim,
                     short_conv=short_conv, rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype)
    g = num_kv_heads
    self.a = nnx.Linear(
        embed_dim, g, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs, kernel_init=logical(nnx.initializers.lecun_normal(), EMBED,
                                       HEADS))
    self.a_log = nnx.Param(logical(_a_log_init, HEADS)(rngs.params(), (g,),
                                                       param_dtype))
    self.dt_bias = nnx.Param(logical(_dt_bias_init, HEADS)(rngs.params(),
                                                           (g,), param_dtype))
    self.gate = nnx.Einsum(
        "ND,DHK->NHK", (embed_dim, num_heads, head_dim), dtype=dtype,
        param_dtype=param_dtype, rngs=rngs, kernel_init=logical(
            nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), EMBED,
            HEADS, KV))

  def gates(self, x_BxTxD, beta_BxTxG):
    a_BxTxG = project(self.a, x_BxTxD).astype(jnp.float32)
    g_BxTxG = -jnp.exp(self.a_log[...].astype(jnp.float32)) * jax.nn.softplus(
        a_BxTxG + self.dt_bias[...].astype(jnp.float32))
    return {"beta": beta_BxTxG, "g": g_BxTxG}

  def output(self, x_BxTxD, out_BxTxHxK):
    return self.norm(out_BxTxHxK) * jax.nn.silu(project(self.gate, x_BxTxD))
