"""Based (zoo/attention/based.py): the Taylor feature map's dot products,
and the layer (part, op, part) against normalised linear attention with
phi(q).phi(k) = 1 + q.k / sqrt(f) + (q.k)^2 / (2 f) in float64; a model
and a hybrid stack with sliding-window softmax decode like their forward
pass; a model trains, and is listed."""

import jax
import numpy as np
import pytest
from flax import nnx

from tests.attention import recurrent_family as family
from zoo import registry
from zoo.attention import based

SPEC = "based(chunk=4, feature_dim=4)"


def test_taylor_features_give_the_expansion_of_exp():
  rng = np.random.default_rng(0)
  f = 5
  x, y = rng.standard_normal((2, 7, f)).astype(np.float32)
  phi_x, phi_y = (np.asarray(based.taylor_features(a), np.float64)
                  for a in (x, y))
  assert phi_x.shape == (7, 1 + f + f * (f + 1) // 2)
  dot = np.einsum("if,jf->ij", x.astype(np.float64), y) / np.sqrt(f)
  np.testing.assert_allclose(phi_x @ phi_y.T, 1 + dot + dot**2 / 2,
                             rtol=1e-5)


def test_layer_is_normalised_linear_attention_in_float64():
  """part.inputs, the causal op, part.output against the float64 form,
  query head h on kv head h // 2, q and k through the part's maps."""
  b, t, d, h, g, k, f = 2, 11, 16, 4, 2, 4, 3
  op = registry.build("attention", f"based(chunk=4, feature_dim={f})")
  part = op.layer_part(embed_dim=d, num_heads=h, num_kv_heads=g, head_dim=k,
                       rngs=nnx.Rngs(0), dtype=np.float32,
                       param_dtype=np.float32)
  rng = np.random.default_rng(1)
  x, q, kk, v = (rng.standard_normal(s).astype(np.float32) for s in (
      (b, t, d), (b, t, h, k), (b, t, g, k), (b, t, g, k)))

  def layer(x, q, kk, v):
    q, kk, v, gates, _ = part.inputs(x, q, kk, v, None)
    return part.output(x, op(q, kk, v, causal=True, **gates))

  out = jax.jit(layer)(x, q, kk, v)
  fq = np.einsum("bthk,hkf->bthf", q.astype(np.float64),
                 np.asarray(part.q_map_HxKxF[...]))
  fk = np.einsum("bthk,hkf->bthf", kk.astype(np.float64),
                 np.asarray(part.k_map_GxKxF[...]))
  want = np.zeros((b, t, h, k))
  for head in range(h):
    dot = np.einsum("btf,bsf->bts", fq[:, :, head], fk[:, :, head // 2]
                    ) / np.sqrt(f)
    a = (1 + dot + dot**2 / 2) * np.tril(np.ones((t, t)))
    want[:, :, head] = np.einsum("bts,bsk->btk", a, v[:, :, head // 2]
                                 ) / a.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("attention", [SPEC, f"{SPEC};local(window=4)"])
def test_model_decodes_like_its_forward_pass(attention):
  diff, scale = family.decoding_error(attention)
  assert scale > 0.1 and diff < 2e-5


@pytest.mark.slow
def test_model_trains_a_step():
  losses = family.train_step_losses(SPEC)
  assert np.isfinite(losses).all() and losses[1] < losses[0]


def test_is_listed_with_its_state(capsys):
  assert ("based(chunk: int = 64, short_conv: int = 0, feature_dim: int = "
          "16)") in family.listing(capsys)
  op = registry.build("attention", "based")
  assert op.gates == ()
  assert op.state_size(4096, 2, 64) == 2 * 153 * 65
  assert op.init_state(3, 10, 2, 64, np.float32).s_BxGxKxV.shape == (
      3, 2, 153, 65)
