"""The attention op contract, shared by every family.

An op is a frozen dataclass whose fields are its spec arguments, called as

    out_BxTxHxK = op(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, causal, mask, bias)

- G (kv heads) divides H (query heads): grouped-query attention.
- `causal`: query i sits at key position S - T + i and sees keys up to it.
- `mask`: True where attention is allowed; padding form BxS (which keys are
  real) or, for ops with `full_mask`, BxTxS.
- `bias`: a callable (q_pos_T, k_pos_S) -> HxTxS of additive logits, so ops
  that visit blocks evaluate it only on the blocks they visit.
- `step`: the training step (a scalar array), for ops whose random features
  are redrawn during training (FAVOR+ with `redraw_every`); others ignore it.
Logits and softmax are computed in fp32; the output has q's dtype. A query
with no key to attend to gets a zero output.

Ops with random structure (BigBird's random blocks, FAVOR+'s projections)
draw it per layer and per head: the model builds layer i's op with
`op.for_layer(i)`. Every op states its pattern (`allows`, `pattern_mask`)
and its key budget (`keys_per_query`), so experiments compare variants at
equal budgets.
"""

import dataclasses
from typing import Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

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
               bias: Optional[Bias] = None,
               step: Optional[jax.Array] = None) -> jax.Array:
    del step  # only ops with redrawn random features use it
    self.check(q, k, v, mask, bias)
    return self.attend(q, k, v, causal=causal, mask=mask, bias=bias)

  def attend(self, q, k, v, *, causal, mask, bias):
    raise NotImplementedError

  def for_layer(self, layer: int) -> "AttentionOp":
    """The op of model layer `layer`: ops with random structure (a `layer`
    field) fold the index into their draws; the others are shared."""
    if any(f.name == "layer" for f in dataclasses.fields(self)):
      return dataclasses.replace(self, layer=layer)
    return self

  def allows(self, i, j, *, t: int, causal: bool, num_heads: int):
    """Whether query position i sees key position j (self-attention of
    length t; broadcasting numpy int arrays, result broadcast to heads
    first: HxIxJ or 1xIxJ). Dense by default."""
    del t, num_heads
    ok = np.ones(np.broadcast_shapes(np.shape(i), np.shape(j)), bool)
    return (ok & (j <= i) if causal else ok)[None]

  def pattern_mask(self, t: int, causal: bool, num_heads: int = 1
                   ) -> np.ndarray:
    """HxTxT bool: the (query, key) pairs this op attends at length t,
    before any padding mask."""
    pos = np.arange(t)
    allowed = self.allows(pos[:, None], pos[None, :], t=t, causal=causal,
                           num_heads=num_heads)
    return np.broadcast_to(allowed, (num_heads, t, t))

  def keys_per_query(self, t: int, causal: bool, num_heads: int = 1
                     ) -> float:
    """Mean number of keys one query sees at length t (over queries and
    heads): the budget experiments match variants on. Counted from
    `allows` in row chunks, so long lengths stay cheap in memory."""
    pos, total = np.arange(t), 0
    for start in range(0, t, 256):
      rows = pos[start:start + 256, None]
      allowed = self.allows(rows, pos[None, :], t=t, causal=causal,
                             num_heads=num_heads)
      total += np.broadcast_to(
          allowed, (num_heads, rows.shape[0], t)).sum(dtype=np.int64)
    return float(total) / (t * num_heads)

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
