"""Sliding-window (local) attention computed on blocks.

The sequence is cut into blocks of `window` positions; each query block
attends to its own key block and its neighbours (the one before when causal,
one on each side when bidirectional), so time and memory grow as
length x window instead of length squared. A band mask inside the blocks
gives exactly the window below, equal to dense attention under that mask.

Shapes: B batch, T length, H heads, G kv heads, R = H // G queries per kv
head, K head dim, N blocks of C positions, L = 2C (causal) or 3C keys per
block.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from zoo import registry
from zoo.attention.base import AttentionOp, group_queries


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
    logits_BxNxGxRxCxL = jnp.einsum("bnqgrd,bnkgd->bngrqk", q_BxNxCxGxRxK,
                                    k_BxNxLxGxK) / np.sqrt(d)
    if bias is not None:

      def block_bias(i):
        return bias(i * c + jnp.arange(c), (i - 1) * c + jnp.arange(span * c))

      bias_NxHxCxL = jax.vmap(block_bias)(jnp.arange(n)).astype(jnp.float32)
      logits_BxNxGxRxCxL += bias_NxHxCxL.reshape(n, g, h // g, c, span * c)

    # Query a of a block is at block start + a, key j at block start - C + j.
    offset_CxL = c + np.arange(c)[:, None] - np.arange(span * c)[None, :]
    if causal:
      band_CxL = (offset_CxL >= 0) & (offset_CxL < self.window)
    else:
      band_CxL = np.abs(offset_CxL) <= self.window
    valid_BxT = jnp.ones((b, t), bool) if mask is None else mask
    valid_BxNxL = windows(valid_BxT)
    allowed = band_CxL & valid_BxNxL[:, :, None, None, None, :]
    weights = _softmax(jnp.where(allowed, logits_BxNxGxRxCxL, -jnp.inf))
    out_BxNxCxGxRxK = jnp.einsum("bngrqk,bnkgd->bnqgrd", weights, v_BxNxLxGxK)
    return out_BxNxCxGxRxK.reshape(b, n * c, h, d)[:, :t].astype(q.dtype)


def _softmax(logits):
  """Softmax over the last axis; a row with no finite logit gives zeros (and
  zero gradients rather than NaN)."""
  max_ = logits.max(-1, keepdims=True)
  e = jnp.exp(logits - jnp.where(jnp.isfinite(max_), max_, 0.0))
  total = e.sum(-1, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)
