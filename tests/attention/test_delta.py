"""The delta-rule kernel (zoo/attention/delta.py) against its recurrence
written here in float64 numpy: the chunked form, the reference scan and the
decode step, gated and not, over grouped kv heads; gradients of the chunked
form against the reference; prefill pieces with the state carried; extreme
log gates and bfloat16 inputs; the op's padding mask, refusals and end
alignment; a 4-layer model trains without hanging XLA:CPU."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import registry
from zoo.attention import delta

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
B, T, H, G, K, V = 2, 37, 4, 2, 8, 6


def numpy_delta(q, k, v, beta, g=None, state=None):
  """(out BxTxHxV, state BxGxKxV) of S_t = exp(g_t) (I - beta_t k_t k_t^T)
  S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t, step by step in float64
  (g None: no forget gate)."""
  q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
  b, t, h, d = q.shape
  gk, e = k.shape[2], v.shape[3]
  s = (np.zeros((b, gk, d, e)) if state is None
       else np.array(state, np.float64))
  out = np.zeros((b, t, h, e))
  for i in range(t):
    kk, bb = k[:, i], beta[:, i, :, None, None]
    a = 1.0 if g is None else np.exp(np.asarray(g, np.float64)[:, i])[
        ..., None, None]
    s = a * (s - bb * kk[..., :, None] * np.einsum("bgk,bgkv->bgv", kk,
                                                   s)[..., None, :])
    s = s + bb * kk[..., :, None] * v[:, i][..., None, :]
    out[:, i] = np.einsum("bgrk,bgkv->bgrv", q[:, i].reshape(b, gk, -1, d),
                          s).reshape(b, h, e)
  return out, s


def inputs(seed, t=T, log_gate=(-1.5, -0.01), dtype=np.float32, v_dim=V):
  """q, k (unit norm, as the layers make them), v, beta in (0, 1), g (log
  gates uniform in `log_gate`) and an initial state, as numpy arrays."""
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((B, t, G, K))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  return tuple(x.astype(dtype) for x in (
      rng.standard_normal((B, t, H, K)) / np.sqrt(K), k,
      rng.standard_normal((B, t, G, v_dim)),
      rng.uniform(0.05, 0.95, (B, t, G)), rng.uniform(*log_gate, (B, t, G)),
      rng.standard_normal((B, G, K, v_dim))))


def relative(got, want):
  want = np.asarray(want, np.float64)
  return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()


@pytest.mark.parametrize("c", [5, 16, 37, 64])
def test_unit_lower_inverse_is_exact(c):
  """Forward elimination on 16-row blocks, merged by matmuls (C padded to
  16 x 2^m), against numpy's inverse."""
  rng = np.random.default_rng(c)
  a = np.tril(rng.uniform(-1, 1, (3, c, c)), -1).astype(np.float32)
  want = np.linalg.inv(np.eye(c) + a.astype(np.float64))
  assert relative(jax.jit(delta.unit_lower_inverse)(a), want) < 1e-5


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk", [4, 7, 32])
def test_chunked_and_reference_match_float64(chunk, gated):
  """From a nonzero state, 37 positions: whole and partial chunks, 32 of
  them as two merged 16-row blocks."""
  q, k, v, beta, g, s0 = inputs(0)
  g = g if gated else None
  want, want_state = numpy_delta(q, k, v, beta, g, s0)
  run = jax.jit(functools.partial(delta.chunked, chunk=chunk))
  out, state = run(q, k, v, beta, g, s0)
  assert relative(out, want) < 1e-5 and relative(state, want_state) < 1e-5
  if chunk == 4:
    out, state = jax.jit(delta.reference)(q, k, v, beta, g, s0)
    assert relative(out, want) < 1e-5 and relative(state, want_state) < 1e-5


@pytest.mark.parametrize("spec", ["deltanet(chunk=4)",
                                  "gated_deltanet(chunk=4)"])
