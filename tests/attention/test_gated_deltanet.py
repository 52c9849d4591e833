"""Gated DeltaNet's layer (zoo/attention/gated_deltanet.py): the shared
attention layer against the same layer in float64 numpy (the forget gate
g = -exp(A_log) softplus(x W_a + dt_bias) and the output gate added to
DeltaNet's); the gate's initial ranges; an LM decodes with its forward
pass's logits."""

import jax
import numpy as np
import pytest

from tests.attention.test_deltanet import layer_and_output, numpy_layer
from tests.models.test_decoding import forward_and_decoded, lm
from zoo import registry


@pytest.mark.parametrize("short_conv", [4, 0])
def test_layer_matches_float64(short_conv):
  """Within 1e-4, as DeltaNet's (tests/attention/test_deltanet.py)."""
  layer, x, out = layer_and_output(f"gated_deltanet(chunk=4, "
                                   f"short_conv={short_conv})")
  want = numpy_layer(layer, x)
  np.testing.assert_allclose(out, want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())


def test_forget_gate_starts_in_mamba2_ranges():
  """A = exp(A_log) in [1, 16] and softplus(dt_bias) = dt in [1e-3, 0.1]
  per kv head (so at zero input the log gate -A dt is in [-1.6, -1e-3]);
  g <= 0 whatever the input."""
  layer, x, _ = layer_and_output("gated_deltanet(chunk=4)")
  part = layer.part
  a = np.exp(np.asarray(part.a_log[...]))
  dt = np.log1p(np.exp(np.asarray(part.dt_bias[...], np.float64)))
  assert a.shape == dt.shape == (2,)
  assert ((1 <= a) & (a <= 16)).all() and ((1e-3 <= dt) & (dt <= 0.1)).all()
  gates = part.gates(x, None)
  assert gates["g"].shape == (2, 13, 2) and (np.asarray(gates["g"]) <= 0).all()


@pytest.mark.slow
def test_lm_decodes_like_its_forward_pass():
  """Prompt pieces, a continuation, single steps and a second turn give the
  forward pass's logits (4 heads over 2 kv heads; 2 layers with short
  convolutions, 1 without)."""
  models = [lm("gated_deltanet(chunk=4)", "sinusoidal", num_layers=2),
            lm("gated_deltanet(chunk=4, short_conv=0)", "sinusoidal",
               num_layers=1)]
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 32)
  runs = jax.jit(lambda t: [forward_and_decoded(m, t) for m in models])(
      tokens)
  for full, decoded, _ in runs:
    np.testing.assert_allclose(decoded, full, atol=2e-5)


def test_defaults():
  op = registry.build("attention", "gated_deltanet")
  assert (op.chunk, op.short_conv, op.gates) == (64, 4, ("beta", "g"))
  assert op.positions == {"none", "absolute"}
