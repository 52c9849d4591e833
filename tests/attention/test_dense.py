"""Dense ops against a direct numpy softmax (an independent reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import registry


def numpy_attention(q, k, v, allowed=None, bias=None):
  """q BxTxHxK, k/v BxSxGxK, allowed BxTxS, bias HxTxS -> BxTxHxK (float64)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, d = q.shape
  s, g = k.shape[1], k.shape[2]
  out = np.zeros((b, t, h, d))
  for bi in range(b):
    for hi in range(h):
      gi = hi // (h // g)
      logits = q[bi, :, hi] @ k[bi, :, gi].T / np.sqrt(d)
      if bias is not None:
        logits = logits + np.asarray(bias[hi], np.float64)
      ok = np.ones((t, s), bool) if allowed is None else allowed[bi]
      logits = np.where(ok, logits, -np.inf)
      for ti in range(t):
        if ok[ti].any():
          w = np.exp(logits[ti] - logits[ti].max())
          out[bi, ti, hi] = (w / w.sum()) @ v[bi, :, gi]
  return out


def random_qkv(seed, b=2, t=7, s=7, h=4, g=2, d=8, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, h, d), dtype),
          jax.random.normal(kk, (b, s, g, d), dtype),
          jax.random.normal(kv, (b, s, g, d), dtype))


def causal_allowed(b, t, s):
  return np.broadcast_to(np.arange(s)[None, :] <= np.arange(s - t, s)[:, None],
                         (b, t, s))


OPS = ["standard", "xla"]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("g", [pytest.param(4, marks=pytest.mark.slow), 2,
                               pytest.param(1, marks=pytest.mark.slow)])
def test_bidirectional_matches_numpy(name, g):
  q, k, v = random_qkv(0, g=g)
  out = registry.build("attention", name)(q, k, v)
  np.testing.assert_allclose(out, numpy_attention(q, k, v), atol=2e-5)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("t,s", [(7, 7), (3, 7)])
def test_causal_matches_numpy(name, t, s):
  q, k, v = random_qkv(1, t=t, s=s)
  out = registry.build("attention", name)(q, k, v, causal=True)
  ref = numpy_attention(q, k, v, causal_allowed(2, t, s))
  np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("name", OPS)
def test_padding_mask_matches_numpy(name):
  q, k, v = random_qkv(2)
  lengths = np.array([7, 4])
  pad_BxS = np.arange(7)[None, :] < lengths[:, None]
  out = registry.build("attention", name)(q, k, v, causal=True,
                                          mask=jnp.asarray(pad_BxS))
  allowed = causal_allowed(2, 7, 7) & pad_BxS[:, None, :]
  np.testing.assert_allclose(out, numpy_attention(q, k, v, allowed),
                             atol=2e-5)


@pytest.mark.parametrize("name", OPS)
def test_full_mask_and_empty_rows(name):
  q, k, v = random_qkv(3)
  allowed = np.random.default_rng(0).random((2, 7, 7)) < 0.5
  allowed[0, 3] = False  # a query with no key: zero output
  out = registry.build("attention", name)(q, k, v, mask=jnp.asarray(allowed))
  np.testing.assert_allclose(out, numpy_attention(q, k, v, allowed),
                             atol=2e-5)
  assert not np.asarray(out[0, 3]).any()


@pytest.mark.parametrize("name", OPS)
def test_bias_function_matches_numpy(name):
  q, k, v = random_qkv(4)
  slopes = jnp.array([0.5, 0.25, 0.125, 0.0625])

  def bias(q_pos, k_pos):
    return -slopes[:, None, None] * jnp.abs(q_pos[:, None] - k_pos[None, :])

  out = registry.build("attention", name)(q, k, v, causal=True, bias=bias)
  ref = numpy_attention(q, k, v, causal_allowed(2, 7, 7),
                        bias=np.asarray(bias(jnp.arange(7), jnp.arange(7))))
  np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("name", OPS)
def test_bf16_inputs_give_bf16_close_to_fp32(name):
  q, k, v = random_qkv(5)
  op = registry.build("attention", name)
  out = op(*(a.astype(jnp.bfloat16) for a in (q, k, v)), causal=True)
  assert out.dtype == jnp.bfloat16
  ref = numpy_attention(q, k, v, causal_allowed(2, 7, 7))
  np.testing.assert_allclose(out.astype(np.float32), ref, atol=0.1)


def test_bad_shapes_and_masks_are_refused():
  q, k, v = random_qkv(6, h=3, g=2)
  op = registry.build("attention", "standard")
  with pytest.raises(ValueError, match="kv_heads must divide heads"):
    op(q, k, v)
  q, k, v = random_qkv(6)
  with pytest.raises(ValueError, match="mask must be bool"):
    op(q, k, v, mask=jnp.ones((2, 7), jnp.int32))
  with pytest.raises(ValueError, match="want q"):
    op(q[0], k, v)
