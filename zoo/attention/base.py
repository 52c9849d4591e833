"""The attention op contract, shared by every family.

An op is a frozen dataclass whose fields are its spec arguments, called as

    out_BxTxHxK = op(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, *, causal, mask, bias)

- G (kv heads) divides H (query heads): grouped-query attention.
- `causal`: query i sits at key position S - T + i and sees keys up to it.
- `mask`: True where attention is allowed; padding form BxS (which keys are
  real) or, for ops with `full_mask`, BxTxS.
- `bias`: a callable (q_pos_T, k_pos_S) -> HxTxS of additive logits, so ops
  that visit blocks evaluate it only on the blocks they visit.
- gates, keywords named as flash-linear-attention names them, for the ops
  that declare them (`gates`): `g`, a log forget gate (<= 0) BxSxG or
  BxSxGxK, and `beta`, BxSxG in (0, 1). An op that takes no gates is refused
  one; an op missing one it needs is refused too.
Logits and softmax are computed in fp32; the output has q's dtype. A query
with no key to attend to gets a zero output.

Ops with random structure (BigBird's random blocks, FAVOR+'s projections)
draw it per layer and per head: the model builds layer i's op with
`op.for_layer(i)`; ops that redraw during training (`redraws`) are bound
to the step with `op.at_step(step)`. Every op states its pattern (`allows`,
`pattern_mask`) and its key budget (`keys_per_query`), so experiments
compare variants at equal budgets.

Decoding is part of the contract: an op owns its decode state, a pytree
whose leaves are laid out batch x kv heads x ... (so a layer can shard any
op's state the same way):

    state = op.init_state(batch, capacity, kv_heads, head_dim, dtype)
    out_BxTxHxK, state = op.prefill(state, q, k, v, index=index, bias=bias)
    out_BxHxK, state = op.decode_step(state, q_BxHxK, k_BxGxK, v_BxGxK,
                                      index=index, bias=bias)

`prefill` takes T >= 1 new tokens at positions index..index+T-1 and
continues whatever the state holds (a prompt prefilled in chunks, a second
turn), equal to the causal forward pass over the whole sequence; `index`
is a traced int32 scalar, or the Python int 0 when the state is known to
be empty, which lets an op run its training form on the prompt. The bias
callable takes absolute positions. The base class is softmax attention over
a KV cache of fixed capacity (`KVCache`); a pattern op narrows the keys a
query sees with `cache_rows`; other families override the three methods.
`state_size` reports the state's floats per layer at a length.

A family's parameters around its op (feature maps, gate projections, short
convolutions, output gates and norms) are its layer part: `layer_part`
returns an nnx.Module (see `LayerPart`) that the shared attention layer
calls before and after the op, so the layer holds no per-family code.
"""

import dataclasses
from typing import Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

Bias = Callable[[jax.Array, jax.Array], jax.Array]

# Kinds of positional encoding an op may accept (see zoo/position).
POSITION_KINDS = ("none", "absolute", "rotary", "bias")