def test_prefill_pieces_and_decode_steps_equal_one_pass(spec):
  """Any split into prefill pieces and decode steps, the state carried,
  gives the one-pass outputs and final state."""
  op = registry.build("attention", spec)
  q, k, v, beta, g, _ = inputs(1, t=20, v_dim=K)
  gates = {"beta": beta, "g": g} if op.gates == ("beta", "g") else {
      "beta": beta}
  want, want_state = numpy_delta(q, k, v, beta, gates.get("g"))

  @jax.jit
  def pieces(q, k, v, gates):
    state, outs, start = op.init_state(B, 20, G, K, jnp.float32), [], 0
    for n in (7, 1, 1, 11):
      cut = lambda x: x[:, start:start + n]
      if n == 1:
        out, state = op.decode_step(
            state, q[:, start], k[:, start], v[:, start], index=start,
            bias=None, **{key: x[:, start] for key, x in gates.items()})
        out = out[:, None]
      else:
        out, state = op.prefill(state, cut(q), cut(k), cut(v), index=start,
                                bias=None, **jax.tree.map(cut, gates))
      outs.append(out)
      start += n
    return jnp.concatenate(outs, axis=1), state

  out, state = pieces(q, k, v, gates)
  assert relative(out, want) < 1e-5
  assert relative(state.s_BxGxKxV, want_state) < 1e-5
  assert state.s_BxGxKxV.dtype == jnp.float32


@pytest.mark.parametrize("gated", [False, True])
def test_gradients_match_the_reference(gated):
  """Gradients of q, k, v, beta, g and the initial state through outputs
  and final state: chunked (chunk 8) against the step-by-step scan."""
  q, k, v, beta, g, s0 = inputs(2, t=20)
  args = (q, k, v, beta, g, s0) if gated else (q, k, v, beta, s0)
  rng = np.random.default_rng(3)
  out_ct = rng.standard_normal((B, 20, H, V)).astype(np.float32)
  state_ct = rng.standard_normal(s0.shape).astype(np.float32)

  def grads(form):
    def loss(*args):
      *xs, state = args
      out, state = form(*xs, *([] if gated else [None]), state)
      return jnp.vdot(out, out_ct) + jnp.vdot(state, state_ct)
    return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)

  got = grads(functools.partial(delta.chunked, chunk=8))
  want = grads(delta.reference)
  for name, x, y in zip(("q", "k", "v", "beta") + (("g",) if gated else ())
                        + ("state",), got, want):
    assert relative(x, y) < 1e-5, name


def test_extreme_log_gates_stay_finite():
  """Log gates from -20 to -1e-4 (log-uniform magnitudes): every exponent
  the chunked form takes is <= 0, so outputs, state and gradients are
  finite, and the outputs match float64."""
  q, k, v, beta, _, s0 = inputs(4)
  g = -np.exp(np.random.default_rng(5).uniform(np.log(1e-4), np.log(20),
                                               (B, T, G))).astype(np.float32)
  run = jax.jit(lambda *a: delta.chunked(*a, chunk=8))
  out, state = run(q, k, v, beta, g, s0)
  want, want_state = numpy_delta(q, k, v, beta, g, s0)
  assert relative(out, want) < 1e-4 and relative(state, want_state) < 1e-4
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a)[0]),
                           argnums=range(6)))(q, k, v, beta, g, s0)
  assert all(np.isfinite(x).all() for x in grads)


def test_bfloat16_inputs_run_with_a_float32_state():
  """bfloat16 q, k, v and gates: the op's output is bfloat16 and finite,
  its state float32, and both match float64 of the rounded inputs."""
  q, k, v, beta, g, _ = inputs(6, dtype=jnp.bfloat16, v_dim=K)
  op = registry.build("attention", "gated_deltanet(chunk=8)")
  out, state = jax.jit(lambda *a: op.prefill(
      op.init_state(B, T, G, K, jnp.bfloat16), *a[:3], index=0, bias=None,
      beta=a[3], g=a[4]))(q, k, v, beta, g)
  assert out.dtype == jnp.bfloat16 and state.s_BxGxKxV.dtype == jnp.float32
  want, want_state = numpy_delta(*(np.asarray(x, np.float32)
                                   for x in (q, k, v, beta, g)))
  assert np.isfinite(np.asarray(out, np.float32)).all()
  assert relative(out, want) < 1e-2
  assert relative(state.s_BxGxKxV, want_state) < 1e-5


