"""Sliding-window (local) attention computed on blocks.

The sequence is cut into blocks of `window` positions; each query block
attends to its own key block and its neighbours (the one before when causal,
one on each side when bidirectional), so time and memory grow as
length x window instead of length squared. A band mask inside the blocks
gives exactly the window below, equal to dense attention under that mask.
The blocks run a few at a time (`jax.lax.map` in batches of about 512
positions), so the working set is the same at any length and time stays
linear past the CPU's caches (2048 -> 8192, `python -m
experiments.attention_cost`: all blocks at once 1.11-1.22, in batches
0.94-1.16 across runs on a shared machine).

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


def _softmax(logits):
  """Softmax over the last axis; a row with no finite logit gives zeros (and
  zero gradients rather than NaN)."""
  max_ = logits.max(-1, keepdims=True)
  e = jnp.exp(logits - jnp.where(jnp.isfinite(max_), max_, 0.0))
  total = e.sum(-1, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)
