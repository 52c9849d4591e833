"""Sliding-window attention against the dense op with an explicit band mask:
values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_reference import (alibi, assert_bf16_close_to_fp32,
                                 assert_causal, assert_matches_dense,
                                 random_qkv)
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
@pytest.mark.parametrize("g", [pytest.param(4, marks=pytest.mark.slow), 2,
                               pytest.param(1, marks=pytest.mark.slow)])
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
  assert_bf16_close_to_fp32("local(window=3)", seed=4)


def test_causal_outputs_ignore_later_keys():
  assert_causal("local(window=3)", seed=5)


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
