"""RoPE: relative by construction (q.k depends on the offset only), a rotation
(norms kept), the identity at position 0, and odd head dims refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo import registry


def rope(spec="rope", embed_dim=16, num_heads=2):
  return registry.build("position", spec, embed_dim=embed_dim,
                        num_heads=num_heads, seq_len=8, rngs=nnx.Rngs(0),
                        param_dtype=jnp.float32)


X = jax.random.normal(jax.random.key(0), (2, 5, 2, 8))


def test_worked_example_half_split():
  # K=4, theta=100: pairs (0, 2) turn at 1 rad per position, (1, 3) at 0.1.
  pe = rope("rope(theta=100.0)", embed_dim=8, num_heads=2)
  x_1x2x1x4 = jnp.array([[[[1.0, 0.0, 0.0, 0.0]], [[0.0, 2.0, 0.0, 0.0]]]])
  out = pe.rotate(x_1x2x1x4, jnp.array([3, 5]))
  np.testing.assert_allclose(out[0, 0, 0], [np.cos(3), 0, np.sin(3), 0],
                             atol=1e-6)
  np.testing.assert_allclose(out[0, 1, 0],
                             [0, 2 * np.cos(0.5), 0, 2 * np.sin(0.5)],
                             atol=1e-6)


@pytest.mark.parametrize("shift", [1, 7, 100])
def test_dot_product_depends_only_on_offset(shift):
  pe = rope()
  q_1xTx2x8, k_1xTx2x8 = X[:1], X[1:]
  m_T = jnp.array([0, 3, 10, 4, 31])
  n_T = jnp.array([0, 1, 12, 30, 2])

  def dots(m, n):
    return jnp.einsum("bthk,bthk->bth", pe.rotate(q_1xTx2x8, m),
                      pe.rotate(k_1xTx2x8, n))

  np.testing.assert_allclose(dots(m_T + shift, n_T + shift), dots(m_T, n_T),
                             atol=2e-4)
  assert jnp.abs(dots(m_T + shift, n_T) - dots(m_T, n_T)).max() > 1e-2


def test_norm_is_preserved():
  out = rope().rotate(X, jnp.array([0, 1, 5, 50, 1000]))
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1),
                             jnp.linalg.norm(X, axis=-1), rtol=1e-5)


def test_position_zero_is_identity():
  np.testing.assert_array_equal(rope().rotate(X, jnp.zeros(5, jnp.int32)), X)


def test_output_keeps_input_dtype():
  x = X.astype(jnp.bfloat16)
  out = rope().rotate(x, jnp.arange(5))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32),
                             rope().rotate(X, jnp.arange(5)), atol=5e-2)


def test_odd_head_dim_is_refused():
  with pytest.raises(ValueError, match=r"rope needs an even head_dim; "
                     r"model.embed_dim=12 // model.num_heads=4 = 3"):
    rope(embed_dim=12, num_heads=4)


def test_nonpositive_theta_is_refused():
  with pytest.raises(ValueError, match=r"rope\(theta=0.0\) must be > 0"):
    rope("rope(theta=0.0)")
