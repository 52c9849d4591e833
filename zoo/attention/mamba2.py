"""Mamba-2's state space duality (Dao & Gu 2024) as a gated recurrence:
SSD is S_t = exp(Delta_t A_h) S_{t-1} + (Delta_t B_t) x_t^T, y_t = S_t^T
C_t + D_h x_t, so C plays the query, B the key and x the value."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo import registry
from zoo.attention.recurrence import (GatedRecurrence, HeadNorm,
                                      RecurrencePart, head_projection)

# Delta's range at initialisation, sampled log-uniformly (the paper's).
_DT_MIN, _DT_MAX = 1e-3, 0.1


@registry.register("attention", "mamba2")
@dataclasses.dataclass(frozen=True)
class Mamba2(GatedRecurrence):
  """SSD: scalar log gate g_t = Delta_t A_h per head, Delta =
  softplus(W x + dt_bias), A_h = -exp(A_log_h); key Delta_t B_t, query
  C_t, value x_t, plus the skip D_h x_t; a short convolution of width
  `short_conv` (4, as the paper) on x, B and C, and the gated RMSNorm
  norm(y * silu(z)) of z another projection of x, before the output
  projection.

  The layer's projections are used: v is x, k is B and q is C. So
  Mamba-2's heads are the kv heads (each with its own state, Delta, A and
  D), and B comes one per head (the paper shares B and C across heads in
  `ngroups` groups, one group by default); with more query heads than kv
  heads each state is read by several C. The state dim N is the head dim
  (the paper's N = 128 beside P = 64), and the gated norm is per head
  (the paper's spans a group). The skip reaches the op as a second keyword
  `d` (BxSxG, D_h of each kv head), as Mamba-2's kernels take D."""

  short_conv: int = 4

  gates = ("g", "d")

  def attend(self, q, k, v, *, causal, mask, bias, g, d):
    out = super().attend(q, k, v, causal=causal, mask=mask, bias=bias, g=g)
    # Query i sits at key position s - t + i (none before the first key).
    t, s = q.shape[1], k.shape[1]
    last = lambda x: jnp.pad(x, [(0, 0), (max(t - s, 0), 0)]
                             + [(0, 0)] * (x.ndim - 2))[:, -t:]
    return out + _skip(last(d), last(v), q.shape[2]).astype(out.dtype)

  def prefill(self, state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, *, index, bias,
              g, d):
    out, state = super().prefill(state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK,
                                 index=index, bias=bias, g=g)
    skip = _skip(d, v_BxTxGxK, q_BxTxHxK.shape[2])
    return out + skip.astype(out.dtype), state

  def decode_step(self, state, q_BxHxK, k_BxGxK, v_BxGxK, *, index, bias, g,
                  d):
    out, state = super().decode_step(state, q_BxHxK, k_BxGxK, v_BxGxK,
                                     index=index, bias=bias, g=g)
    skip = _skip(d[:, None], v_BxGxK[:, None], q_BxHxK.shape[1])[:, 0]
    return out + skip.astype(out.dtype), state

  def layer_part(self, *, embed_dim, num_heads, num_kv_heads, head_dim, rngs,
                 dtype, param_dtype):
    return Mamba2Part(embed_dim=embed_dim, short_conv=self.short_conv,
                      num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=head_dim, rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype)


def _skip(d_BxTxG, v_BxTxGxV, num_heads: int):
  """D_h x_t of each kv head, repeated for its query heads (fp32)."""
  skip_BxTxGxV = d_BxTxG[..., None].astype(jnp.float32) * v_BxTxGxV.astype(
      jnp.float32)
  return jnp.repeat(skip_BxTxGxV, num_heads // v_BxTxGxV.shape[2], axis=2)


class Mamba2Part(RecurrencePart):
  """Delta, A and D in (keys scaled by Delta); the gated RMSNorm out."""

  def __init__(self, *, embed_dim, short_conv, num_heads, num_kv_heads,
               head_dim, rngs, dtype, param_dtype):
    super().__init__(short_conv=short_conv, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs,
                     dtype=dtype, param_dtype=param_dtype)
    g = num_kv_heads
    self.dt = nnx.Einsum("btd,dg->btg", (embed_dim, g),
                         kernel_init=nnx.initializers.lecun_normal(),
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # dt_bias = softplus^-1(dt) for dt log-uniform in [_DT_MIN, _DT_MAX].
    dt_G = jnp.exp(jax.random.uniform(
        rngs.params(), (g,), minval=np.log(_DT_MIN), maxval=np.log(_DT_MAX)))
    self.dt_bias_G = nnx.Param((dt_G + jnp.log(-jnp.expm1(-dt_G))).astype(
        param_dtype))
    # A uniform in [1, 16].
    self.a_log_G = nnx.Param(jnp.log(jax.random.uniform(
        rngs.params(), (g,), minval=1.0, maxval=16.0)).astype(param_dtype))
    self.d_G = nnx.Param(jnp.ones((g,), param_dtype))
    self.z = head_projection(embed_dim, num_heads, head_dim, rngs=rngs,
                             dtype=dtype, param_dtype=param_dtype)
    self.norm = HeadNorm(num_heads, head_dim, dtype=dtype,
                         param_dtype=param_dtype)

  def prepare(self, x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK):
    dt_BxTxG = jax.nn.softplus(self.dt(x_BxTxD).astype(jnp.float32)
                               + self.dt_bias_G[...].astype(jnp.float32))
    g_BxTxG = -jnp.exp(self.a_log_G[...].astype(jnp.float32)) * dt_BxTxG
    d_BxTxG = jnp.broadcast_to(self.d_G[...].astype(jnp.float32),
                               dt_BxTxG.shape)
    k_BxTxGxK = (k_BxTxGxK * dt_BxTxG[..., None]).astype(k_BxTxGxK.dtype)
    return q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, {"g": g_BxTxG, "d": d_BxTxG}

  def output(self, x_BxTxD, out_BxTxHxK):
    return self.norm(out_BxTxHxK * jax.nn.silu(self.z(x_BxTxD)))
