"""RetNet (zoo/attention/retnet.py): the paper's fixed decays and scaled
keys into the op, GroupNorm and the swish gate out (checked in numpy); a
model decodes like its forward pass (with rotary positions too, standing
in for xPos), trains, and is listed."""

import jax
import numpy as np
import pytest

from tests.attention import recurrent_family as family
from zoo import registry

SPEC = "retnet(chunk=4)"


def test_part_feeds_the_papers_decays_and_scaled_keys():
  part, (x, q, k, v) = family.part_and_inputs(SPEC)
  q2, k2, v2, gates, state = part.inputs(x, q, k, v, None)
  gamma = 1 - 2.0 ** (-5 - np.arange(2))
  np.testing.assert_allclose(gates["g"], np.broadcast_to(
      np.log(gamma), (2, 6, 2)), rtol=1e-6)
  np.testing.assert_allclose(k2, k / 2, rtol=1e-6)
  np.testing.assert_array_equal(q2, q)
  np.testing.assert_array_equal(v2, v)
  assert state is None


def test_part_output_is_group_norm_times_swish_gate():
  part, (x, q, _, _) = family.part_and_inputs(SPEC, 1)
  out = np.asarray(part.output(x, q), np.float64)
  o = q.astype(np.float64)
  normed = (o - o.mean(-1, keepdims=True)) / np.sqrt(
      o.var(-1, keepdims=True) + 1e-5)
  gate = np.einsum("btd,dhk->bthk", x, np.asarray(part.gate.kernel[...]))
  np.testing.assert_allclose(out, normed * gate / (1 + np.exp(-gate)),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("position", ["none", "rope"])
def test_model_decodes_like_its_forward_pass(position):
  diff, scale = family.decoding_error(SPEC, position)
  assert scale > 0.1 and diff < 2e-5


@pytest.mark.slow
def test_model_trains_a_step():
  losses = family.train_step_losses(SPEC)
  assert np.isfinite(losses).all() and losses[1] < losses[0]


def test_refuses_a_bias_and_is_listed(capsys):
  with pytest.raises(ValueError, match=r"attention 'retnet\(chunk=4\)' cannot"
                     r" take position 'alibi'"):
    family.lm(SPEC, "alibi")
  out = family.listing(capsys)
  assert "retnet(chunk: int = 64, short_conv: int = 0)" in out
  assert jax.tree.leaves(registry.build("attention", "retnet").init_state(
      1, 8, 2, 4, np.float32))[0].shape == (1, 2, 4, 4)
