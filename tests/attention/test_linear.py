"""Linear attention against its quadratic form computed here in numpy (and
in jnp, for gradients), in both causal forms (the chunked XLA form and the
fused CPU kernel), and the recurrent step against the causal op; which calls
run the kernel."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

from zoo import registry
from zoo.attention.kernels import fused_cpu, placement

B, T, H, G, D = 2, 13, 4, 2, 8
# The causal forms: 'xla' and, where the kernel builds, 'fused'.
FORMS = ["xla"] + (["fused"] if fused_cpu.unavailable() is None else [])
# The default form, where it builds: the fast tier's share of FORMS.
DEFAULT = FORMS[-1]


def slow_unless(value, keep):
  """A parametrize value, marked slow unless it is `keep`."""
  return value if value == keep else pytest.param(value,
                                                  marks=pytest.mark.slow)
needs_kernel = pytest.mark.skipif(fused_cpu.unavailable() is not None,
                                  reason=str(fused_cpu.unavailable()))


def random_qkv(seed, t=T, s=T, g=G, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, t, H, D), dtype),
          jax.random.normal(kk, (B, s, g, D), dtype),
          jax.random.normal(kv, (B, s, g, D), dtype))


@functools.partial(jax.jit, static_argnames=("op", "causal"))
def _jit_call(op, q, k, v, mask, causal):
  return op(q, k, v, causal=causal, mask=mask)


def call(op, q, k, v, causal=False, mask=None):
  if isinstance(op, str):
    op = registry.build("attention", op)
  return _jit_call(op, q, k, v, None if mask is None else jnp.asarray(mask),
                   causal)


def numpy_elu_features(x):
  x = np.asarray(x, np.float64)
  return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))


def numpy_quadratic(phi_q, phi_k, v, allowed):
  """sum_s a_ts v_s / sum_s a_ts with a = phi(q) phi(k)^T masked by
  `allowed` BxTxS; phi_q BxTxHxF, phi_k BxSxGxF, v BxSxGxK (float64)."""
  phi_q, phi_k, v = (np.asarray(a, np.float64) for a in (phi_q, phi_k, v))
  b, t, h, _ = phi_q.shape
  g = phi_k.shape[2]
  out = np.zeros((b, t, h, v.shape[-1]))
  for bi in range(b):
    for hi in range(h):
      gi = hi // (h // g)
      a = phi_q[bi, :, hi] @ phi_k[bi, :, gi].T * allowed[bi]
      den = a.sum(axis=1, keepdims=True)
      out[bi, :, hi] = np.where(den > 0, a @ v[bi, :, gi] / np.where(
          den > 0, den, 1), 0)
  return out


def allowed_mask(t, s, causal, mask=None):
  i = np.arange(s - t, s)[:, None]
  ok = np.arange(s)[None, :] <= i if causal else np.ones((t, s), bool)
  ok = np.broadcast_to(ok, (B, t, s))
  return ok if mask is None else ok & mask[:, None, :]


def key_mask(s=T):
  """BxS padding mask; batch 1 also hides key 0, so its causal query 0 has
  no key (zero output)."""
  mask = np.random.default_rng(0).random((B, s)) < 0.7
  mask[1, 0] = False
  return mask


@pytest.mark.parametrize("chunk", [4, slow_unless(5, 4), 13,
                                   slow_unless(64, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_elu_matches_quadratic_form(chunk, causal):
  q, k, v = random_qkv(0)
  mask = key_mask()
  out = call(f"linear(chunk={chunk})", q, k, v, causal=causal, mask=mask)
  ref = numpy_quadratic(numpy_elu_features(q), numpy_elu_features(k), v,
                        allowed_mask(T, T, causal, mask))
  np.testing.assert_allclose(out, ref, atol=2e-5)
  if causal:
    assert not np.asarray(out[1, 0]).any()


EPS = 1e-6  # the op's relative eps on key features (zoo/attention/linear.py)


def numpy_favor_features(x, w_GxFxK, kv_head):
  """FAVOR+ features in float64 with no stabiliser: phi(x) = exp(w x -
  |x|^2 / 2) of x = head vector * K**-0.25, plus the op's eps scaled by the
  key's largest feature (`kv_head` maps each head of x to its rows of w)."""
  x = np.asarray(x, np.float64) * x.shape[-1]**-0.25
  w = np.asarray(w_GxFxK, np.float64)[kv_head]  # HxFxK
  logits = np.einsum("...hk,hfk->...hf", x, w) - (x * x).sum(-1)[..., None] / 2
  return np.exp(logits), np.exp(logits.max(-1, keepdims=True))


