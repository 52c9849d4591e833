"""Relative position biases added to the attention logits: ALiBi and T5.

Both give the attention op a callable (q_pos_T, k_pos_S) -> HxTxS of fp32
logits computed from the position vectors alone, so block ops evaluate only
the blocks they visit.
"""

import functools

import jax.numpy as jnp
from flax import nnx

from zoo import registry
from zoo.position.base import Position
from zoo.sharding import logical


def alibi_slopes(num_heads: int) -> list[float]:
  """Per-head slopes of Press et al. 2022: 2^(-8i/H), i = 1..H, when H is a
  power of two; otherwise the slopes of the power of two n below H followed
  by every other slope of the 2n sequence for the remaining H - n heads."""
  if num_heads < 1:
    raise ValueError(f"alibi needs num_heads >= 1, got {num_heads}")
  n = 1 << (num_heads.bit_length() - 1)
  slopes = [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
  if n == num_heads:
    return slopes
  return slopes + alibi_slopes(2 * n)[0::2][:num_heads - n]


@registry.register("position", "alibi")
class Alibi(Position):
  """ALiBi (Press et al. 2022): a fixed per-head linear penalty on distance,
  -slope * |q_pos - k_pos|, no parameters. For causal attention this is the
  paper's -slope * (q_pos - k_pos) on past keys (future keys are masked). In
  an encoder the symmetric |i - j| carries distance but no direction: a key
  before and a key after the query at equal distance are indistinguishable."""

  kind = "bias"

  def __init__(self, *, num_heads: int, **context):
    del context
    self.slopes = tuple(alibi_slopes(num_heads))

  def bias(self):
    slopes_Hx1x1 = jnp.asarray(self.slopes, jnp.float32)[:, None, None]

    def alibi_bias(q_pos_T, k_pos_S):
      distance_TxS = jnp.abs(q_pos_T[:, None] - k_pos_S[None, :])
      return -slopes_Hx1x1 * distance_TxS.astype(jnp.float32)[None]

    return alibi_bias


@functools.cache
def _distance_buckets(num_buckets: int, max_distance: int) -> tuple[int, ...]:
  """Bucket of each distance n = 0..max_distance for one sign: n itself
  below max_exact = num_buckets // 2, else
  max_exact + floor(log(n / max_exact) / log(max_distance / max_exact)
  * (num_buckets - max_exact)), capped at num_buckets - 1. The floor is
  decided in exact integer arithmetic (j <= that log ratio iff
  n^(B-E) E^j >= M^j E^(B-E)), so no float rounding moves a boundary."""
  e, b, m = num_buckets // 2, num_buckets, max_distance
  buckets, j = list(range(e)), 0
  for n in range(e, m + 1):
    while (j + 1 < b - e
           and n**(b - e) * e**(j + 1) >= m**(j + 1) * e**(b - e)):
      j += 1
    buckets.append(e + j)
  return tuple(buckets)


def t5_bucket(relative_position, *, bidirectional: bool, num_buckets: int,
              max_distance: int):
  """T5's `_relative_position_bucket` (Raffel et al. 2020, mesh-tensorflow):
  `relative_position` is key position - query position (int array). Causal:
  keys in the future share bucket 0 with distance 0. Bidirectional: half the
  buckets for keys at or before the query, half (offset num_buckets // 2)
  for keys after it. Within a half, the first half of its buckets are exact
  distances and the rest log-spaced up to max_distance."""
  n = -relative_position
  if bidirectional:
    half = num_buckets // 2
    offset = jnp.where(n < 0, half, 0)
    n, num_buckets = jnp.abs(n), half
  else:
    offset = 0
    n = jnp.maximum(n, 0)
  table = jnp.asarray(_distance_buckets(num_buckets, max_distance), jnp.int32)
  return offset + table[jnp.minimum(n, max_distance)]


@registry.register("position", "t5")
class T5Bias(Position):
  """T5 relative position bias (Raffel et al. 2020): a learned scalar per
  head and log-spaced relative-distance bucket. `bidirectional` defaults to
  the model's direction (separate buckets for keys after the query in an
  encoder, none in a decoder, as T5 does)."""

  kind = "bias"

  def __init__(self, num_buckets: int = 32, max_distance: int = 128,
               bidirectional: bool | None = None, *, num_heads: int,
               causal: bool, rngs: nnx.Rngs, param_dtype=jnp.float32,
               **context):
    del context
    if bidirectional is None:
      bidirectional = not causal
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_exact < 1:
      raise ValueError(
          f"position t5(num_buckets={num_buckets}) needs num_buckets >= "
          f"{4 if bidirectional else 2} (bidirectional={bidirectional})")
    if max_distance <= max_exact:
      raise ValueError(
          f"position t5(max_distance={max_distance}) must exceed the "
          f"{max_exact} exact buckets of num_buckets={num_buckets}")
    self.num_buckets, self.max_distance = num_buckets, max_distance
    self.bidirectional = bidirectional
    init = logical(nnx.initializers.variance_scaling(1.0, "fan_avg",
                                                     "uniform"),
                   None, "heads")
    self.table = nnx.Param(init(rngs.params(), (num_buckets, num_heads),
                                param_dtype))

  def bias(self):
    table_NxH = self.table[...].astype(jnp.float32)

    def t5_bias(q_pos_T, k_pos_S):
      buckets_TxS = t5_bucket(
          k_pos_S[None, :] - q_pos_T[:, None], bidirectional=self.bidirectional,
          num_buckets=self.num_buckets, max_distance=self.max_distance)
      return jnp.transpose(table_NxH[buckets_TxS], (2, 0, 1))

    return t5_bias
