"""GLA (zoo/attention/gla.py): the low-rank per-key-dim forget gate into
the op, RMSNorm and the swish gate out (checked in numpy); a model decodes
like its forward pass, trains, and is listed; rotary positions refused."""

import numpy as np
import pytest

from tests.attention import recurrent_family as family
from zoo import registry

SPEC = "gla(chunk=4)"


def test_part_feeds_a_low_rank_logsigmoid_gate_per_key_dim():
  part, (x, q, k, v) = family.part_and_inputs("gla(gate_rank=3)")
  q2, k2, v2, gates, _ = part.inputs(x, q, k, v, None)
  x64 = x.astype(np.float64)
  logits = np.einsum("btr,rgk->btgk", x64 @ np.asarray(
      part.gate_down.kernel[...]), np.asarray(part.gate_up.kernel[...])
                     ) + np.asarray(part.gate_up.bias[...])
  want = -np.log1p(np.exp(-logits)) / 16
  assert part.gate_down.kernel.shape == (16, 3)
  assert gates["g"].shape == (2, 6, 2, 4) and (np.asarray(gates["g"]) < 0
                                               ).all()
  np.testing.assert_allclose(gates["g"], want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(q2, q / 2, rtol=1e-6)
  np.testing.assert_array_equal(k2, k)
  np.testing.assert_array_equal(v2, v)


def test_part_output_is_rms_norm_times_swish_gate():
  part, (x, q, _, _) = family.part_and_inputs(SPEC, 1)
  out = np.asarray(part.output(x, q), np.float64)
  o = q.astype(np.float64)
  normed = o / np.sqrt((o * o).mean(-1, keepdims=True) + 1e-5)
  gate = np.einsum("btd,dhk->bthk", x, np.asarray(part.out_gate.kernel[...]))
  np.testing.assert_allclose(out, normed * gate / (1 + np.exp(-gate)),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_model_decodes_like_its_forward_pass():
  diff, scale = family.decoding_error(SPEC)
  assert scale > 0.1 and diff < 2e-5


@pytest.mark.slow
def test_short_conv_model_decodes_like_its_forward_pass():
  diff, scale = family.decoding_error("gla(chunk=4, short_conv=3)")
  assert scale > 0.1 and diff < 2e-5


@pytest.mark.slow
def test_model_trains_a_step():
  losses = family.train_step_losses(SPEC)
  assert np.isfinite(losses).all() and losses[1] < losses[0]


def test_refuses_rotary_positions_and_is_listed(capsys):
  with pytest.raises(ValueError, match=r"attention 'gla\(chunk=4\)' cannot "
                     r"take position 'rope'"):
    family.lm(SPEC, "rope")
  with pytest.raises(ValueError, match=r"gla\(gate_rank=\.\.\.\) must be >= "
                     r"1"):
    registry.build("attention", "gla(gate_rank=0)")
  out = family.listing(capsys)
  assert "gla(chunk: int = 64, short_conv: int = 0, gate_rank: int = 16)" in out
