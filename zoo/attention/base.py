"""The attention op contract, shared by every family.

An op is a frozen dataclass whose fields are its spec arguments, called as

    out_BxTxHxK = op(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, causal, mask, bias)

- G (kv heads) divides H (query heads): grouped-query attention.
- `causal`: query i sits at key position S - T + i and sees keys up to it.
- `mask`: True where attention is allowed; padding form BxS (which keys are
  real) or, for ops with `full_mask`, BxTxS.
- `bias`: a callable (q_pos_T, k_pos_S) -> HxTxS of additive logits, so ops
  that visit blocks evaluate it only on the blocks they visit.
Logits and softmax are computed in fp32; the output has q's dtype. A query
with no key to attend to gets a zero output.
"""

import dataclasses
from typing import Callable, ClassVar, Optional

import jax
import jax.numpy as jnp

Bias = Callable[[jax.Array, jax.Array], jax.Array]

# Kinds of positional encoding an op may accept (see zoo/position).
POSITION_KINDS = ("none", "absolute", "rotary", "bias")


@dataclasses.dataclass(frozen=True)
class AttentionOp:
  """Base of every attention op: argument checks shared by all families."""

  positions: ClassVar[frozenset] = frozenset(POSITION_KINDS)
  full_mask: ClassVar[bool] = False

  def __call__(self, q, k, v, *, causal: bool = False,
               mask: Optional[jax.Array] = None,
               bias: Optional[Bias] = None) -> jax.Array:
    self.check(q, k, v, mask, bias)
    return self.attend(q, k, v, causal=causal, mask=mask, bias=bias)

  def attend(self, q, k, v, *, causal, mask, bias):
    raise NotImplementedError

  def check(self, q, k, v, mask, bias):
    name = type(self).registry_name
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
      raise ValueError(
          f"attention {name}: want q [batch, q_len, heads, head_dim] and k, v "
          f"[batch, kv_len, kv_heads, head_dim]; got q {q.shape}, k {k.shape},"
          f" v {v.shape}")
    if (q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]
        or q.shape[2] % k.shape[2]):
      raise ValueError(
          f"attention {name}: batch and head_dim must match and kv_heads must "
          f"divide heads; got q {q.shape}, k {k.shape}")
    if mask is not None:
      b, t, s = q.shape[0], q.shape[1], k.shape[1]
      shapes = [(b, s)] + ([(b, t, s)] if self.full_mask else [])
      if mask.shape not in shapes or mask.dtype != jnp.bool_:
        raise ValueError(
            f"attention {name}: mask must be bool of shape "
            f"{' or '.join(map(str, shapes))}; got {mask.dtype} {mask.shape}")
    if bias is not None and "bias" not in self.positions:
      raise ValueError(
          f"attention {name} cannot take an additive position bias")


def positions_qk(t: int, s: int):
  """Query positions (end-aligned with the keys) and key positions."""
  return jnp.arange(s - t, s), jnp.arange(s)


def group_queries(q_BxTxHxK, kv_heads: int):
  """BxTxHxK -> BxTxGxRxK with R = H // G queries per kv head."""
  b, t, h, d = q_BxTxHxK.shape
  return q_BxTxHxK.reshape(b, t, kv_heads, h // kv_heads, d)
