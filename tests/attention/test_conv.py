"""The conv layer (zoo/attention/conv.py): out_t = silu of a causal
depthwise convolution of v (checked in numpy), each query head reading its
kv head; causal only; a hybrid 'conv;standard' model decodes like its
forward pass."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.attention import recurrent_family as family
from zoo import registry


def test_output_is_the_causal_convolution_of_the_values():
  part, (x, q, k, v) = family.part_and_inputs("conv(width=3)")
  q2, k2, v2, gates, state = part.inputs(x, q, k, v, None)
  out = np.asarray(registry.build("attention", "conv(width=3)")(
      q2, k2, v2, causal=True), np.float64)
  b, t, g, d = v.shape
  kernel = np.asarray(part.conv.kernel_CxW[...], np.float64).reshape(g, d, 3)
  padded = np.concatenate([np.zeros((b, 2, g, d)), v.astype(np.float64)], 1)
  conv = sum(padded[:, w:w + t] * kernel[:, :, w] for w in range(3))
  expected = conv / (1 + np.exp(-conv))
  heads = q.shape[2]
  np.testing.assert_allclose(out, np.repeat(expected, heads // g, axis=2),
                             rtol=1e-5, atol=1e-6)
  assert gates == {} and state.shape == (b, g * d, 2)
  np.testing.assert_allclose(np.asarray(state).transpose(0, 2, 1),
                             v[:, -2:].reshape(b, 2, g * d))


def test_conv_is_causal_only_and_checks_width():
  op = registry.build("attention", "conv")
  x = jnp.ones((1, 4, 2, 4))
  with pytest.raises(ValueError, match="conv is causal"):
    op(x, x, x, causal=False)
  with pytest.raises(ValueError, match=r"conv\(width=...\) must be >= 1"):
    registry.build("attention", "conv(width=0)")
  assert op.keys_per_query(16, True) == 1.0
  assert op.state_size(16, 2, 8) == 3 * 2 * 8


def test_hybrid_model_decodes_like_its_forward_pass():
  error, scale = family.decoding_error("conv;standard")
  assert error <= 2e-5 * max(scale, 1.0)
