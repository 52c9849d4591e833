"""The gated linear recurrence shared by RetNet, GLA, Mamba-2 and Based.

Per kv head a state S (K x V) runs over time as

    S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t,

with g_t the log forget gate (<= 0): one scalar per kv head (BxTxG) or one
per key dim (BxTxGxK), or none (no decay). Each query head reads its kv
head's state (grouped queries). There is no normaliser and no softmax: a
family's feature maps, gates and norms are its layer part.

Three forms, as flash-linear-attention keeps naive / chunk / fused_recurrent:
`reference` (a scan over time), `chunked` (training and prefill) and
`step` (one decoding step).

The chunked form splits time into chunks of C. Within a chunk b_t is the
cumulative log gate from the chunk's start, and every decay is exp of a
difference b_t - b_s with s <= t, never above 1 (never exp(b_t) times
exp(-b_s), which overflows for strong gates): each chunk's own contribution
to the state (keys decayed to the chunk's end) and what it reads from the
state before it (queries decayed from the chunk's start) are computed for
all chunks at once; a lax.scan over chunks only adds the contributions up.
Inside a chunk the pairs (t, s), s <= t, are a masked quadratic form. With
a scalar gate the decay is a C x C matrix. With per-key-dim gates it would
be C x C x K, so the pairs are split along a binary tree over the chunk:
a pair whose ends fall in the two halves of a node factors through the
cumulative gate at the end of the left half, the query decayed down to it
and the key decayed from it (both exponents <= 0), a plain matmul per
node; only pairs within a leaf of at most `_LEAF` positions take the
pairwise decay. That costs log2(C / L) + L decayed copies of K per token
instead of C. Log gates from -20 to -1e-4 per step stay finite in float32.

With the length sharded over a mesh axis (context parallelism,
`mesh.sequence`), `state_passing` runs the chunked form on each shard and
passes states between shards: G x K x V floats per shard, at any length.

`GatedRecurrence` is the op the families subclass (decoding through the
chunked form from a state and the step form); `RecurrencePart` is their
layer part's base (an optional short convolution on q, k and v, then the
family's own inputs).

Shapes: B batch, T length, H query heads, G kv heads, R = H / G, K key
dim, V value dim, J gate width (1 or K), N chunks, C chunk length, P tree
nodes (or leaves) per chunk, L leaf length, E half a node.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from zoo import sharding
from zoo.attention import parts
from zoo.attention.base import AttentionOp, LayerPart

# Largest leaf of the tree that splits a chunk's pairs for per-key-dim
# gates (see the module docstring): pairs inside a leaf take the pairwise
# decay, L x L x K per leaf.
_LEAF = 4


@struct.dataclass
class RecurrenceState:
  """The recurrent state S of each kv head (fp32)."""

  s_BxGxKxV: jax.Array


def step(s_BxGxKxV, q_BxHxK, k_BxGxK, v_BxGxV, g_BxGxJ):
  """One step of the recurrence: (o_BxHxV, S_t) from S_{t-1}."""
  b, h, d = q_BxHxK.shape
  g = k_BxGxK.shape[1]
  s_BxGxKxV = (jnp.exp(g_BxGxJ)[..., None] * s_BxGxKxV
               + k_BxGxK[..., None] * v_BxGxV[:, :, None, :])
  o_BxGxRxV = jnp.einsum("bgrk,bgkv->bgrv", q_BxHxK.reshape(b, g, h // g, d),
                         s_BxGxKxV)
  return o_BxGxRxV.reshape(b, h, -1), s_BxGxKxV


def reference(q_BxTxHxK, k_BxTxGxK, v_BxTxGxV, g_BxTxGxJ, s_BxGxKxV):
  """The recurrence step by step from state `s`: (o_BxTxHxV, final S)."""

  def one(s, xs):
    o, s = step(s, *xs)
    return s, o

  xs = tuple(jnp.moveaxis(x, 1, 0)
             for x in (q_BxTxHxK, k_BxTxGxK, v_BxTxGxV, g_BxTxGxJ))
  final, o_TxBxHxV = jax.lax.scan(one, s_BxGxKxV, xs)
  return jnp.moveaxis(o_TxBxHxV, 0, 1), final


def chunked(q_BxTxHxK, k_BxTxGxK, v_BxTxGxV, g_BxTxGxJ, s_BxGxKxV, *,
            chunk: int = 64):
  """The recurrence in chunks of `chunk` from state `s` (see the module
  docstring): (o_BxTxHxV, final S). Inputs fp32."""
  b, t, h, kd = q_BxTxHxK.shape
  g, vd, j = k_BxTxGxK.shape[2], v_BxTxGxV.shape[3], g_BxTxGxJ.shape[3]
  r = h // g
  c = min(chunk, t)
  n = -(-t // c)

  def split(x):
    """BxTxGx... -> BxGxNxCx..., padded at the end with zeros (no key, no
    decay: the final state is unchanged)."""
    x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, n, c, g, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1)

  q_BxGxNxCxRxK = split(q_BxTxHxK.reshape(b, t, g, r, kd))
  k_BxGxNxCxK = split(k_BxTxGxK)
  v_BxGxNxCxV = split(v_BxTxGxV)
  cum_BxGxNxCxJ = _cumsum_within_chunks(split(g_BxTxGxJ))
  end_BxGxNxJ = cum_BxGxNxCxJ[:, :, :, -1]

  # Each chunk's own keys decayed to its end, and what it reads from the
  # state before it: queries decayed from its start.
  k_end_BxGxNxCxK = k_BxGxNxCxK * jnp.exp(end_BxGxNxJ[:, :, :, None]
                                          - cum_BxGxNxCxJ)
  local_BxGxNxKxV = jnp.einsum("bgnck,bgncv->bgnkv", k_end_BxGxNxCxK,
                               v_BxGxNxCxV)
  final_BxGxKxV, before_BxGxNxKxV = _before_each_chunk(
      jnp.exp(end_BxGxNxJ), local_BxGxNxKxV, s_BxGxKxV)
  q_start_BxGxNxCxRxK = q_BxGxNxCxRxK * jnp.exp(cum_BxGxNxCxJ)[:, :, :, :,
                                                                None]
  o_BxGxNxCxRxV = jnp.einsum("bgncrk,bgnkv->bgncrv", q_start_BxGxNxCxRxK,
                             before_BxGxNxKxV)
  if j == 1:
    o_BxGxNxCxRxV += _within_scalar(q_BxGxNxCxRxK, k_BxGxNxCxK, v_BxGxNxCxV,
                                    cum_BxGxNxCxJ[..., 0])
  else:
    o_BxGxNxCxRxV += _within_vector(q_BxGxNxCxRxK, k_BxGxNxCxK, v_BxGxNxCxV,
                                    cum_BxGxNxCxJ)
  o_BxTxHxV = jnp.moveaxis(o_BxGxNxCxRxV, 1, 3).reshape(b, n * c, h, vd)
  return o_BxTxHxV[:, :t], final_BxGxKxV


def state_passing(q_BxTxHxK, k_BxTxGxK, v_BxTxGxV, g_BxTxGxJ, s_BxGxKxV, *,
                  chunk: int, axis: tuple[str, int]):
  """`chunked` over a length sharded on mesh axis `axis` = (name, shards),
  with one exchange of states (LASP, Sun et al. 2024): each shard runs the
  chunked form from a zero state; the shards' own final states and total
  log decays are gathered (G x K x V floats per shard, whatever the
  length); each shard folds those before it, decayed, into its incoming
  state, and its queries, decayed from the shard's start, read it. Every
  shard folds all of them into the same final state."""
  name, shards = axis
  length = jax.sharding.PartitionSpec(None, name)
  whole = jax.sharding.PartitionSpec()

  def local(q_BxTxHxK, k_BxTxGxK, v_BxTxGxV, g_BxTxGxJ, s_BxGxKxV):
    o_BxTxHxV, own_BxGxKxV = chunked(q_BxTxHxK, k_BxTxGxK, v_BxTxGxV,
                                     g_BxTxGxJ, jnp.zeros_like(s_BxGxKxV),
                                     chunk=chunk)
    cum_BxTxGxJ = jnp.cumsum(g_BxTxGxJ, axis=1)
    own_NxBxGxKxV = jax.lax.all_gather(own_BxGxKxV, name)
    decay_NxBxGxJ = jax.lax.all_gather(cum_BxTxGxJ[:, -1], name)
    here = jax.lax.axis_index(name)
    incoming_BxGxKxV = final_BxGxKxV = s_BxGxKxV
    for j in range(shards):
      final_BxGxKxV = (jnp.exp(decay_NxBxGxJ[j])[..., None] * final_BxGxKxV
                       + own_NxBxGxKxV[j])
      incoming_BxGxKxV = jnp.where(j < here, final_BxGxKxV, incoming_BxGxKxV)
    b, t, h, kd = q_BxTxHxK.shape
    g = k_BxTxGxK.shape[2]
    q_BxTxGxRxK = (q_BxTxHxK.reshape(b, t, g, h // g, kd)
                   * jnp.exp(cum_BxTxGxJ)[:, :, :, None, :])
    o_BxTxHxV += jnp.einsum("btgrk,bgkv->btgrv", q_BxTxGxRxK,
                            incoming_BxGxKxV).reshape(b, t, h, -1)
    return o_BxTxHxV, final_BxGxKxV

  return jax.shard_map(local, in_specs=(length,) * 4 + (whole,),
                       out_specs=(length, whole), axis_names={name},
                       check_vma=False)(q_BxTxHxK, k_BxTxGxK, v_BxTxGxV,
                                        g_BxTxGxJ, s_BxGxKxV)


def _cumsum_within_chunks(g_BxGxNxCxJ):
  """Cumulative sums along C as matmuls by lower triangles, in full fp32:
  within blocks of 8, then the blocks' totals (XLA:CPU's cumsum is a
  reduce-window, which recomputes whatever is fused into its input once
  per window position; one C x C matmul costs C per element)."""
  *lead, c, j = g_BxGxNxCxJ.shape
  e = 8 if c % 8 == 0 else c
  tri = lambda n, k=0: np.tril(np.ones((n, n), np.float32), k)
  sums = lambda t, x: jnp.einsum("ts,...sj->...tj", t, x,
                                 precision=jax.lax.Precision.HIGHEST)
  within_xMxExJ = sums(tri(e), g_BxGxNxCxJ.reshape(*lead, c // e, e, j))
  before_xMxJ = sums(tri(c // e, -1), within_xMxExJ[..., -1, :])
  return (within_xMxExJ + before_xMxJ[..., None, :]).reshape(*lead, c, j)


def _pair_decay(cum_t, cum_s, allowed):
  """exp(b_t - b_s) where `allowed` (s <= t), else 0; the exponent is
  masked before exp, so no pair outside overflows."""
  return jnp.exp(jnp.where(allowed, cum_t - cum_s, -jnp.inf))


def _within_scalar(q_BxGxNxCxRxK, k_BxGxNxCxK, v_BxGxNxCxV, cum_BxGxNxC):
  """Pairs inside each chunk with a scalar gate: a C x C decay matrix."""
  c = cum_BxGxNxC.shape[-1]
  decay_BxGxNxCxC = _pair_decay(cum_BxGxNxC[..., :, None],
                                cum_BxGxNxC[..., None, :],
                                np.tril(np.ones((c, c), bool)))
  scores_BxGxNxCxRxC = jnp.einsum("bgntrk,bgnsk->bgntrs", q_BxGxNxCxRxK,
                                  k_BxGxNxCxK) * decay_BxGxNxCxC[..., None, :]
  return jnp.einsum("bgntrs,bgnsv->bgntrv", scores_BxGxNxCxRxC, v_BxGxNxCxV)


def _within_vector(q_BxGxNxCxRxK, k_BxGxNxCxK, v_BxGxNxCxV, cum_BxGxNxCxK):
  """Pairs inside each chunk with per-key-dim gates (see the module
  docstring): each pair (t, s) is split at exactly one node of a binary
  tree over the chunk, key s in the node's left half and query t in its
  right half, and factors through b at the end of the left half; pairs
  within a leaf take the pairwise decay. Leaves are the chunk halved while
  even and longer than `_LEAF` (a chunk of odd length is one leaf)."""
  b, g, n, c, r, kd = q_BxGxNxCxRxK.shape
  leaf = c
  while leaf % 2 == 0 and leaf > _LEAF:
    leaf //= 2
  leaves = lambda x: x.reshape(b, g, n, c // leaf, leaf, *x.shape[4:])
  cum_BxGxNxPxLxK = leaves(cum_BxGxNxCxK)
  tri_LxLx1 = np.tril(np.ones((leaf, leaf), bool))[:, :, None]
  decay_BxGxNxPxLxLxK = _pair_decay(cum_BxGxNxPxLxK[..., :, None, :],
                                    cum_BxGxNxPxLxK[..., None, :, :],
                                    tri_LxLx1)
  scores_BxGxNxPxLxRxL = jnp.einsum(
      "bgnptrk,bgnptsk->bgnptrs", leaves(q_BxGxNxCxRxK),
      leaves(k_BxGxNxCxK)[..., None, :, :] * decay_BxGxNxPxLxLxK)
  o_BxGxNxCxRxV = jnp.einsum(
      "bgnptrs,bgnpsv->bgnptrv", scores_BxGxNxPxLxRxL,
      leaves(v_BxGxNxCxV)).reshape(b, g, n, c, r, -1)
  half = leaf
  while half < c:
    nodes = lambda x: x.reshape(b, g, n, c // (2 * half), 2, half,
                                *x.shape[4:])
    cum_BxGxNxPx2xExK = nodes(cum_BxGxNxCxK)
    ref_BxGxNxPx1xK = cum_BxGxNxPx2xExK[:, :, :, :, 0, -1:]
    q_ref_BxGxNxPxExRxK = nodes(q_BxGxNxCxRxK)[:, :, :, :, 1] * jnp.exp(
        cum_BxGxNxPx2xExK[:, :, :, :, 1] - ref_BxGxNxPx1xK)[..., None, :]
    k_ref_BxGxNxPxExK = nodes(k_BxGxNxCxK)[:, :, :, :, 0] * jnp.exp(
        ref_BxGxNxPx1xK - cum_BxGxNxPx2xExK[:, :, :, :, 0])
    scores_BxGxNxPxExRxE = jnp.einsum("bgnptrk,bgnpsk->bgnptrs",
                                      q_ref_BxGxNxPxExRxK, k_ref_BxGxNxPxExK)
    right_BxGxNxPxExRxV = jnp.einsum(
        "bgnptrs,bgnpsv->bgnptrv", scores_BxGxNxPxExRxE,
        nodes(v_BxGxNxCxV)[:, :, :, :, 0])
    o_BxGxNxCxRxV += jnp.pad(
        right_BxGxNxPxExRxV[:, :, :, :, None],
        [(0, 0)] * 4 + [(1, 0)] + [(0, 0)] * 3).reshape(o_BxGxNxCxRxV.shape)
    half *= 2
  return o_BxGxNxCxRxV


def _before_each_chunk(decay_BxGxNxJ, local_BxGxNxKxV, s_BxGxKxV):
  """The state before each chunk and after the last, from each chunk's
  decay and own contribution: the carry of a lax.scan over chunks."""

  def add(s_BxGxKxV, chunk):
    decay_BxGxJ, local_BxGxKxV = chunk
    return decay_BxGxJ[..., None] * s_BxGxKxV + local_BxGxKxV, s_BxGxKxV

  final, before_NxBxGxKxV = jax.lax.scan(
      add, s_BxGxKxV, (jnp.moveaxis(decay_BxGxNxJ, 2, 0),
                       jnp.moveaxis(local_BxGxNxKxV, 2, 0)))
  return final, jnp.moveaxis(before_NxBxGxKxV, 0, 2)


@dataclasses.dataclass(frozen=True)
class GatedRecurrence(AttentionOp):
  """Base of the gated linear recurrences: the op computes the recurrence
  of the module docstring over its inputs, causal only; the families
  differ in their layer parts (feature maps, gates, norms).

  A padding mask removes keys: a masked position adds no key and no decay
  (k = 0, g = 0 there). `chunk` is the chunked form's length; `short_conv`
  = W > 0 puts a causal depthwise convolution of width W (SiLU) on q, k
  and v in the layer part. Positions: none or absolute; a bias cannot
  enter a recurrence, and rotary positions would not stay relative
  through a family's feature maps and convolutions (RetNet, which has
  none by default, takes them)."""

  chunk: int = 64
  short_conv: int = 0

  positions = frozenset({"none", "absolute"})
  gates = ("g",)
  any_value_dim = True

  def __post_init__(self):
    for name, low in (("chunk", 1), ("short_conv", 0)):
      if getattr(self, name) < low:
        raise ValueError(
            f"attention {self.registry_name}({name}=...) must be >= {low}; "
            f"got {getattr(self, name)}")

  def state_dims(self, head_dim: int) -> tuple[int, int]:
    """(K, V) of the state for the layer's head dim."""
    return head_dim, head_dim

  def check(self, q, k, v, mask, bias, gates=None):
    super().check(q, k, v, mask, bias, gates)
    g = (gates or {}).get("g")
    if g is not None and g.ndim == 4 and g.shape[3] != k.shape[3]:
      raise ValueError(
          f"attention {self.registry_name}: a per-key-dim gate g must have "
          f"k's head_dim {k.shape[3]} last; got g {g.shape}")

  def attend(self, q, k, v, *, causal, mask, bias, **gates):
    del bias  # refused by check
    if not causal:
      raise ValueError(
          f"attention {self.registry_name} is a causal recurrence; it has no "
          "bidirectional form (use it in a decoder)")
    t, s = q.shape[1], k.shape[1]
    g = self._gate(k, gates.get("g"))
    if mask is not None:
      k = jnp.where(mask[..., None, None], k, 0)
      g = jnp.where(mask[..., None, None], g, 0.0)
    # Align the ends: query i sits at key position s - t + i. Extra leading
    # queries (s > t) are dropped afterwards; extra leading keys (t > s)
    # are none (zeros).
    u = max(t, s)
    front = lambda x, n: jnp.pad(x, [(0, 0), (n, 0)] + [(0, 0)] * (x.ndim - 2))
    out, _ = self._run(front(q, u - t), front(k, u - s), front(v, u - s),
                       front(g, u - s), self._empty(k, v))
    return out[:, u - t:].astype(q.dtype)

  def _gate(self, k, g):
    """The log gate as fp32 Bx(T)xGxJ like k (J = 1 for a scalar gate,
    zeros when the op takes none)."""
    if g is None:
      return jnp.zeros((*k.shape[:-1], 1), jnp.float32)
    g = g.astype(jnp.float32)
    return g[..., None] if g.ndim == k.ndim - 1 else g

  def _empty(self, k, v):
    b, _, g, kd = k.shape
    return jnp.zeros((b, g, kd, v.shape[-1]), jnp.float32)

  def _run(self, q, k, v, g_BxTxGxJ, s_BxGxKxV):
    """The chunked form, or with the length sharded over a mesh axis
    (`sharding.length_axis`), the state-passing form."""
    f32 = lambda x: x.astype(jnp.float32)
    axis = sharding.length_axis()
    if (axis is not None and q.shape[1] == k.shape[1]
        and q.shape[1] % axis[1] == 0):
      return state_passing(f32(q), f32(k), f32(v), g_BxTxGxJ, s_BxGxKxV,
                           chunk=self.chunk, axis=axis)
    return chunked(f32(q), f32(k), f32(v), g_BxTxGxJ, s_BxGxKxV,
                   chunk=self.chunk)

  def init_state(self, batch, capacity, kv_heads, head_dim, dtype):
    """Zero state (fp32 whatever `dtype`), the same size at any
    `capacity`."""
    del capacity, dtype
    kd, vd = self.state_dims(head_dim)
    return RecurrenceState(jnp.zeros((batch, kv_heads, kd, vd), jnp.float32))

  def state_size(self, length, kv_heads, head_dim):
    """G x K x V, plus the short convolution's last W - 1 inputs of q, k
    and v (q's counted at one query head per kv head: the op does not
    know the layer's query heads)."""
    del length
    kd, vd = self.state_dims(head_dim)
    conv = max(self.short_conv - 1, 0) * 3 * kv_heads * head_dim
    return kv_heads * kd * vd + conv

  def prefill(self, state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxV, *, index, bias,
              **gates):
    """The chunked form from `state`: (out, final state)."""
    del index, bias  # a recurrence needs no position; bias refused
    out, s_BxGxKxV = self._run(q_BxTxHxK, k_BxTxGxK, v_BxTxGxV,
                               self._gate(k_BxTxGxK, gates.get("g")),
                               state.s_BxGxKxV)
    return out.astype(q_BxTxHxK.dtype), RecurrenceState(s_BxGxKxV)

  def decode_step(self, state, q_BxHxK, k_BxGxK, v_BxGxV, *, index, bias,
                  **gates):
    """One step of the recurrence (the `step` form)."""
    del index, bias
    f32 = lambda x: x.astype(jnp.float32)
    out, s_BxGxKxV = step(state.s_BxGxKxV, f32(q_BxHxK), f32(k_BxGxK),
                          f32(v_BxGxV), self._gate(k_BxGxK, gates.get("g")))
    return out.astype(q_BxHxK.dtype), RecurrenceState(s_BxGxKxV)


