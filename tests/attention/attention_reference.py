"""Shared by the attention tests: random inputs, and the check of an op's
outputs and gradients against the dense `standard` op under an explicit
[batch, q_len, kv_len] mask (the independent reference)."""

import jax
import jax.numpy as jnp
import numpy as np

from zoo import registry


def random_qkv(seed, b=2, t=11, s=None, h=4, g=2, d=8):
  """Standard normal q BxTxHxK, k and v BxSxGxK (numpy: no compiles)."""
  rng = np.random.default_rng(seed)
  s = t if s is None else s
  return (rng.standard_normal((b, t, h, d), np.float32),
          rng.standard_normal((b, s, g, d), np.float32),
          rng.standard_normal((b, s, g, d), np.float32))


def value_and_grads(op, q, k, v, **kwargs):
  """Sum of outputs times a fixed random cotangent, and its gradients."""
  cotangent = np.random.default_rng(99).standard_normal(q.shape, np.float32)

  def loss(q, k, v):
    return jnp.sum(op(q, k, v, **kwargs).astype(jnp.float32) * cotangent)

  return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


def assert_matches_dense(spec, q, k, v, allowed, *, causal, mask=None,
                         bias=None):
  """Outputs and gradients of `spec` equal the dense op's under `allowed`
  (BxTxS numpy bool); returns the op's output."""
  op = registry.build("attention", spec)
  ref = registry.build("attention", "standard")

  @jax.jit
  def both(q, k, v):
    got = op(q, k, v, causal=causal, mask=mask, bias=bias)
    want = ref(q, k, v, mask=jnp.asarray(allowed), bias=bias)
    return (got, want,
            value_and_grads(op, q, k, v, causal=causal, mask=mask, bias=bias),
            value_and_grads(ref, q, k, v, mask=jnp.asarray(allowed),
                            bias=bias))

  got, want, (got_loss, got_grads), (want_loss, want_grads) = both(q, k, v)
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-5)
  for got_grad, want_grad in zip(got_grads, want_grads):
    np.testing.assert_allclose(got_grad, want_grad, atol=5e-5)
  return got


def alibi(slopes):
  """An ALiBi-style bias callable, -slope * |i - j| per head."""
  def bias(q_pos, k_pos):
    return -slopes[:, None, None] * jnp.abs(q_pos[:, None] - k_pos[None, :])
  return bias


def assert_bf16_close_to_fp32(spec, seed):
  """bf16 inputs give bf16 outputs and gradients close to the fp32 ones."""
  q, k, v = random_qkv(seed)
  op = registry.build("attention", spec)

  @jax.jit
  def run(q, k, v):
    return op(q, k, v, causal=True), value_and_grads(op, q, k, v,
                                                     causal=True)[1]

  out, grads = run(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
  want_out, want_grads = run(q, k, v)
  assert out.dtype == jnp.bfloat16
  assert all(grad.dtype == jnp.bfloat16 for grad in grads)
  np.testing.assert_allclose(np.asarray(out, np.float32), want_out, atol=0.1)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.15)


def assert_causal(spec, seed):
  """Perturbing keys and values after position t leaves outputs up to t
  unchanged (and changes some later output)."""
  q, k, v = random_qkv(seed)
  op = jax.jit(lambda q, k, v: registry.build("attention", spec)(
      q, k, v, causal=True))
  noise_k, noise_v = random_qkv(seed + 1)[1:]
  out = np.asarray(op(q, k, v))
  for t in (0, 4, 9):
    later = (np.arange(11) > t)[None, :, None, None]
    perturbed = np.asarray(op(q, np.where(later, noise_k, k),
                              np.where(later, noise_v, v)))
    np.testing.assert_array_equal(out[:, :t + 1], perturbed[:, :t + 1])
    assert not np.allclose(out[:, t + 1:], perturbed[:, t + 1:])
