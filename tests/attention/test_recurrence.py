"""The gated linear recurrence (zoo/attention/recurrence.py) against a
float64 numpy recurrence written here: the chunked, step-by-step and
decoding forms, their gradients, pieces with the state carried, grouped kv
heads, scalar, per-key-dim and no gates, extreme gates, bfloat16 inputs;
the op's contract (causal only, padding masks, end-aligned queries)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import registry
from zoo.attention import recurrence

B, T, H, G, K, V = 2, 21, 4, 2, 8, 5


def numpy_recurrence(q, k, v, g, s0=None):
  """S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t in float64; g
  BxTxG or BxTxGxK (None: no decay); query head h reads kv head h // R.
  Returns (o BxTxHxV, final S BxGxKxV)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, kd = q.shape
  g_heads = k.shape[2]
  g = np.zeros((b, t, g_heads)) if g is None else np.asarray(g, np.float64)
  if g.ndim == 3:
    g = np.repeat(g[..., None], kd, axis=-1)
  s = (np.zeros((b, g_heads, kd, v.shape[-1])) if s0 is None
       else np.asarray(s0, np.float64))
  o = np.zeros((b, t, h, v.shape[-1]))
  for i in range(t):
    s = np.exp(g[:, i])[..., None] * s + k[:, i, :, :, None] * v[:, i, :,
                                                                  None, :]
    for head in range(h):
      o[:, i, head] = np.einsum("bk,bkv->bv", q[:, i, head],
                                s[:, head // (h // g_heads)])
  return o, s


def random_inputs(seed, gate="scalar", t=T, low=-3.0, high=-1e-4,
                  dtype=np.float32):
  """q, k, v, the log gate (log-uniform magnitudes in [-high, -low]) and
  an initial state."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, t, H, K))
  k = rng.standard_normal((B, t, G, K))
  v = rng.standard_normal((B, t, G, V))
  shape = {"scalar": (B, t, G), "vector": (B, t, G, K)}.get(gate)
  g = None if shape is None else -np.exp(rng.uniform(
      np.log(-high), np.log(-low), shape))
  s0 = rng.standard_normal((B, G, K, V))
  return tuple(None if x is None else x.astype(dtype)
               for x in (q, k, v, g, s0))


def gate_j(g, k):
  """The kernel's BxTxGxJ gate (J = 1 for a scalar one, zeros for none)."""
  if g is None:
    return jnp.zeros((*k.shape[:3], 1), jnp.float32)
  return jnp.asarray(g)[..., None] if g.ndim == 3 else jnp.asarray(g)


def relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.abs(got - want).max() / np.abs(want).max()


@functools.partial(jax.jit, static_argnames="chunk")
def chunked(q, k, v, g, s0, chunk):
  return recurrence.chunked(q, k, v, g, s0, chunk=chunk)


reference = jax.jit(recurrence.reference)


@pytest.mark.parametrize("gate", ["scalar", "vector", "none"])
@pytest.mark.parametrize("chunk", [4, 8, 6, 64])
def test_chunked_matches_float64(gate, chunk):
  """Chunks of 4 and 8 (a partial last chunk; per-key-dim gates split
  into a tree), 6 (leaves of 3) and 64 (one chunk of 21, one leaf)."""
  q, k, v, g, s0 = random_inputs(0, gate)
  want_o, want_s = numpy_recurrence(q, k, v, g, s0)
  o, s = chunked(q, k, v, gate_j(g, k), s0, chunk)
  assert relative_error(o, want_o) < 1e-5
  assert relative_error(s, want_s) < 1e-5


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_reference_and_steps_match_float64(gate):
  q, k, v, g, s0 = random_inputs(1, gate)
  want_o, want_s = numpy_recurrence(q, k, v, g, s0)
  o, s = reference(q, k, v, gate_j(g, k), s0)
  assert relative_error(o, want_o) < 1e-5
  assert relative_error(s, want_s) < 1e-5
  step = jax.jit(recurrence.step)
  s, outs = jnp.asarray(s0), []
  for i in range(T):
    o, s = step(s, q[:, i], k[:, i], v[:, i], gate_j(g, k)[:, i])
    outs.append(o)
  assert relative_error(jnp.stack(outs, 1), want_o) < 1e-5
  assert relative_error(s, want_s) < 1e-5


def numpy_loss(q, k, v, g, s0, w_o, w_s):
  o, s = numpy_recurrence(q, k, v, g, s0)
  return np.vdot(o, w_o) + np.vdot(s, w_s)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_gradients_match_reference_and_float64_differences(gate):
  """Gradients of a random projection of (out, final state) wrt q, k, v,
  g and the initial state: chunked = step-by-step, and each one's
  directional derivative = a central difference of the float64
  recurrence."""
  q, k, v, g, s0 = random_inputs(2, gate)
  rng = np.random.default_rng(3)
  w_o = rng.standard_normal((B, T, H, V)).astype(np.float32)
  w_s = rng.standard_normal((B, G, K, V)).astype(np.float32)

  def loss(form, q, k, v, g, s0):
    o, s = form(q, k, v, g[..., None] if g.ndim == 3 else g, s0)
    return jnp.vdot(o, w_o) + jnp.vdot(s, w_s)

  grads = lambda form: jax.jit(jax.grad(functools.partial(loss, form),
                                        argnums=range(5)))(q, k, v, g, s0)
  got = grads(functools.partial(recurrence.chunked, chunk=4))
  want = grads(recurrence.reference)
  inputs = [q, k, v, g, s0]
  for i, name in enumerate(["q", "k", "v", "g", "s0"]):
    assert relative_error(got[i], want[i]) < 1e-5, name
    u = rng.standard_normal(inputs[i].shape)
    eps = 1e-6
    plus, minus = ([np.asarray(x, np.float64) for x in inputs]
                   for _ in range(2))
    plus[i] = plus[i] + eps * u
    minus[i] = minus[i] - eps * u
    numeric = (numpy_loss(*plus, w_o, w_s) - numpy_loss(*minus, w_o, w_s)
               ) / (2 * eps)
    assert np.vdot(np.asarray(got[i], np.float64), u) == pytest.approx(
        numeric, rel=1e-4), name


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_pieces_with_the_state_carried_equal_one_pass(gate):
  q, k, v, g, s0 = random_inputs(4, gate)
  g = gate_j(g, k)
  whole_o, whole_s = chunked(q, k, v, g, s0, 4)
  s, outs, start = jnp.asarray(s0), [], 0
  for n in (5, 1, 8, 7):
    piece = lambda x: x[:, start:start + n]
    o, s = chunked(piece(q), piece(k), piece(v), piece(g), s, 4)
    outs.append(o)
    start += n
  np.testing.assert_allclose(jnp.concatenate(outs, 1), whole_o, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(s, whole_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("low,high", [(-20.0, -1e-4), (-20.0, -19.0),
                                      (-2e-4, -1e-4)])
def test_extreme_gates_stay_finite_and_exact(gate, low, high):
  """Log gates from -20 to -1e-4 per step over one 40-step chunk (and
  chunks of 8): no exp overflows, values and gradients finite, values
  within float32 rounding of the cumulative gates."""
  q, k, v, g, s0 = random_inputs(5, gate, t=40, low=low, high=high)
  want_o, want_s = numpy_recurrence(q, k, v, g, s0)
  for chunk in (8, 64):
    o, s = chunked(q, k, v, gate_j(g, k), s0, chunk)
    assert relative_error(o, want_o) < 1e-4
    assert relative_error(s, want_s) < 1e-4
  grads = squares_gradients(q, k, v, gate_j(g, k), s0)
  assert all(np.isfinite(x).all() for x in grads)


squares_gradients = jax.jit(jax.grad(
    lambda q, k, v, g, s0: jnp.sum(recurrence.chunked(q, k, v, g, s0)[0]**2),
    argnums=range(4)))


def test_bfloat16_inputs_keep_a_float32_state():
  op = registry.build("attention", "gla(chunk=4)")
  q, k, v, g, _ = random_inputs(6, "vector", low=-20.0)
  v = np.concatenate([v, v[..., :K - V]], -1)  # the layer's head dim
  q, k, v, g = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, g))
  out = jax.jit(lambda q, k, v, g: op(q, k, v, causal=True, g=g))(q, k, v, g)
  assert out.dtype == jnp.bfloat16 and np.isfinite(
      np.asarray(out, np.float32)).all()
  state = op.init_state(B, T, G, K, jnp.bfloat16)
  out, state = op.prefill(state, q, k, v, index=0, bias=None, g=g)
  assert state.s_BxGxKxV.dtype == jnp.float32
  out, state = op.decode_step(state, q[:, 0], k[:, 0], v[:, 0], index=T,
                              bias=None, g=g[:, 0])
  assert out.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(state.s_BxGxKxV)).all()


@pytest.mark.parametrize("spec,gate", [("gla(chunk=4)", "vector"),
                                       ("retnet(chunk=4)", "scalar")])
def test_op_prefills_in_pieces_and_decodes_like_float64(spec, gate):
  """The op's decoding: prefill of 6 into an empty state, prefill of 7
  continuing it, then single steps, against the float64 recurrence."""
  op = registry.build("attention", spec)
  q, k, v, g, _ = random_inputs(7, gate)
  v = np.concatenate([v, v[..., :K - V]], -1)  # the layer's head dim
  want, _ = numpy_recurrence(q, k, v, g)
  state = op.init_state(B, T, G, K, jnp.float32)
  first, state = op.prefill(state, q[:, :6], k[:, :6], v[:, :6], index=0,
                            bias=None, g=g[:, :6])
  more, state = jax.jit(functools.partial(op.prefill, bias=None))(
      state, q[:, 6:13], k[:, 6:13], v[:, 6:13], index=jnp.int32(6),
      g=g[:, 6:13])
  step = jax.jit(functools.partial(op.decode_step, bias=None))
  outs = [first, more]
  for i in range(13, T):
    out, state = step(state, q[:, i], k[:, i], v[:, i], index=jnp.int32(i),
                      g=g[:, i])
    outs.append(out[:, None])
  assert relative_error(jnp.concatenate(outs, 1), want) < 1e-5


def test_op_refuses_bidirectional_attention_and_a_bias():
  op = registry.build("attention", "gla")
  q, k, v, g, _ = random_inputs(8, "vector")
  with pytest.raises(ValueError, match=r"attention gla is a causal "
                     r"recurrence; it has no bidirectional form"):
    op(q, k, v, causal=False, g=g)
  with pytest.raises(ValueError, match=r"cannot take an additive position "
                     r"bias"):
    op(q, k, v, causal=True, g=g, bias=lambda i, j: jnp.zeros((H, 1, 1)))
  with pytest.raises(ValueError, match=r"takes gates: g; got none for g"):
    op(q, k, v, causal=True)
  with pytest.raises(ValueError, match=r"per-key-dim gate g must have k's "
                     r"head_dim 8 last"):
    op(q, k, v, causal=True, g=g[..., :3])


def test_padding_mask_removes_keys_and_their_decay():
  """Masked keys add nothing to the state and do not decay it: the output
  is the recurrence with k = 0 and g = 0 there."""
  op = registry.build("attention", "gla(chunk=4)")
  q, k, v, g, _ = random_inputs(9, "vector")
  mask = np.random.default_rng(9).random((B, T)) < 0.6
  out = jax.jit(lambda *a: op(*a[:3], causal=True, mask=a[3], g=a[4]))(
      q, k, v, mask, g)
  want, _ = numpy_recurrence(q, k * mask[..., None, None], v,
                             g * mask[..., None, None])
  assert relative_error(out, want) < 1e-5


@pytest.mark.parametrize("t,s", [(7, T), (T, 15)])
def test_queries_end_aligned_with_the_keys(t, s):
  """Query i sits at key position s - t + i: fewer queries are the last
  rows of the full pass; more queries than keys see none before the
  first."""
  op = registry.build("attention", "retnet(chunk=4)")
  q, k, v, g, _ = random_inputs(10, "scalar")
  out = jax.jit(lambda q, k, v, g: op(q, k, v, causal=True, g=g))(
      q[:, T - t:], k[:, T - s:], v[:, T - s:], g[:, T - s:])
  want, _ = numpy_recurrence(q[:, T - s:], k[:, T - s:], v[:, T - s:],
                             g[:, T - s:])
  if t <= s:
    assert relative_error(out, want[:, s - t:]) < 1e-5
  else:
    assert not np.asarray(out[:, :t - s]).any()
    assert relative_error(out[:, t - s:], want) < 1e-5


def test_state_size_and_shape():
  op = registry.build("attention", "gla")
  state = op.init_state(3, 100, 2, 8, jnp.bfloat16)
  assert state.s_BxGxKxV.shape == (3, 2, 8, 8)
  assert op.state_size(4096, 2, 8) == 2 * 8 * 8
  conv = registry.build("attention", "gla(short_conv=4)")
  assert conv.state_size(4096, 2, 8) == 2 * 8 * 8 + 3 * 3 * 2 * 8