class HeadNorm(nnx.Module):
  """Normalisation of each head's vector (fp32) with a learned scale per
  channel: RMSNorm, or with `centre` LayerNorm with a bias too (GroupNorm
  with one group per head)."""

  def __init__(self, num_heads: int, head_dim: int, *, centre: bool = False,
               eps: float = 1e-5, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.centre, self.eps, self.dtype = centre, eps, dtype
    self.scale_HxK = nnx.Param(jnp.ones((num_heads, head_dim), param_dtype))
    self.bias_HxK = (nnx.Param(jnp.zeros((num_heads, head_dim), param_dtype))
                     if centre else None)

  def __call__(self, x_BxTxHxK):
    x = x_BxTxHxK.astype(jnp.float32)
    if self.centre:
      x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)
    x = x * self.scale_HxK[...].astype(jnp.float32)
    if self.centre:
      x = x + self.bias_HxK[...].astype(jnp.float32)
    return x.astype(self.dtype)


def head_projection(embed_dim: int, heads: int, width: int, *, rngs,
                    dtype, param_dtype):
  """x_BxTxD -> BxTxHxW, a projection to `heads` heads of `width`."""
  return nnx.Einsum("btd,dhw->bthw", (embed_dim, heads, width),
                    kernel_init=nnx.initializers.lecun_normal(
                        in_axis=0, out_axis=(1, 2)),
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class RecurrencePart(LayerPart):
  """A gated recurrence's layer part: the optional short convolution on q,
  k and v (its decode state), then the family's `prepare`."""

  def __init__(self, *, short_conv: int, num_heads: int, num_kv_heads: int,
               head_dim: int, rngs: nnx.Rngs, dtype, param_dtype):
    self.conv = (parts.ConvPart(
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        width=short_conv, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                 if short_conv else None)

  def inputs(self, x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, state):
    if self.conv is not None:
      q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, _, state = self.conv.inputs(
          x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, state)
    return (*self.prepare(x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK), state)

  def prepare(self, x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK):
    """(q, k, v, gates) for the op."""
    raise NotImplementedError

  def init_state(self, batch, dtype):
    return None if self.conv is None else self.conv.init_state(batch, dtype)

