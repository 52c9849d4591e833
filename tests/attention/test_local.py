"""Sliding-window attention against the dense op with an explicit band mask:
values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_reference import (alibi, assert_matches_dense, random_qkv,
                                 value_and_grads)
from zoo import registry




def band_mask(b, t, window, causal, lengths=None):
  """BxTxT numpy bool: key j visible from query i when i - window < j <= i
  (causal) or |i - j| <= window (bidirectional), and j is not padding."""
  offset = np.arange(t)[:, None] - np.arange(t)[None, :]
  if causal:
    band = (offset >= 0) & (offset < window)
  else:
    band = np.abs(offset) <= window
  allowed = np.broadcast_to(band, (b, t, t))
  if lengths is not None:
    allowed = allowed & (np.arange(t)[None, :]
                         < np.asarray(lengths)[:, None])[:, None]
  return allowed








def assert_matches_reference(q, k, v, allowed, *, window, **kwargs):
  return assert_matches_dense(f"local(window={window})", q, k, v, allowed,
                              **kwargs)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("g", [4, 2, 1])
def test_matches_dense_with_band(causal, g):
  # 11 positions in blocks of 3: the last block is padded.
  q, k, v = random_qkv(0, g=g)
  assert_matches_reference(q, k, v, band_mask(2, 11, 3, causal), window=3,
                           causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_window_of_one(causal):
  q, k, v = random_qkv(1, t=5)
  assert_matches_reference(q, k, v, band_mask(2, 5, 1, causal), window=1,
                           causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_padding_mask_and_bias_match_dense(causal):
  q, k, v = random_qkv(2, b=3)
  lengths = [11, 6, 0]  # the last sequence has no real key at all
  pad_BxT = jnp.asarray(np.arange(11)[None, :] < np.array(lengths)[:, None])
  bias = alibi(jnp.array([0.5, 0.25, 0.125, 0.0625]))
  out = assert_matches_reference(q, k, v,
                                 band_mask(3, 11, 4, causal, lengths),
                                 window=4, causal=causal, mask=pad_BxT,
                                 bias=bias)
  assert not np.asarray(out[2]).any()


@pytest.mark.parametrize("causal,window", [(True, 16), (False, 11)])
def test_window_covering_the_sequence_is_dense(causal, window):
  q, k, v = random_qkv(3)
  allowed = np.ones((2, 11, 11), bool)
  if causal:
    allowed &= np.tril(allowed[0])
  assert_matches_reference(q, k, v, allowed, window=window, causal=causal)


def test_bf16_inputs_give_bf16_close_to_fp32():
  q, k, v = random_qkv(4)
  op = registry.build("attention", "local(window=3)")

  @jax.jit
  def run(q, k, v):
    return op(q, k, v, causal=True), value_and_grads(op, q, k, v,
                                                     causal=True)[1]

  out, grads = run(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
  want_out, want_grads = run(q, k, v)
  assert out.dtype == jnp.bfloat16
  assert all(grad.dtype == jnp.bfloat16 for grad in grads)
  np.testing.assert_allclose(np.asarray(out, np.float32), want_out, atol=0.1)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.15)


def test_causal_outputs_ignore_later_keys():
  q, k, v = random_qkv(5)
  op = jax.jit(functools.partial(registry.build("attention", "local(window=3)"),
                                 causal=True))
  noise_k, noise_v = random_qkv(6)[1:]
  out = np.asarray(op(q, k, v))
  for t in (0, 4, 9):
    later = (np.arange(11) > t)[None, :, None, None]
    perturbed = np.asarray(op(q, np.where(later, noise_k, k),
                              np.where(later, noise_v, v)))
    np.testing.assert_array_equal(out[:, :t + 1], perturbed[:, :t + 1])
    assert not np.allclose(out[:, t + 1:], perturbed[:, t + 1:])


def test_memory_grows_with_window_not_length_squared():
  t = 4096
  q, k, v = (jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32),) * 3
  op = registry.build("attention", "local(window=16)")
  grad = jax.grad(lambda q, k, v: jnp.sum(op(q, k, v, causal=False)),
                  argnums=(0, 1, 2))
  temp = jax.jit(grad).lower(q, k, v).compile().memory_analysis()
  assert temp.temp_size_in_bytes < t * t * 4 / 8  # a TxT fp32 matrix is 64 MiB


@pytest.mark.parametrize("window", [0, -3])
def test_bad_window_is_refused(window):
  with pytest.raises(ValueError, match="window"):
    registry.build("attention", f"local(window={window})")


def test_cross_attention_is_refused():
  q = np.zeros((1, 5, 2, 4), np.float32)
  kv = np.zeros((1, 7, 2, 4), np.float32)
  with pytest.raises(ValueError, match="q_len must equal kv_len"):
    registry.build("attention", "local(window=2)")(q, kv, kv)
