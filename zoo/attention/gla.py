"""Gated linear attention (Yang et al. 2024): a recurrence whose forget
gate is data-dependent and per key dim, S_t = Diag(alpha_t) S_{t-1} +
k_t v_t^T, o_t = S_t^T q_t."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from zoo import registry
from zoo.attention.recurrence import (GatedRecurrence, HeadNorm,
                                      RecurrencePart, head_projection)

# alpha = sigmoid(logits)^(1/_GATE_NORMALISER): decays close to 1 at
# initialisation (the paper's and flash-linear-attention's 16).
_GATE_NORMALISER = 16.0


@registry.register("attention", "gla")
@dataclasses.dataclass(frozen=True)
class GLA(GatedRecurrence):
  """GLA: log alpha_t = logsigmoid(W2 W1 x_t + b) / 16 per key dim, W1 W2
  of rank `gate_rank` (16); queries scaled by head_dim^-1/2 (as
  flash-linear-attention's kernel); the output per-head RMSNorm'd and
  gated, norm(o) * silu(W_r x), as the paper's swish output gate.

  Not as the paper: keys have the head dim (the paper halves it), and no
  short convolution by default (`short_conv`; the paper has none,
  flash-linear-attention's layer makes it optional)."""

  gate_rank: int = 16

  def __post_init__(self):
    super().__post_init__()
    if self.gate_rank < 1:
      raise ValueError(f"attention gla(gate_rank=...) must be >= 1; got "
                       f"{self.gate_rank}")

  def layer_part(self, *, embed_dim, num_heads, num_kv_heads, head_dim, rngs,
                 dtype, param_dtype):
    return GLAPart(embed_dim=embed_dim, gate_rank=self.gate_rank,
                   short_conv=self.short_conv, num_heads=num_heads,
                   num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs,
                   dtype=dtype, param_dtype=param_dtype)


class GLAPart(RecurrencePart):
  """The low-rank forget gate in; RMSNorm and the swish output gate out."""

  def __init__(self, *, embed_dim, gate_rank, short_conv, num_heads,
               num_kv_heads, head_dim, rngs, dtype, param_dtype):
    super().__init__(short_conv=short_conv, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs,
                     dtype=dtype, param_dtype=param_dtype)
    self.gate_down = nnx.Einsum(
        "btd,dr->btr", (embed_dim, gate_rank),
        kernel_init=nnx.initializers.lecun_normal(), dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.gate_up = nnx.Einsum(
        "btr,rgk->btgk", (gate_rank, num_kv_heads, head_dim),
        (num_kv_heads, head_dim),
        kernel_init=nnx.initializers.lecun_normal(in_axis=0,
                                                  out_axis=(1, 2)),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.out_gate = head_projection(embed_dim, num_heads, head_dim, rngs=rngs,
                                    dtype=dtype, param_dtype=param_dtype)
    self.norm = HeadNorm(num_heads, head_dim, dtype=dtype,
                         param_dtype=param_dtype)

  def prepare(self, x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK):
    logits_BxTxGxK = self.gate_up(self.gate_down(x_BxTxD))
    g_BxTxGxK = jax.nn.log_sigmoid(logits_BxTxGxK.astype(jnp.float32)
                                   ) / _GATE_NORMALISER
    return (q_BxTxHxK * q_BxTxHxK.shape[-1]**-0.5, k_BxTxGxK, v_BxTxGxK,
            {"g": g_BxTxGxK})

  def output(self, x_BxTxD, out_BxTxHxK):
    return self.norm(out_BxTxHxK) * jax.nn.silu(self.out_gate(x_BxTxD))