def numpy_favor(op, q, k, v, allowed):
  """The FAVOR+ estimator of `op`'s draw, evaluated in float64."""
  r = q.shape[2] // k.shape[2]
  w = op.projection(q.shape[-1], k.shape[2])
  phi_q, _ = numpy_favor_features(q, w, np.arange(q.shape[2]) // r)
  phi_k, top_k = numpy_favor_features(k, w, np.arange(k.shape[2]))
  return numpy_quadratic(phi_q, phi_k + EPS * top_k, v, allowed)


@pytest.mark.parametrize("causal", [True, False])
def test_favor_matches_float64_estimator(causal):
  op = registry.build("attention", "linear(feature='favor', num_features=16, "
                      "chunk=4)")
  q, k, v = random_qkv(1)
  mask = key_mask()
  out = call(op, q, k, v, causal=causal, mask=mask)
  ref = numpy_favor(op, q, k, v, allowed_mask(T, T, causal, mask))
  np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("feature", ["elu", "favor"])
def test_causal_forms_match_float64(form, feature):
  """Causal self-attention without a mask, over 150 positions: several of
  the kernel's 64-key chunks, the last one partial."""
  op = registry.build("attention", f"linear(feature='{feature}', "
                      f"num_features=16, chunk=32, implementation='{form}')")
  q, k, v = (x.repeat(12, axis=1)[:, :150] * (1 + jnp.arange(150) / 150
                                             )[None, :, None, None]
             for x in random_qkv(12))
  out = call(op, q, k, v, causal=True)
  allowed = allowed_mask(150, 150, True)
  if feature == "elu":
    ref = numpy_quadratic(numpy_elu_features(q), numpy_elu_features(k), v,
                          allowed)
  else:
    ref = numpy_favor(op, q, k, v, allowed)
  np.testing.assert_allclose(out, ref, atol=2e-5)


def jnp_quadratic(op, q, k, v):
  """The causal op's output as a masked quadratic form in jnp, with the
  features written out (for gradients): elu + 1, or FAVOR+'s exp(w x -
  |x|^2 / 2) plus the op's eps scaled by the key's largest feature."""
  r = q.shape[2] // k.shape[2]
  k_h, v_h = (jnp.repeat(x, r, axis=2) for x in (k, v))
  if op.feature == "elu":
    phi_q, phi_k = jax.nn.elu(q) + 1, jax.nn.elu(k_h) + 1
  else:
    w = jnp.repeat(op.projection(q.shape[-1], k.shape[2]), r, axis=0)
    logits = lambda x: (jnp.einsum("bthk,hfk->bthf", x * D**-0.25, w)
                        - jnp.sum((x * D**-0.25)**2, -1, keepdims=True) / 2)
    phi_q = jnp.exp(logits(q))
    top = jax.lax.stop_gradient(jnp.exp(logits(k_h).max(-1, keepdims=True)))
    phi_k = jnp.exp(logits(k_h)) + EPS * top
  a = jnp.einsum("bthf,bshf->bhts", phi_q, phi_k) * jnp.tril(
      jnp.ones((T, T)))
  return jnp.einsum("bhts,bshk->bthk", a, v_h) / a.sum(-1).transpose(
      0, 2, 1)[..., None]


@pytest.mark.parametrize("form", [slow_unless(f, DEFAULT) for f in FORMS])
@pytest.mark.parametrize("feature", ["elu", "favor"])
def test_causal_gradients_match_the_quadratic_form(form, feature):
  op = registry.build("attention", f"linear(feature='{feature}', "
                      f"num_features=16, chunk=4, implementation='{form}')")
  q, k, v = random_qkv(13)
  cotangent = jax.random.normal(jax.random.key(14), q.shape)
  grads = lambda f: jax.grad(lambda q, k, v: jnp.vdot(f(q, k, v), cotangent),
                             argnums=(0, 1, 2))(q, k, v)
  got = grads(jax.jit(lambda q, k, v: op(q, k, v, causal=True)))
  want = grads(functools.partial(jnp_quadratic, op))
  for name, x, y in zip("qkv", got, want):
    np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("d,form", [
    pytest.param(64, "xla", marks=pytest.mark.slow)] + [
        (d, "fused") for d in (64, 128, 256) if "fused" in FORMS])
def test_favor_is_stable_for_large_key_norms(d, form):
  """Keys of norm up to 100 (some aligned with a projection row, where the
  unstabilised float32 feature is exp(88+) = inf): parallel, causal (chunked
  XLA or kernel) and recurrent forms stay finite and match the float64
  estimator."""
  op = registry.build("attention", "linear(feature='favor', num_features=64, "
                      f"chunk=4, implementation='{form}')")
  rng = np.random.default_rng(d)
  t, g = 9, 1
  q = rng.standard_normal((1, t, 2, d)).astype(np.float32)
  k = rng.standard_normal((1, t, g, d))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  k *= np.linspace(1, 100, t)[None, :, None, None]
  w = np.asarray(op.projection(d, g))
  k[0, 4, 0] = 45 * w[0, 0] / np.linalg.norm(w[0, 0])  # aligned with a row
  k = k.astype(np.float32)
  v = rng.standard_normal((1, t, g, d)).astype(np.float32)
  for causal in (False, True):
    out = np.asarray(call(op if causal else dataclasses.replace(
        op, implementation=None), q, k, v, causal=causal))
    assert np.isfinite(out).all()
    ref = numpy_favor(op, q, k, v, allowed_mask(t, t, causal)[:1])
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
  state = op.init_state(1, t, g, d, jnp.float32)
  outs = []
  for i in range(t):
    out, state = op.decode_step(state, q[:, i], k[:, i], v[:, i], index=i,
                                bias=None)
    outs.append(out)
  np.testing.assert_allclose(np.stack(outs, 1), ref, rtol=1e-3, atol=1e-3)


def test_favor_draws_differ_per_layer_head_and_redraw():
  op = registry.build("attention", "linear(feature='favor', num_features=8, "
                      "redraw_every=10)")
  w = np.asarray(op.projection(D, 2))
  assert w.shape == (2, 8, D) and not np.allclose(w[0], w[1])
  assert not np.allclose(w, op.for_layer(1).projection(D, 2))
  np.testing.assert_array_equal(w, op.for_layer(0).projection(D, 2))
  assert not np.allclose(w, op.projection(D, 2, draw=1))
  assert op.draw() == 0 and op.at_step(jnp.array(9)).draw() == 0
  assert op.at_step(jnp.array(10)).draw() == 1
  q, k, v = random_qkv(10)
  at = jax.jit(lambda step: op.at_step(step)(q, k, v, causal=True))
  np.testing.assert_array_equal(at(0), at(9))
  assert not np.allclose(at(0), at(10))
  fixed = registry.build("attention", "linear(feature='favor', "
                         "num_features=8)")
  np.testing.assert_allclose(
      jax.jit(lambda step: fixed.at_step(step)(q, k, v, causal=True))(500),
      call(fixed, q, k, v, causal=True), rtol=1e-5, atol=1e-6)


def test_favor_programs_hold_no_qr():
  """FAVOR+ rows are drawn on the host (with a redraw step too): XLA:CPU in
  jax 0.10.2 can deadlock a program holding several LAPACK QR calls (a
  3-layer FAVOR+ model hung when each layer drew its rows in-program)."""
  op = registry.build("attention", "linear(feature='favor', num_features=8, "
                      "redraw_every=5)")
  q, k, v = random_qkv(12)
  fixed = jax.jit(lambda q, k, v: op(q, k, v, causal=True))
  redrawn = jax.jit(lambda q, k, v, step: op.at_step(step)(q, k, v,
                                                          causal=True))
  assert "lapack" in jax.jit(lambda x: jnp.linalg.qr(x)[0]).lower(
      np.eye(4, dtype=np.float32)).as_text().lower()  # what the check sees
  for lowered in (fixed.lower(q, k, v), redrawn.lower(q, k, v, 7)):
    assert "lapack" not in lowered.as_text().lower()


def test_favor_defaults_follow_the_paper():
  op = registry.build("attention", "linear(feature='favor')")
  assert op.num_features == 256 and op.redraw_every == 0


def test_elu_refuses_rotary_and_favor_takes_it():
  assert "rotary" not in registry.build("attention", "linear").positions
  assert "rotary" in registry.build("attention",
                                    "linear(feature='favor')").positions
  assert not registry.compatible("linear", "rope")


@pytest.mark.parametrize("t,s", [pytest.param(5, 13, marks=pytest.mark.slow),
                                 (13, 5)])
def test_causal_unequal_lengths_are_end_aligned(t, s):
  q, k, v = random_qkv(2, t=t, s=s)
  out = call("linear(chunk=4)", q, k, v, causal=True)
  ref = numpy_quadratic(numpy_elu_features(q), numpy_elu_features(k), v,
                        allowed_mask(t, s, True))
  np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("form", [slow_unless(f, DEFAULT) for f in FORMS])
@pytest.mark.parametrize("spec", ["linear(chunk=4, implementation={})",
                                  "linear(feature='favor', chunk=5, "
                                  "implementation={})"])
def test_recurrent_steps_equal_causal_op(spec, form):
  """A transformer is an RNN: token-by-token steps over a state of size
  kv_heads x F x K give the causal op's outputs."""
  op = registry.build("attention", spec.format(repr(form)))
  q, k, v = random_qkv(3)
  state = op.init_state(B, T, G, D, jnp.float32)

  def body(state, index_and_qkv_t):
    index, *qkv_t = index_and_qkv_t
    out, state = op.decode_step(state, *qkv_t, index=index, bias=None)
    return state, out

  state, out_TxBxHxK = jax.lax.scan(
      body, state,
      (jnp.arange(T), *(jnp.swapaxes(a, 0, 1) for a in (q, k, v))))
  assert state.s_BxGxFxK.shape == (B, G, op.feature_dim(D), D)
  np.testing.assert_allclose(jnp.swapaxes(out_TxBxHxK, 0, 1),
                             call(op, q, k, v, causal=True), atol=2e-5)


def test_favor_projection_is_deterministic_under_seed_and_orthogonal():
  favor = lambda seed: registry.build(
      "attention", f"linear(feature='favor', num_features=12, seed={seed})")
  w = np.asarray(favor(0).projection(D, 1))[0]
  assert w.shape == (12, D)
  np.testing.assert_array_equal(w, favor(0).projection(D, 1)[0])
  assert not np.allclose(w, favor(1).projection(D, 1)[0])
  # Orthogonal blocks: rows within each block of D are orthogonal.
  gram = w[:D] @ w[:D].T
  np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-4)