@dataclasses.dataclass(frozen=True)
class AttentionOp:
  """Base of every attention op: argument checks shared by all families."""

  positions: ClassVar[frozenset] = frozenset(POSITION_KINDS)
  full_mask: ClassVar[bool] = False

  # Whether the op redraws random structure during training and so must be
  # bound to the training step (`at_step`).
  redraws: ClassVar[bool] = False
  # The gate keywords the op needs (see the module docstring).
  gates: ClassVar[tuple[str, ...]] = ()
  # Whether v's head dim may differ from q's and k's (a state K x V).
  any_value_dim: ClassVar[bool] = False

  def __call__(self, q, k, v, *, causal: bool = False,
               mask: Optional[jax.Array] = None,
               bias: Optional[Bias] = None, **gates) -> jax.Array:
    self.check(q, k, v, mask, bias, gates)
    return self.attend(q, k, v, causal=causal, mask=mask, bias=bias, **gates)

  def layer_part(self, *, embed_dim: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, rngs: nnx.Rngs, dtype,
                 param_dtype) -> Optional["LayerPart"]:
    """The family's own parameters around the op in the shared attention
    layer, or None (plain q, k, v projections)."""
    del embed_dim, num_heads, num_kv_heads, head_dim, rngs, dtype
    del param_dtype
    return None

  def attend(self, q, k, v, *, causal, mask, bias):
    raise NotImplementedError

  def for_layer(self, layer: int) -> "AttentionOp":
    """The op of model layer `layer`: ops with random structure (a `layer`
    field) fold the index into their draws; the others are shared."""
    if any(f.name == "layer" for f in dataclasses.fields(self)):
      return dataclasses.replace(self, layer=layer)
    return self

  def at_step(self, step) -> "AttentionOp":
    """The op at training step `step` (a scalar array): ops that redraw
    (`redraws`) pick their draw from it; the others are unchanged."""
    del step
    return self

  def init_state(self, batch: int, capacity: int, kv_heads: int,
                 head_dim: int, dtype) -> "KVCache":
    """An empty decode state for up to `capacity` positions: by default a
    KV cache of the kv heads (grouped-query attention caches G heads)."""
    shape = (batch, kv_heads, capacity, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def state_size(self, length: int, kv_heads: int, head_dim: int) -> int:
    """Floats of decode state per layer and batch row at `length`
    positions: a KV cache holds 2 x G x K per position."""
    return 2 * kv_heads * head_dim * length

  def cache_rows(self, positions_T, capacity: int, num_heads: int):
    """1xTxC or HxTxC bool: the cached positions each query at
    `positions_T` (traced) sees, itself included: the causal rows of
    `allows` at the cache's capacity. Dense by default."""
    del num_heads
    return (jnp.arange(capacity)[None, :] <= positions_T[:, None])[None]

  def prefill(self, state: "KVCache", q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, *,
              index, bias: Optional[Bias], **gates):
    """(out_BxTxHxK, state) of T new tokens at positions index.. (see the
    module docstring). Into an empty cache (index the Python int 0) the op
    itself runs on the prompt, so its outputs are the forward pass's;
    otherwise the new queries attend the cache and each other."""
    del gates  # softmax ops take none (refused by `check` in training)
    if isinstance(index, int) and index == 0:
      out = self(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, causal=True, bias=bias)
    else:
      out = self._attend_cache(state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK,
                               index, bias)
      k_BxTxGxK, v_BxTxGxK = after(out, k_BxTxGxK, v_BxTxGxK)
    return out, state.write(k_BxTxGxK, v_BxTxGxK, index)

  def decode_step(self, state, q_BxHxK, k_BxGxK, v_BxGxK, *, index,
                  bias: Optional[Bias], **gates):
    """(out_BxHxK, state): the query at position `index` attends the state
    and its own key, which the state then takes in. Gates are BxG or
    BxGxK, one step's."""
    out_Bx1xHxK, state = self.prefill(
        state, q_BxHxK[:, None], k_BxGxK[:, None], v_BxGxK[:, None],
        index=jnp.asarray(index, jnp.int32), bias=bias,
        **{key: x[:, None] for key, x in gates.items()})
    return out_Bx1xHxK[:, 0], state

  def _attend_cache(self, state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, index,
                    bias):
    """New queries over the cache's positions < index and the new keys,
    each within its `cache_rows`."""
    c, h, t = state.k_BxGxCxK.shape[2], q_BxTxHxK.shape[2], q_BxTxHxK.shape[1]
    positions_T = index + jnp.arange(t)
    rows_xTxC = self.cache_rows(positions_T, c, h)
    cached_C = jnp.arange(c)
    new_xTxT = jax.lax.dynamic_slice_in_dim(
        jnp.pad(rows_xTxC, [(0, 0), (0, 0), (0, t)]), index, t, axis=2)
    return attend_with_cache(
        q_BxTxHxK, state.k_BxGxCxK, state.v_BxGxCxK,
        rows_xTxC & (cached_C < index), cached_C, k_BxTxGxK, v_BxTxGxK,
        new_xTxT & np.tril(np.ones((t, t), bool)), positions_T, bias)

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

  def check(self, q, k, v, mask, bias, gates=None):
    name = type(self).registry_name
    same_value = v.shape == k.shape or (
        self.any_value_dim and v.shape[:3] == k.shape[:3])
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or not same_value:
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
    given = set(gates or ())
    if given != set(self.gates):
      unknown, missing = given - set(self.gates), set(self.gates) - given
      wants = ", ".join(self.gates) or "none"
      raise ValueError(
          f"attention {name} takes gates: {wants}; got "
          + (f"unknown {', '.join(sorted(unknown))}" if unknown
             else f"none for {', '.join(sorted(missing))}"))
    b, s, g = k.shape[:3]
    for key, value in (gates or {}).items():
      if value.shape[:3] != (b, s, g) or value.ndim not in (3, 4):
        raise ValueError(
            f"attention {name}: gate {key} must be [batch, kv_len, kv_heads]"
            f" or [batch, kv_len, kv_heads, head_dim] = {(b, s, g)}...; got "
            f"{value.shape}")


def positions_qk(t: int, s: int):
  """Query positions (end-aligned with the keys) and key positions."""
  return jnp.arange(s - t, s), jnp.arange(s)


def group_queries(q_BxTxHxK, kv_heads: int):
  """BxTxHxK -> BxTxGxRxK with R = H // G queries per kv head."""
  b, t, h, d = q_BxTxHxK.shape
  return q_BxTxHxK.reshape(b, t, kv_heads, h // kv_heads, d)


@struct.dataclass
class KVCache:
  """Keys and values of positions 0..C-1, kv heads first so a step's
  products read the cache in place (zeros where not yet written)."""

  k_BxGxCxK: jax.Array
  v_BxGxCxK: jax.Array

  def write(self, k_BxTxGxK, v_BxTxGxK, index) -> "KVCache":
    """The cache with T new keys and values at positions index.."""
    put = lambda cache, x: jax.lax.dynamic_update_slice_in_dim(
        cache, x.transpose(0, 2, 1, 3).astype(cache.dtype), index, axis=2)
    return KVCache(put(self.k_BxGxCxK, k_BxTxGxK),
                   put(self.v_BxGxCxK, v_BxTxGxK))


# Queries per step when new tokens attend a cache: the logits held at once
# are this many x (cache + new) per head, whatever the prompt's length.
QUERY_CHUNK = 256


def attend_with_cache(q_BxTxHxK, k_BxGxCxK, v_BxGxCxK, cached_xTxC,
                      cached_pos_C, k_BxTxGxK, v_BxTxGxK, new_xTxT,
                      positions_T, bias: Optional[Bias]):
  """Softmax attention (fp32) of T new queries (at `positions_T`) over C
  cached keys (at `cached_pos_C`) and the T new keys, the two parts merged
  by their maxima. `cached_xTxC` and `new_xTxT` (leading axis 1 or H) mark
  the keys each query sees; a query with none gets zeros. Queries run
  QUERY_CHUNK at a time, so memory does not grow as T x T."""
  b, t, h, d = q_BxTxHxK.shape
  g, c = k_BxGxCxK.shape[1], k_BxGxCxK.shape[2]
  r = h // g
  chunk = min(t, QUERY_CHUNK)
  n = -(-t // chunk)
  pad = n * chunk - t
  k_new_BxGxTxK = k_BxTxGxK.transpose(0, 2, 1, 3).astype(jnp.float32)
  v_new_BxGxTxK = v_BxTxGxK.transpose(0, 2, 1, 3).astype(jnp.float32)
  k_BxGxCxK = k_BxGxCxK.astype(jnp.float32)
  v_BxGxCxK = v_BxGxCxK.astype(jnp.float32)

  def split(x, axis):
    x = jnp.pad(x, [(0, 0)] * axis + [(0, pad)] + [(0, 0)] * (x.ndim - axis - 1))
    return jnp.moveaxis(x.reshape(*x.shape[:axis], n, chunk,
                                  *x.shape[axis + 1:]), axis, 0)

  def one(xs):
    q_BxQxHxK, cached_xQxC, new_xQxT, pos_Q = xs
    q_BxGxRxQxK = q_BxQxHxK.reshape(b, chunk, g, r, d).transpose(
        0, 2, 3, 1, 4).astype(jnp.float32) / np.sqrt(d)
    cached_BxGxRxQxC = jnp.einsum("bgrqd,bgcd->bgrqc", q_BxGxRxQxK, k_BxGxCxK)
    new_BxGxRxQxT = jnp.einsum("bgrqd,bgtd->bgrqt", q_BxGxRxQxK,
                               k_new_BxGxTxK)
    if bias is not None:
      cached_BxGxRxQxC += bias(pos_Q, cached_pos_C).astype(
          jnp.float32).reshape(g, r, chunk, c)
      new_BxGxRxQxT += bias(pos_Q, positions_T).astype(jnp.float32).reshape(
          g, r, chunk, t)
    by_head = lambda m, k: jnp.broadcast_to(m, (h, chunk, k)).reshape(
        g, r, chunk, k)
    cached_BxGxRxQxC = jnp.where(by_head(cached_xQxC, c), cached_BxGxRxQxC,
                                 -jnp.inf)
    new_BxGxRxQxT = jnp.where(by_head(new_xQxT, t), new_BxGxRxQxT, -jnp.inf)
    top = jnp.maximum(cached_BxGxRxQxC.max(-1), new_BxGxRxQxT.max(-1))
    top = jnp.where(jnp.isfinite(top), top, 0.0)[..., None]
    w_cached = jnp.exp(cached_BxGxRxQxC - top)
    w_new = jnp.exp(new_BxGxRxQxT - top)
    total_BxGxRxQ = w_cached.sum(-1) + w_new.sum(-1)
    out_BxGxRxQxK = (jnp.einsum("bgrqc,bgcd->bgrqd", w_cached, v_BxGxCxK)
                     + jnp.einsum("bgrqt,bgtd->bgrqd", w_new, v_new_BxGxTxK))
    out_BxGxRxQxK /= jnp.where(total_BxGxRxQ > 0, total_BxGxRxQ,
                               1.0)[..., None]
    return out_BxGxRxQxK.transpose(0, 3, 1, 2, 4).reshape(b, chunk, h, d)

  xs = (split(q_BxTxHxK, 1), split(cached_xTxC, 1), split(new_xTxT, 1),
        split(positions_T, 0))
  if n == 1:
    out_NxBxQxHxK = one(jax.tree.map(lambda x: x[0], xs))[None]
  else:
    out_NxBxQxHxK = jax.lax.map(one, xs)
  out_BxTxHxK = jnp.moveaxis(out_NxBxQxHxK, 0, 1).reshape(b, n * chunk, h, d)
  return out_BxTxHxK[:, :t].astype(q_BxTxHxK.dtype)


def after(out, *xs):
  """`xs` made to depend on the attention output `out` (plus 0 times one of
  its elements; XLA keeps x + 0 * y for floats), so a state's write follows
  its reads: XLA's copy insertion then updates the state in place instead
  of copying it every step."""
  zero = 0.0 * out.reshape(-1)[0].astype(jnp.float32)
  return tuple((x.astype(jnp.float32) + zero).astype(x.dtype) for x in xs)


class LayerPart(nnx.Module):
  """A family's layer part: its parameters around the op in the shared
  attention layer. The layer projects x to q, k, v (its usual projections),
  then calls `inputs`, the op, and `output`, then its output projection;
  when decoding it keeps the part's own state (a short convolution's last
  inputs) beside the op's."""

  def inputs(self, x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, state):
    """(q, k, v, gates, state): the op's inputs and gate keywords from the
    layer's projections and input, and the part's decode state after these
    T tokens (`state` None in training: no tokens before)."""
    del x_BxTxD
    return q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, {}, state

  def output(self, x_BxTxD, out_BxTxHxK):
    """The op's output made ready for the output projection (H x K)."""
    del x_BxTxD
    return out_BxTxHxK

  def init_state(self, batch: int, dtype):
    """The part's empty decode state (None: it keeps none), laid out batch
    x channels x ... like the ops' states."""
    del batch, dtype
    return None
