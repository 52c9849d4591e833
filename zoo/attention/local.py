"""Sliding-window (local) attention computed on blocks.

The sequence is cut into blocks of `window` positions; each query block
attends to its own key block and its neighbours (the one before when causal,
one on each side when bidirectional), so time and memory grow as
length x window instead of length squared. A band mask inside the blocks
gives exactly the window below, equal to dense attention under that mask.
The blocks run a few at a time (`jax.lax.map` in batches of about 512
positions), so the working set is the same at any length and time stays
linear past the CPU's caches (2048 -> 8192, `python -m
experiments.attention_cost`).

Decoding keeps a ring buffer of the last `window` keys and values (`Ring`),
position p in slot p % W, so memory stays constant however long the
generation.

Shapes: B batch, T length, H heads, G kv heads, R = H // G queries per kv
head, K head dim, N blocks of C positions, L = 2C (causal) or 3C keys per
block.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from zoo import registry
from zoo.attention.base import (AttentionOp, after, attend_with_cache,
                                group_queries)

_CHUNK = 512  # query positions per step of the block loop


@registry.register("attention", "local")
@dataclasses.dataclass(frozen=True)
class Local(AttentionOp):
  """Sliding-window attention: a query at position p sees keys in
  (p - window, p] when causal and [p - window, p + window] when
  bidirectional, so up to `window` keys causal and 2 * window + 1
  bidirectional (`keys_per_query`). Self-attention only (q_len == kv_len)."""

  window: int = 128

  def __post_init__(self):
    if self.window < 1:
      raise ValueError(
          f"attention local(window=...) must be >= 1; got {self.window}")

  def allows(self, i, j, *, t, causal, num_heads):
    del t, num_heads
    if causal:
      return ((i - j >= 0) & (i - j < self.window))[None]
    return (np.abs(i - j) <= self.window)[None]

  def init_state(self, batch, capacity, kv_heads, head_dim, dtype):
    shape = (batch, kv_heads, min(self.window, capacity), head_dim)
    return Ring(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def state_size(self, length, kv_heads, head_dim):
    return 2 * kv_heads * head_dim * min(self.window, length)

  def prefill(self, state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, *, index, bias,
              **gates):
    """Into an empty ring (index the Python int 0) the op runs on the
    prompt; otherwise the new queries attend the ring's keys within the
    window and the new keys."""
    del gates  # this op takes none (refused by `check`)
    t, w = q_BxTxHxK.shape[1], state.k_BxGxWxK.shape[2]
    if isinstance(index, int) and index == 0:
      out = self(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, causal=True, bias=bias)
    else:
      positions_T = index + jnp.arange(t)
      # Slot s holds the newest position < index congruent to s mod W.
      held_W = index - 1 - (index - 1 - jnp.arange(w)) % w
      cached_TxW = (held_W[None] >= 0) & (
          positions_T[:, None] - held_W[None] < self.window)
      gap_TxT = np.arange(t)[:, None] - np.arange(t)[None, :]
      out = attend_with_cache(
          q_BxTxHxK, state.k_BxGxWxK, state.v_BxGxWxK, cached_TxW[None],
          held_W, k_BxTxGxK, v_BxTxGxK,
          ((gap_TxT >= 0) & (gap_TxT < self.window))[None], positions_T, bias)
      k_BxTxGxK, v_BxTxGxK = after(out, k_BxTxGxK, v_BxTxGxK)
    return out, state.write(k_BxTxGxK, v_BxTxGxK, index)

  def decode_step(self, state, q_BxHxK, k_BxGxK, v_BxGxK, *, index, bias,
                  **gates):
    del gates  # this op takes none (refused by `check`)
    out_Bx1xHxK, state = self.prefill(
        state, q_BxHxK[:, None], k_BxGxK[:, None], v_BxGxK[:, None],
        index=jnp.asarray(index, jnp.int32), bias=bias)
    return out_Bx1xHxK[:, 0], state

  def attend(self, q, k, v, *, causal, mask, bias):
    b, t, h, d = q.shape
    g = k.shape[2]
    if k.shape[1] != t:
      raise ValueError(
          f"attention local is self-attention: q_len must equal kv_len; got "
          f"q_len {t}, kv_len {k.shape[1]}")
    c = min(self.window, t)
    n = -(-t // c)
    span = 2 if causal else 3
    back = n * c - t + (0 if causal else c)

    def windows(x_BxTx_):
      """Each block's keys: BxTx... -> BxNxLx..., zeros beyond the ends."""
      pad = [(0, 0), (c, back)] + [(0, 0)] * (x_BxTx_.ndim - 2)
      blocks = jnp.pad(x_BxTx_, pad).reshape(b, n + span - 1, c,
                                              *x_BxTx_.shape[2:])
      return jnp.concatenate([blocks[:, o:o + n] for o in range(span)], 2)

    q_BxNxCxGxRxK = jnp.pad(group_queries(q, g).astype(jnp.float32),
                            [(0, 0), (0, n * c - t)] + [(0, 0)] * 3).reshape(
                                b, n, c, g, h // g, d)
    k_BxNxLxGxK = windows(k.astype(jnp.float32))
    v_BxNxLxGxK = windows(v.astype(jnp.float32))
    # Query a of a block is at block start + a, key j at block start - C + j.
    offset_CxL = c + np.arange(c)[:, None] - np.arange(span * c)[None, :]
    if causal:
      band_CxL = (offset_CxL >= 0) & (offset_CxL < self.window)
    else:
      band_CxL = np.abs(offset_CxL) <= self.window
    valid_BxT = jnp.ones((b, t), bool) if mask is None else mask
    valid_BxNxL = windows(valid_BxT)

    def block(xs):
      """Attention of block i: its queries, keys, values and valid keys."""
      i, q_BxCxGxRxK, k_BxLxGxK, v_BxLxGxK, valid_BxL = xs
      logits_BxGxRxCxL = jnp.einsum("bqgrd,bkgd->bgrqk", q_BxCxGxRxK,
                                    k_BxLxGxK) / np.sqrt(d)
      if bias is not None:
        bias_HxCxL = bias(i * c + jnp.arange(c),
                          (i - 1) * c + jnp.arange(span * c))
        logits_BxGxRxCxL += bias_HxCxL.astype(jnp.float32).reshape(
            g, h // g, c, span * c)
      allowed = band_CxL & valid_BxL[:, None, None, None, :]
      weights = _softmax(jnp.where(allowed, logits_BxGxRxCxL, -jnp.inf))
      return jnp.einsum("bgrqk,bkgd->bqgrd", weights, v_BxLxGxK)

    xs = [jnp.arange(n)] + [jnp.moveaxis(x, 1, 0) for x in (
        q_BxNxCxGxRxK, k_BxNxLxGxK, v_BxNxLxGxK, valid_BxNxL)]
    out_NxBxCxGxRxK = jax.lax.map(block, xs, batch_size=max(1, _CHUNK // c))
    out_BxNxCxGxRxK = jnp.moveaxis(out_NxBxCxGxRxK, 0, 1)
    return out_BxNxCxGxRxK.reshape(b, n * c, h, d)[:, :t].astype(q.dtype)


@struct.dataclass
class Ring:
  """The last W keys and values: slot s holds the newest position p with
  p % W == s."""

  k_BxGxWxK: jax.Array
  v_BxGxWxK: jax.Array

  def write(self, k_BxTxGxK, v_BxTxGxK, index) -> "Ring":
    """The ring after T new keys and values at positions index..: the last
    min(T, W) of them replace the slots of positions that leave the
    window."""
    t, w = k_BxTxGxK.shape[1], self.k_BxGxWxK.shape[2]
    kept = np.arange(max(t - w, 0), t)
    slots = (index + kept) % w

    def put(ring_BxGxWxK, x_BxTxGxK):
      new_BxGxMxK = x_BxTxGxK[:, kept].transpose(0, 2, 1, 3)
      if t == 1:  # an update in place, as a decode step needs
        return jax.lax.dynamic_update_slice_in_dim(
            ring_BxGxWxK, new_BxGxMxK.astype(ring_BxGxWxK.dtype), slots[0],
            axis=2)
      return ring_BxGxWxK.at[:, :, slots].set(
          new_BxGxMxK.astype(ring_BxGxWxK.dtype))

    return Ring(put(self.k_BxGxWxK, k_BxTxGxK),
                put(self.v_BxGxWxK, v_BxTxGxK))


def _softmax(logits):
  """Softmax over the last axis; a row with no finite logit gives zeros (and
  zero gradients rather than NaN)."""
  max_ = logits.max(-1, keepdims=True)
  e = jnp.exp(logits - jnp.where(jnp.isfinite(max_), max_, 0.0))
  total = e.sum(-1, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)
