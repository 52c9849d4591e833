"""Blockwise attention against the dense op with an explicit mask: values and
gradients, with blocks small enough that every case spans several of them;
on CPU, which calls run the fused kernel and which the XLA form."""

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_reference import (alibi, assert_bf16_close_to_fp32,
                                 assert_causal, assert_matches_dense,
                                 random_qkv)
from zoo import registry
from zoo.attention.kernels import fused_cpu, placement

# The XLA form, in blocks small enough to span several (the default on CPU
# runs the fused kernel wherever it applies).
SMALL = "blockwise(block_q=4, block_k=3, implementation='xla')"
FUSED = "blockwise(implementation='fused')"
needs_kernel = pytest.mark.skipif(fused_cpu.unavailable() is not None,
                                  reason=str(fused_cpu.unavailable()))


def allowed_mask(b, t, s, causal, lengths=None):
  """BxTxS numpy bool: end-aligned causal triangle and key padding."""
  allowed = np.ones((b, t, s), bool)
  if causal:
    allowed &= np.arange(s)[None, :] <= np.arange(s - t, s)[:, None]
  if lengths is not None:
    allowed &= (np.arange(s)[None, :] < np.asarray(lengths)[:, None])[:, None]
  return allowed


def assert_matches_reference(q, k, v, allowed, *, spec=SMALL, **kwargs):
  return assert_matches_dense(spec, q, k, v, allowed, **kwargs)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("g", [pytest.param(4, marks=pytest.mark.slow), 2, 1])
def test_matches_dense(causal, g):
  q, k, v = random_qkv(0, g=g)
  assert_matches_reference(q, k, v, allowed_mask(2, 11, 11, causal),
                           causal=causal)


@pytest.mark.parametrize("causal,t,s", [(True, 5, 11), (True, 11, 7),
                                        (False, 11, 7)])
def test_unequal_lengths_match_dense(causal, t, s):
  # Causal with t > s leaves the first queries no key: zero output.
  q, k, v = random_qkv(1, t=t, s=s)
  assert_matches_reference(q, k, v, allowed_mask(2, t, s, causal),
                           causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_padding_mask_and_bias_match_dense(causal):
  q, k, v = random_qkv(2, b=3, t=7, s=11)
  lengths = [11, 5, 0]  # the last sequence has no real key at all
  pad_BxS = jnp.asarray(np.arange(11)[None, :] < np.array(lengths)[:, None])
  bias = alibi(jnp.array([0.5, 0.25, 0.125, 0.0625]))
  out = assert_matches_reference(q, k, v,
                                 allowed_mask(3, 7, 11, causal, lengths),
                                 causal=causal, mask=pad_BxS, bias=bias)
  assert not np.asarray(out[2]).any()


def test_bias_parameters_get_dense_gradients_under_jit():
  # A learned bias (T5-style) needs gradients through the custom backward.
  q, k, v = random_qkv(4)
  slopes = jnp.array([0.5, 0.25, 0.125, 0.0625])
  pad_BxS = jnp.asarray(np.arange(11)[None, :] < np.array([11, 8])[:, None])
  allowed = jnp.asarray(allowed_mask(2, 11, 11, True, [11, 8]))

  def loss(name, slopes, q, k, v):
    op = registry.build("attention", name)
    if name == "standard":
      out = op(q, k, v, mask=allowed, bias=alibi(slopes))
    else:
      out = op(q, k, v, causal=True, mask=pad_BxS, bias=alibi(slopes))
    return jnp.sum(out * jnp.cos(q))

  grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0)
  for got, want in zip(grad(SMALL, slopes, q, k, v),
                       grad("standard", slopes, q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=5e-5)


def test_default_blocks_longer_than_sequence():
  q, k, v = random_qkv(5, t=7, s=9)
  assert_matches_reference(q, k, v, allowed_mask(2, 7, 9, True), causal=True,
                           spec="blockwise")


@pytest.mark.slow
def test_bf16_inputs_give_bf16_close_to_fp32():
  assert_bf16_close_to_fp32(SMALL, seed=6)


def test_causal_outputs_ignore_later_keys():
  assert_causal(SMALL, seed=7)


@pytest.mark.slow
def test_backward_memory_is_linear_in_length():
  op = registry.build(
      "attention", "blockwise(block_q=128, block_k=128, implementation='xla')")
  grad = jax.grad(lambda q, k, v: jnp.sum(op(q, k, v, causal=True)),
                  argnums=(0, 1, 2))
  temp = {}
  for t in (2048, 4096):
    q, k, v = (jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32),) * 3
    temp[t] = jax.jit(grad).lower(q, k, v).compile().memory_analysis(
        ).temp_size_in_bytes
  assert temp[4096] < 2.5 * temp[2048]  # quadratic would be 4x
  assert temp[4096] < 4096 * 4096 * 4 / 8  # a TxS fp32 matrix is 64 MiB