def test_favor_estimates_the_softmax_kernel():
  """E[phi(q).phi(k)] = exp(q.k / sqrt(K)): with many features the estimate
  is close (about 1%; biased orthogonal blocks, e.g. an unsigned QR, give
  7% or more)."""
  op = registry.build("attention", "linear(feature='favor', num_features=8192)")
  x = 0.3 * np.random.default_rng(1).standard_normal((6, 1, D))
  phi, _ = numpy_favor_features(x, op.projection(D, 1), np.array([0]))
  estimate = phi[:, 0] @ phi[:, 0].T / 8192
  exact = np.exp(x[:, 0] @ x[:, 0].T / np.sqrt(D))
  np.testing.assert_allclose(estimate, exact, rtol=0.04)


@pytest.mark.slow
def test_prefill_state_equals_steps():
  op = registry.build("attention", "linear(feature='favor', num_features=8)")
  q, k, v = random_qkv(11)
  empty = op.init_state(B, T, G, D, jnp.float32)
  state = empty
  for i in range(T):
    state = op.decode_step(state, q[:, i], k[:, i], v[:, i], index=i,
                           bias=None)[1]
  prefilled = op.prefill(empty, q, k, v, index=0, bias=None)[1]
  for got, want in zip(jax.tree.leaves(prefilled), jax.tree.leaves(state)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("spec", ["linear(chunk=4, implementation={})",
                                  "linear(feature='favor', chunk=4, "
                                  "implementation={})"])
def test_causal_outputs_ignore_later_keys(spec, form):
  spec = spec.format(repr(form))
  q, k, v = random_qkv(5)
  noise = jax.random.normal(jax.random.key(6), k.shape)
  later = (jnp.arange(T) > 5)[None, :, None, None]
  out = call(spec, q, k, v, causal=True)
  moved = call(spec, q, jnp.where(later, k + noise, k),
               jnp.where(later, v - noise, v), causal=True)
  np.testing.assert_array_equal(out[:, :6], moved[:, :6])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("g", [4, 1])
def test_grouped_query_attention(g, form):
  q, k, v = random_qkv(7, g=g)
  out = call(f"linear(chunk=4, implementation='{form}')", q, k, v,
             causal=True)
  ref = numpy_quadratic(numpy_elu_features(q), numpy_elu_features(k), v,
                        allowed_mask(T, T, True))
  np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("form", FORMS)
def test_bf16_inputs_give_bf16_close_to_fp32(form):
  q, k, v = random_qkv(8)
  out = call(f"linear(chunk=4, implementation='{form}')",
             *(a.astype(jnp.bfloat16) for a in (q, k, v)), causal=True)
  assert out.dtype == jnp.bfloat16
  ref = numpy_quadratic(numpy_elu_features(q), numpy_elu_features(k), v,
                        allowed_mask(T, T, True))
  np.testing.assert_allclose(out.astype(np.float32), ref, atol=0.1)


def test_bias_is_refused():
  q, k, v = random_qkv(9)
  with pytest.raises(ValueError, match="cannot take an additive position bias"):
    registry.build("attention", "linear")(
        q, k, v, bias=lambda q_pos, k_pos: jnp.zeros((H, T, T)))


@pytest.mark.parametrize("spec,arg", [
    ("linear(feature='relu')", "feature"),
    ("linear(num_features=0)", "num_features"),
    ("linear(chunk=0)", "chunk"),
    ("linear(seed=-1)", "seed"),
    ("linear(redraw_every=-1)", "redraw_every"),
    ("linear(implementation='triton')", "implementation"),
])
def test_bad_arguments_are_refused(spec, arg):
  with pytest.raises(ValueError, match=rf"\({arg}="):
    registry.build("attention", spec)


def _lowered(spec, t=T, s=T, causal=True, **kwargs):
  q, k, v = random_qkv(15, t=t, s=s)
  op = registry.build("attention", spec)
  return jax.jit(lambda q, k, v: op(q, k, v, causal=causal, **kwargs)).lower(
      q, k, v).as_text()


@needs_kernel
def test_default_runs_the_kernel_only_where_it_applies():
  for spec in ("linear", "linear(feature='favor')"):
    assert "zoo_linear_forward" in _lowered(spec)
    for kwargs in ({"mask": jnp.asarray(key_mask())}, {"causal": False},
                   {"t": 5}):
      assert "zoo_linear_forward" not in _lowered(spec, **kwargs)
  assert "zoo_linear_forward" not in _lowered("linear(implementation='xla')")


def test_fused_refuses_calls_it_cannot_take():
  q, k, v = random_qkv(16)
  op = registry.build("attention", "linear(implementation='fused')")
  with pytest.raises(ValueError, match="implementation='fused'.*padding mask"):
    op(q, k, v, causal=True, mask=jnp.ones((B, T), bool))
  with pytest.raises(ValueError, match="runs causal .*causal=False"):
    op(q, k, v)
  with pytest.raises(ValueError, match="q_len != kv_len"):
    op(q[:, :5], k, v, causal=True)


def test_unbuildable_kernel_falls_back_with_a_warning(monkeypatch):
  reason = "the fused CPU attention kernel could not be built: no compiler"
  monkeypatch.setattr(fused_cpu, "unavailable", lambda: reason)
  monkeypatch.setattr(placement, "_WARNED", set())
  warnings = []
  monkeypatch.setattr(logging, "warning", warnings.append)
  assert "zoo_linear_forward" not in _lowered("linear")
  assert warnings == [f"attention linear: {reason}; running the XLA form"]
  with pytest.raises(ValueError, match="no compiler"):
    registry.build("attention", "linear(implementation='fused')")(
        *random_qkv(17), causal=True)