def test_padding_mask_leaves_the_state_as_it_is():
  """A masked key changes nothing: the outputs at real positions are those
  of the sequence without the masked tokens."""
  q, k, v, beta, g, _ = inputs(7, t=13)
  mask = np.random.default_rng(8).random((B, 13)) < 0.6
  op = registry.build("attention", "gated_deltanet(chunk=4)")
  out = jax.jit(lambda *a: op(*a[:3], causal=True, mask=a[5], beta=a[3],
                              g=a[4]))(q, k, v, beta, g, mask)
  for b in range(B):
    keep = mask[b]
    want, _ = numpy_delta(*(x[b:b + 1, keep] for x in (q, k, v, beta, g)))
    np.testing.assert_allclose(out[b, keep], want[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t,s", [(5, 13), (13, 5)])
def test_unequal_lengths_are_end_aligned(t, s):
  """T < S: the queries are the last T positions; T > S: the first T - S
  queries come before any key (zero outputs)."""
  q, k, v, beta, _, _ = inputs(9, t=13)
  op = registry.build("attention", "deltanet(chunk=4)")
  want, _ = numpy_delta(q, k, v, beta)
  out = op(q[:, 13 - t:], k[:, 13 - s:], v[:, 13 - s:], causal=True,
           beta=beta[:, 13 - s:])
  if t < s:
    np.testing.assert_allclose(out, want[:, s - t:], rtol=1e-5, atol=1e-6)
  else:
    assert not np.asarray(out[:, :t - s]).any()
    want, _ = numpy_delta(q[:, t - s:], k[:, 13 - s:], v[:, 13 - s:],
                          beta[:, 13 - s:])
    np.testing.assert_allclose(out[:, t - s:], want, rtol=1e-5, atol=1e-6)


def test_refusals():
  q, k, v, beta, g, _ = inputs(10, t=4)
  plain = registry.build("attention", "deltanet")
  gated = registry.build("attention", "gated_deltanet")
  with pytest.raises(ValueError, match=r"^attention deltanet is causal only"):
    plain(q, k, v, causal=False, beta=beta)
  with pytest.raises(ValueError, match=r"takes gates: beta; got unknown g"):
    plain(q, k, v, causal=True, beta=beta, g=g)
  with pytest.raises(ValueError, match=r"got none for g"):
    gated(q, k, v, causal=True, beta=beta)
  with pytest.raises(ValueError, match=r"gate g must be one per kv head"):
    gated(q, k, v, causal=True, beta=beta, g=np.repeat(g[..., None], K, -1))
  with pytest.raises(ValueError, match=r"chunk=\.\.\.\) must be >= 1"):
    registry.build("attention", "gated_deltanet(chunk=0)")
  assert not registry.compatible("deltanet", "rope")
  assert not registry.compatible("gated_deltanet", "alibi")


def test_programs_hold_no_lapack():
  """The triangular inverse is matmuls and a loop: XLA:CPU can deadlock a
  program holding several LAPACK calls on 2 cores."""
  q, k, v, beta, g, s0 = inputs(11, t=128)
  lowered = jax.jit(jax.grad(lambda *a: jnp.sum(delta.chunked(*a)[0]),
                             argnums=range(6))).lower(q, k, v, beta, g, s0)
  assert "lapack" not in lowered.as_text().lower()


TRAIN_4_LAYERS = """
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from zoo import registry
from zoo.layers import ModelConfig
model = registry.get("model", "lm")(ModelConfig(
    vocab_size=32, seq_len=40, attention="deltanet;gated_deltanet",
    num_layers=4, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64),
    rngs=nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
tokens = jax.random.randint(jax.random.key(0), (2, 41), 0, 32)
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
         "weights": jnp.ones((2, 40))}

@nnx.jit
def step(model, optimizer, batch):
  loss, grads = nnx.value_and_grad(lambda m: m.loss(batch)[0])(model)
  optimizer.update(model, grads)
  return loss, grads

loss, grads = step(model, optimizer, batch)
finite = all(np.isfinite(x).all() for x in jax.tree.leaves(grads))
print("RESULT", float(loss), finite)
"""


@pytest.mark.slow
def test_four_layer_model_trains_one_step_without_hanging():
  """Both families stacked, 4 layers at the default chunk (40 positions:
  three 16-row blocks merged): one training step compiles and runs within
  a bound, in a fresh process, with a finite loss and gradients."""
  result = subprocess.run([sys.executable, "-c", TRAIN_4_LAYERS], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
  loss, finite = line[-1].split()[1:]
  assert np.isfinite(float(loss)) and finite == "True"
