"""DeltaNet's layer (zoo/attention/deltanet.py): the shared attention layer
with the op's layer part against the same layer computed here in float64
numpy from its parameters (short convolutions, L2-normalised q and k, beta,
the delta rule, the per-head RMSNorm); an LM decodes with its forward
pass's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.attention.test_delta import numpy_delta
from tests.models.test_decoding import forward_and_decoded, lm
from zoo import registry
from zoo.layers import MultiHeadAttention

B, T, D, H, G = 2, 13, 16, 4, 2
K = D // H


def silu(x):
  return x / (1 + np.exp(-x))


def numpy_conv(x_BxTxC, kernel_CxW):
  """Causal depthwise convolution then SiLU (zeros before the first
  position)."""
  w = kernel_CxW.shape[1]
  padded = np.pad(x_BxTxC, [(0, 0), (w - 1, 0), (0, 0)])
  t = x_BxTxC.shape[1]
  return silu(sum(padded[:, i:i + t] * kernel_CxW[:, i] for i in range(w)))


def numpy_rms_norm(x, scale):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * scale


def numpy_layer(layer, x_BxTxD):
  """The layer's output in float64 from its parameters: q, k, v
  projections, short convolutions (SiLU alone without), q and k
  L2-normalised (q scaled by K^-1/2), beta = sigmoid(x W_beta), the delta
  rule (with g = -exp(A_log) softplus(x W_a + dt_bias) when the part has
  one), RMSNorm per head (times silu(x W_g) when gated), out projection."""
  p = lambda v: np.asarray(v[...], np.float64)
  part = layer.part
  x = np.asarray(x_BxTxD, np.float64)
  q, k, v = (np.einsum("btd,dhk->bthk", x, p(proj.kernel))
             for proj in (layer.query, layer.key, layer.value))
  if part.conv is None:
    q, k, v = silu(q), silu(k), silu(v)
  else:
    q, k, v = (numpy_conv(y.reshape(B, T, -1), p(conv.kernel_CxW)).reshape(
        y.shape) for y, conv in zip((q, k, v), (
            part.conv.q_conv, part.conv.k_conv, part.conv.v_conv)))
  unit = lambda y: y / np.linalg.norm(y, axis=-1, keepdims=True)
  beta = 1 / (1 + np.exp(-x @ p(part.beta.kernel)))
  g = None
  if hasattr(part, "a_log"):
    a = x @ p(part.a.kernel) + p(part.dt_bias)
    g = -np.exp(p(part.a_log)) * np.log1p(np.exp(a))
  out, _ = numpy_delta(unit(q) * K**-0.5, unit(k), v, beta, g)
  out = numpy_rms_norm(out, p(part.norm.scale))
  if g is not None:
    out = out * silu(np.einsum("btd,dhk->bthk", x, p(part.gate.kernel)))
  return np.einsum("bthk,hkd->btd", out, p(layer.out.kernel))


def layer_and_output(spec):
  """The shared layer with op `spec` (4 heads over 2 kv heads), and its
  output on random input."""
  op = registry.build("attention", spec)
  layer = MultiHeadAttention(embed_dim=D, num_heads=H, num_kv_heads=G, op=op,
                             causal=True, rngs=nnx.Rngs(0))
  position = registry.build("position", "none", embed_dim=D, num_heads=H,
                            seq_len=T, causal=True, rngs=nnx.Rngs(0),
                            param_dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  return layer, x, jax.jit(lambda x: layer(x, position))(x)


@pytest.mark.parametrize("short_conv", [4, 0])
def test_layer_matches_float64(short_conv):
  """Within 1e-4: the per-head RMSNorm divides outputs whose RMS can be
  0.003 at the first positions, magnifying float32 rounding (the op itself
  matches float64 within 1e-5, tests/attention/test_delta.py)."""
  layer, x, out = layer_and_output(f"deltanet(chunk=4, "
                                   f"short_conv={short_conv})")
  want = numpy_layer(layer, x)
  np.testing.assert_allclose(out, want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())
  assert (layer.part.conv is None) == (short_conv == 0)


@pytest.mark.slow
def test_lm_decodes_like_its_forward_pass():
  """Prompt pieces, a continuation, single steps and a second turn give the
  forward pass's logits (4 heads over 2 kv heads; 2 layers with short
  convolutions, 1 without)."""
  models = [lm("deltanet(chunk=4)", "learned", num_layers=2),
            lm("deltanet(chunk=4, short_conv=0)", "learned", num_layers=1)]
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 32)
  runs = jax.jit(lambda t: [forward_and_decoded(m, t) for m in models])(
      tokens)
  for full, decoded, _ in runs:
    np.testing.assert_allclose(decoded, full, atol=2e-5)
  (op_state, conv_state), (_, no_conv) = (runs[0][2].layers[0],
                                          runs[1][2].layers[0])
  assert op_state.s_BxGxKxV.shape == (2, 2, 4, 4)
  assert len(conv_state) == 3 and no_conv is None


def test_defaults_and_state_size():
  op = registry.build("attention", "deltanet")
  assert (op.chunk, op.short_conv, op.gates) == (64, 4, ("beta",))
  assert op.positions == {"none", "absolute"}
  assert op.state_size(4096, 2, 64) == 2 * 64 * 64 + 3 * 2 * 64 * 3
  assert registry.build("attention", "deltanet(short_conv=0)").state_size(
      4096, 2, 64) == 2 * 64 * 64