@pytest.mark.parametrize("spec,name", [
    ("blockwise(block_q=0)", "block_q"), ("blockwise(block_k=-2)", "block_k"),
    ("blockwise(implementation='triton')", "None, 'xla', 'fused'")])
def test_bad_arguments_are_refused(spec, name):
  with pytest.raises(ValueError, match=name):
    registry.build("attention", spec)


def test_full_mask_is_refused():
  q, k, v = random_qkv(9)
  with pytest.raises(ValueError, match="mask must be bool"):
    registry.build("attention", SMALL)(q, k, v,
                                       mask=np.ones((2, 11, 11), bool))


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("g", [pytest.param(4, marks=pytest.mark.slow), 2, 1])
def test_fused_matches_dense(causal, g):
  q, k, v = random_qkv(10, t=37, g=g, d=24)
  assert_matches_reference(q, k, v, allowed_mask(2, 37, 37, causal),
                           causal=causal, spec=FUSED)


@needs_kernel
def test_fused_bf16_and_causality():
  assert_bf16_close_to_fp32(FUSED, seed=11)
  assert_causal(FUSED, seed=12)


def _lowered(spec, t=11, s=11, **kwargs):
  q, k, v = random_qkv(13, t=t, s=s)
  op = registry.build("attention", spec)
  return jax.jit(lambda q, k, v: op(q, k, v, causal=True, **kwargs)).lower(
      q, k, v).as_text()


@needs_kernel
def test_default_runs_the_kernel_only_where_it_applies():
  pad_BxS = jnp.asarray(np.arange(11)[None, :] < np.array([11, 8])[:, None])
  assert "zoo_attention_forward" in _lowered("blockwise")
  for kwargs in ({"mask": pad_BxS}, {"bias": alibi(jnp.ones(4))},
                 {"t": 5}):
    assert "zoo_attention_forward" not in _lowered("blockwise", **kwargs)
  assert "zoo_attention_forward" not in _lowered(SMALL)


def test_fused_refuses_calls_it_cannot_take():
  q, k, v = random_qkv(14)
  op = registry.build("attention", FUSED)
  with pytest.raises(ValueError, match="implementation='fused'.*padding mask"):
    op(q, k, v, mask=jnp.ones((2, 11), bool))
  with pytest.raises(ValueError, match="q_len != kv_len"):
    op(q[:, :5], k, v, causal=True)


def test_unbuildable_kernel_falls_back_with_a_warning(monkeypatch):
  reason = "the fused CPU attention kernel could not be built: no compiler"
  monkeypatch.setattr(fused_cpu, "unavailable", lambda: reason)
  monkeypatch.setattr(placement, "_WARNED", set())
  warnings = []
  monkeypatch.setattr(logging, "warning", warnings.append)
  assert "zoo_attention_forward" not in _lowered("blockwise")
  assert warnings == [f"attention blockwise: {reason}; running the XLA form"]
  with pytest.raises(ValueError, match="no compiler"):
    registry.build("attention", FUSED)(*random_qkv(15), causal=True)
