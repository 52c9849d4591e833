"""ALiBi and T5 biases against values worked out by hand from the papers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo import registry
from zoo.position.relative import alibi_slopes, t5_bucket


def build(spec, num_heads=2, causal=True):
  return registry.build("position", spec, embed_dim=8 * num_heads,
                        num_heads=num_heads, seq_len=8, causal=causal,
                        rngs=nnx.Rngs(0), param_dtype=jnp.float32)


def test_alibi_slopes_power_of_two():
  assert alibi_slopes(8) == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64,
                             1 / 128, 1 / 256]
  assert alibi_slopes(2) == [1 / 16, 1 / 256]


def test_alibi_slopes_interpolated():
  # H=6: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then every other slope of
  # the 8-head sequence (2^-1, 2^-3, ...) for the 2 remaining heads.
  assert alibi_slopes(6) == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]
  # H=12: the 8-head slopes, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 from the
  # 16-head sequence 2^(-i/2).
  r = 2 ** -0.5
  np.testing.assert_allclose(
      alibi_slopes(12),
      [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256,
       r, r / 2, r / 4, r / 8], rtol=1e-15)


def test_alibi_bias_worked_example():
  bias = build("alibi").bias()  # slopes 1/16, 1/256
  out_HxTxS = bias(jnp.array([2, 3]), jnp.array([0, 1, 2, 3]))
  distance = np.array([[2, 1, 0, 1], [3, 2, 1, 0]])
  np.testing.assert_allclose(out_HxTxS,
                             [-distance / 16, -distance / 256], rtol=1e-6)
  assert out_HxTxS.dtype == jnp.float32


# (key position - query position, causal bucket, bidirectional bucket) for
# num_buckets=32, max_distance=128, worked out from T5's formula. With
# n = query - key: causal (32 buckets) keeps n < 16 exact, else
# 16 + floor(ln(n/16) / ln(8) * 16) capped at 31, and future keys (n < 0) go
# to 0. Bidirectional halves to 16 buckets per sign: |n| < 8 exact, else
# 8 + floor(ln(|n|/8) / ln(16) * 8) capped at 15, plus 16 when n < 0.
T5_CASES = [
    (0, 0, 0),
    (-1, 1, 1),
    (-5, 5, 5),
    (-7, 7, 7),
    (-8, 8, 8),  # bidirectional: ln(1) = 0
    (-15, 15, 9),  # bidir: 8*ln(15/8)/ln(16) = 1.81
    (-16, 16, 10),  # causal: ln(1) = 0; bidir: 8*ln(2)/ln(16) = 2 exactly
    (-20, 17, 10),  # causal: 16*ln(1.25)/ln(8) = 1.72; bidir: 2.64
    (-50, 24, 13),  # causal: 16*ln(3.125)/ln(8) = 8.77; bidir: 5.29
    (-100, 30, 15),  # causal: 16*ln(6.25)/ln(8) = 14.10; bidir: 7.29
    (-127, 31, 15),  # causal: 15.94; bidir: 7.98
    (-200, 31, 15),  # past max_distance: capped
    (3, 0, 19),  # a future key: 16 + 3
    (50, 0, 29),  # 16 + (8 + floor(5.29))
    (1000, 0, 31),  # 16 + 15
]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_t5_buckets_worked_examples(bidirectional):
  relative = jnp.array([r for r, _, _ in T5_CASES])
  want = [c[2 if bidirectional else 1] for c in T5_CASES]
  got = t5_bucket(relative, bidirectional=bidirectional, num_buckets=32,
                  max_distance=128)
  np.testing.assert_array_equal(got, want)


def test_t5_bias_looks_up_the_table():
  pe = build("t5", num_heads=2)
  assert pe.table.shape == (32, 2)
  assert pe.table.get_metadata()["out_sharding"] == (None, "heads")
  pe.table[...] = jnp.arange(32.0)[:, None] + jnp.array([0.0, 100.0])
  out_HxTxS = pe.bias()(jnp.array([5]), jnp.array([5, 4, 0, 6]))
  # distances 0, 1, 5 and a future key (bucket 0 when causal)
  np.testing.assert_array_equal(out_HxTxS, [[[0, 1, 5, 0]],
                                            [[100, 101, 105, 100]]])


@pytest.mark.parametrize("spec", ["alibi", "t5", "t5(bidirectional=True)"])
def test_bias_on_blocks_matches_the_full_table(spec):
  bias = build(spec, num_heads=3).bias()
  q_T, k_S = jnp.arange(4, 12), jnp.arange(12)
  full_HxTxS = bias(q_T, k_S)
  np.testing.assert_array_equal(bias(q_T[2:5], k_S[6:10]),
                                full_HxTxS[:, 2:5, 6:10])
  # relative: shifting both positions changes nothing
  np.testing.assert_array_equal(bias(q_T + 37, k_S + 37), full_HxTxS)


def test_t5_direction_follows_the_model():
  """Decoder: no buckets for future keys; encoder: keys after the query get
  their own buckets (T5's bidirectional form), unless the spec says."""
  assert not build("t5", causal=True).bidirectional
  assert build("t5", causal=False).bidirectional
  assert not build("t5(bidirectional=False)", causal=False).bidirectional
  encoder = build("t5", causal=False)
  encoder.table[...] = jnp.arange(32.0)[:, None] + jnp.array([0.0, 100.0])
  out_HxTxS = encoder.bias()(jnp.array([5]), jnp.array([4, 6]))
  assert out_HxTxS[0, 0, 0] != out_HxTxS[0, 0, 1]


def test_t5_table_is_learned():
  pe = build("t5")

  def loss(pe):
    return (pe.bias()(jnp.arange(4), jnp.arange(4)) ** 2).sum()

  grads = nnx.grad(loss)(pe)
  assert jnp.abs(grads.table[...]).sum() > 0


@pytest.mark.parametrize("spec,match", [
    ("t5(num_buckets=1)", r"needs num_buckets >= 2"),
    ("t5(num_buckets=2, bidirectional=True)", r"needs num_buckets >= 4"),
    ("t5(num_buckets=32, max_distance=16)",
     r"max_distance=16\) must exceed the 16 exact buckets"),
])
def test_t5_bad_arguments_are_refused(spec, match):
  with pytest.raises(ValueError, match=match):
    build(spec)


def test_causal_alibi_attention_is_the_papers_form():
  # Causal attention with ALiBi: softmax(q.k / sqrt(K) - slope * (i - j))
  # over keys j <= i, written out in numpy.
  q, k, v = (np.asarray(jax.random.normal(key, (1, 6, 2, 4)))
             for key in jax.random.split(jax.random.key(0), 3))
  out = registry.build("attention", "standard")(
      q, k, v, causal=True, bias=build("alibi").bias())
  i, j = np.arange(6)[:, None], np.arange(6)[None, :]
  slopes = np.array([1 / 16, 1 / 256])[:, None, None]
  logits = np.einsum("thk,shk->hts", q[0], k[0]) / 2 - slopes * (i - j)
  logits = np.where(j <= i, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  np.testing.assert_allclose(out[0], np.einsum("hts,shk->thk", weights, v[0]),
                             atol=1e-5)
