"""Mamba-2 (zoo/attention/mamba2.py): Delta, A, B and the skip D into the
op, the gated RMSNorm out (checked in numpy), the op's skip against a
float64 recurrence; a model (short convolution of 4 by default) decodes
like its forward pass, trains, and is listed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.attention import recurrent_family as family
from zoo import registry

SPEC = "mamba2(chunk=4)"


def test_part_feeds_delta_a_and_d():
  part, (x, q, k, v) = family.part_and_inputs("mamba2(short_conv=0)")
  q2, k2, v2, gates, _ = part.inputs(x, q, k, v, None)
  dt = np.log1p(np.exp(x.astype(np.float64) @ np.asarray(part.dt.kernel[...])
                       + np.asarray(part.dt_bias_G[...])))
  a = -np.exp(np.asarray(part.a_log_G[...], np.float64))
  np.testing.assert_allclose(gates["g"], dt * a, rtol=1e-5)
  np.testing.assert_allclose(k2, k * dt[..., None], rtol=1e-5)
  np.testing.assert_allclose(gates["d"], np.ones((2, 6, 2)))
  np.testing.assert_array_equal(q2, q)
  np.testing.assert_array_equal(v2, v)
  # The paper's initial ranges: Delta_0 in [1e-3, 0.1], -A in [1, 16].
  dt0 = np.log1p(np.exp(np.asarray(part.dt_bias_G[...])))
  assert ((dt0 >= 1e-3 - 1e-9) & (dt0 <= 0.1 + 1e-9)).all()
  assert ((-a >= 1) & (-a <= 16)).all()


def test_part_output_is_a_gated_rms_norm():
  part, (x, q, _, _) = family.part_and_inputs(SPEC, 1)
  out = np.asarray(part.output(x, q), np.float64)
  z = np.einsum("btd,dhk->bthk", x, np.asarray(part.z.kernel[...]))
  gated = q * z / (1 + np.exp(-z))
  want = gated / np.sqrt((gated * gated).mean(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_op_adds_the_skip_to_the_recurrence():
  """out_t = S_t^T C_t + D x_t, S_t = exp(g_t) S_{t-1} + k_t x_t^T in
  float64, query head h on kv head h // 2."""
  rng = np.random.default_rng(2)
  b, t, h, g, k = 2, 9, 4, 2, 4
  q = rng.standard_normal((b, t, h, k)).astype(np.float32)
  kk, v = (rng.standard_normal((b, t, g, k)).astype(np.float32)
           for _ in range(2))
  gate = -rng.uniform(0.01, 2, (b, t, g)).astype(np.float32)
  d = np.broadcast_to(rng.standard_normal(g), (b, t, g)).astype(np.float32)
  op = registry.build("attention", SPEC)
  out = jax.jit(lambda *a: op(*a[:3], causal=True, g=a[3], d=a[4]))(
      q, kk, v, gate, d)
  s, want = np.zeros((b, g, k, k)), np.zeros((b, t, h, k))
  for i in range(t):
    s = np.exp(gate[:, i])[..., None, None] * s + np.einsum(
        "bgk,bgv->bgkv", kk[:, i], v[:, i])
    for head in range(h):
      want[:, i, head] = (np.einsum("bk,bkv->bv", q[:, i, head],
                                    s[:, head // 2])
                          + d[:, i, head // 2, None] * v[:, i, head // 2])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  state = op.init_state(b, t, g, k, jnp.float32)
  first, state = op.prefill(state, q[:, :5], kk[:, :5], v[:, :5], index=0,
                            bias=None, g=gate[:, :5], d=d[:, :5])
  step, _ = op.decode_step(state, q[:, 5], kk[:, 5], v[:, 5], index=5,
                           bias=None, g=gate[:, 5], d=d[:, 5])
  np.testing.assert_allclose(first, want[:, :5], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(step, want[:, 5], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_model_decodes_like_its_forward_pass():
  diff, scale = family.decoding_error(SPEC)
  assert scale > 0.1 and diff < 2e-5


@pytest.mark.slow
def test_model_trains_a_step():
  losses = family.train_step_losses(SPEC)
  assert np.isfinite(losses).all() and losses[1] < losses[0]


def test_is_listed_with_its_state(capsys):
  assert "mamba2(chunk: int = 64, short_conv: int = 4)" in family.listing(
      capsys)
  op = registry.build("attention", "mamba2")
  assert op.gates == ("g", "d")
  assert op.state_size(4096, 2, 64) == 2 * 64 * 64 + 3 * 3 * 2 * 64
