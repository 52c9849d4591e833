"""The `splash` op's kernels in Pallas interpret mode against the dense op
under each pattern's mask, built here in numpy from the pattern definitions
(per head for BigBird); device choice and refusals; sharding on 8 fake
devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.attention.kernels.test_placement import sharded_error
from zoo import registry
from zoo.attention.kernels import placement, splash

# The smallest shapes splash accepts: blocks of 128 (its lanes), two of them.
B, T, H, D = 2, 256, 4, 8


def random_qkv(seed, t=T, g=2, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((B, t, H, D)).astype(dtype),
          rng.standard_normal((B, t, g, D)).astype(dtype),
          rng.standard_normal((B, t, g, D)).astype(dtype))


def key_mask(t=T):
  """BxT padding mask; batch 1 also hides key 0, so its causal query 0 has
  no key (zero output)."""
  mask = np.random.default_rng(0).random((B, t)) < 0.7
  mask[1, 0] = False
  return mask


def positions(t):
  return np.arange(t)[:, None], np.arange(t)[None, :]


def standard_allowed(t, causal):
  i, j = positions(t)
  return np.broadcast_to(j <= i if causal else True, (1, t, t))


def local_allowed(window):
  def allowed(t, causal):
    i, j = positions(t)
    if causal:
      return ((i - j >= 0) & (i - j < window))[None]
    return (np.abs(i - j) <= window)[None]
  return allowed


def strided_allowed(l):
  def allowed(t, causal):
    i, j = positions(t)
    ok = (np.abs(i - j) < l) | ((i - j) % l == 0)
    return (ok & (j <= i) if causal else ok)[None]
  return allowed


def fixed_allowed(l, c):
  def allowed(t, causal):
    i, j = positions(t)
    ok = (i // l == j // l) | (j % l >= l - c)
    return (ok & (j <= i) if causal else ok)[None]
  return allowed


def bigbird_allowed(spec, layer, l):
  """The random blocks are the bigbird op's draw for `layer` (one layout per
  head); the rest is the definition."""
  def allowed(t, causal):
    layout_HxNxN = registry.build("attention", spec).for_layer(
        layer).block_layout(-(-t // l), causal, H)
    i, j = positions(t)
    ok = layout_HxNxN[:, i // l, j // l]
    return ok & (j <= i) if causal else ok
  return allowed


def dense(q, k, v, allowed_HxTxT, mask):
  """The standard op, head by head under each head's mask (and padding)."""
  ref = registry.build("attention", "standard")
  r = q.shape[2] // k.shape[2]
  allowed_HxTxT = np.broadcast_to(allowed_HxTxT, (H,) + allowed_HxTxT.shape[1:])
  valid_BxT = np.ones(k.shape[:2], bool) if mask is None else mask
  head = lambda x, h: x[:, :, h:h + 1]
  return jnp.concatenate([
      ref(head(q, h), head(k, h // r), head(v, h // r),
          mask=jnp.asarray(allowed_HxTxT[h][None] & valid_BxT[:, None, :]))
      for h in range(H)], axis=2)


def assert_matches_dense(spec, q, k, v, allowed_HxTxT, *, causal, mask=None,
                         grads=True, atol=2e-5):
  """Outputs (and gradients) of `spec` (or an op) equal the dense op's head
  by head; returns the op's output."""
  op = registry.build("attention", spec) if isinstance(spec, str) else spec
  cotangent = np.random.default_rng(99).standard_normal(q.shape, np.float32)
  mask = None if mask is None else jnp.asarray(mask)
  got = lambda q, k, v: op(q, k, v, causal=causal, mask=mask)
  want = lambda q, k, v: dense(q, k, v, allowed_HxTxT, mask)

  def run(f):
    if not grads:
      return f(q, k, v), ()
    loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cotangent)
    return f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  (out, out_grads), (ref, ref_grads) = jax.jit(
      lambda: (run(got), run(want)))()
  np.testing.assert_allclose(out, ref, atol=atol)
  for out_grad, ref_grad in zip(out_grads, ref_grads):
    np.testing.assert_allclose(out_grad, ref_grad, atol=2.5 * atol)
  return out


def interpreted(like):
  return f"splash(like={like!r}, implementation='splash', interpret=True)"


BIGBIRD = "bigbird(block=32, num_global=2, num_window=3, num_random=2)"
STRIDED = "sparse(pattern='strided', block=32)"
FIXED = "sparse(pattern='fixed', block=32, summary=4)"


def case(like, allowed, causal, padded, grads, slow=False):
  name = {STRIDED: "strided", FIXED: "fixed"}.get(like, like.split("(")[0])
  flags = ["causal" if causal else "bidirectional"] + [
      word for word, on in (("padded", padded), ("grads", grads)) if on]
  return pytest.param(like, allowed, causal, padded, grads,
                      id="-".join([name] + flags),
                      marks=[pytest.mark.slow] if grads or slow else [])


# Every pattern both ways; gradients (three more kernels to compile) for a
# part of them; those and the second case of standard and fixed in the slow
# tier (the fast tier keeps one case of each pattern).
CASES = [
    case("standard", standard_allowed, True, True, True),
    case("standard", standard_allowed, False, False, False, slow=True),
    case("local(window=40)", local_allowed(40), True, True, False),
    case("local(window=40)", local_allowed(40), False, False, True),
    case(STRIDED, strided_allowed(32), True, True, True),
    case(STRIDED, strided_allowed(32), False, True, False),
    case(FIXED, fixed_allowed(32, 4), True, False, False, slow=True),
    case(FIXED, fixed_allowed(32, 4), False, True, False),
    case(BIGBIRD, bigbird_allowed(BIGBIRD, 1, 32), True, True, False),
    case(BIGBIRD, bigbird_allowed(BIGBIRD, 1, 32), False, True, True),
]


@pytest.mark.parametrize("like,allowed,causal,padded,grads", CASES)
def test_splash_matches_dense_with_pattern_mask(like, allowed, causal, padded,
                                                grads):
  """GQA (2 kv heads for 4 query heads); BigBird at layer 1 with its
  per-head random blocks; with a padding mask, a causal query with no key
  gets zeros."""
  op = registry.build("attention", interpreted(like)).for_layer(1)
  q, k, v = random_qkv(0)
  mask = key_mask() if padded else None
  out = assert_matches_dense(op, q, k, v, allowed(T, causal), causal=causal,
                             mask=mask, grads=grads)
  if padded and causal:
    assert not np.asarray(out[1, 0]).any()


def test_bigbird_heads_and_layers_differ():
  """The per-head masks reach the kernel: heads and layers differ (else the
  test above would not see per-head structure)."""
  per_layer = [bigbird_allowed(BIGBIRD, layer, 32)(T, True)
               for layer in (0, 1)]
  assert (per_layer[0][0] != per_layer[0][1]).any()
  assert (per_layer[0] != per_layer[1]).any()
  op = registry.build("attention", interpreted(BIGBIRD)).for_layer(1)
  np.testing.assert_array_equal(op.pattern_mask(T, True, H), per_layer[1])


@pytest.mark.parametrize("like,allowed", [
    ("standard", standard_allowed), (BIGBIRD, bigbird_allowed(BIGBIRD, 0, 32))
])
def test_length_not_a_multiple_of_the_block(like, allowed):
  """200 positions are padded to 256 inside; the padding stays invisible."""
  q, k, v = random_qkv(1, t=200)
  assert_matches_dense(interpreted(like), q, k, v, allowed(200, True),
                       causal=True, mask=key_mask(200), grads=False)


@pytest.mark.slow
def test_multi_query_and_no_mask():
  q, k, v = random_qkv(2, g=1)
  assert_matches_dense(interpreted("local(window=40)"), q, k, v,
                       local_allowed(40)(T, True), causal=True, grads=False)


def test_bf16_inputs_give_bf16_close_to_fp32():
  q, k, v = random_qkv(3)
  op = registry.build("attention", interpreted("standard"))
  out = jax.jit(lambda *a: op(*a, causal=True))(
      *(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             dense(q, k, v, standard_allowed(T, True), None),
                             atol=0.05)


@pytest.mark.parametrize("causal", [pytest.param(True, marks=pytest.mark.slow),
                                    False])
def test_gpu_flash_kernel_matches_dense(causal):
  """The Pallas GPU flash kernel (interpret mode): GQA by repeated kv heads;
  48 positions padded to 64 inside (the padding hidden by segment ids)."""
  q, k, v = random_qkv(4, t=48)
  assert_matches_dense(
      "splash(implementation='flash', interpret=True)", q, k, v,
      standard_allowed(48, causal), causal=causal, grads=causal)


def test_auto_on_cpu_runs_the_pattern_op_with_a_warning(caplog):
  q, k, v = random_qkv(5, t=16)
  like = "local(window=4)"
  op, pattern = (registry.build("attention", spec)
                 for spec in (f"splash(like={like!r})", like))
  got = jax.jit(lambda *a: op(*a, causal=True))(q, k, v)
  want = jax.jit(lambda *a: pattern(*a, causal=True))(q, k, v)
  np.testing.assert_array_equal(got, want)
  placement._WARNED.clear()
  with caplog.at_level("WARNING"):
    jax.jit(lambda *a: registry.build("attention", "splash(like='standard')")(
        *a, causal=False)).lower(q, k, v)
  assert "no standard kernel on cpu; running the pattern's own op" in (
      caplog.text)


@pytest.mark.parametrize("platform,dtype,padded,kernel", [
    ("tpu", jnp.float32, True, "splash"),
    ("gpu", jnp.bfloat16, True, "cudnn"),
    ("gpu", jnp.float32, False, "flash"),
    ("gpu", jnp.float32, True, "pattern"),
    ("cpu", jnp.bfloat16, False, "pattern"),
])
def test_default_kernel_per_device(platform, dtype, padded, kernel):
  chosen, note = splash.choose(None, platform, "standard", dtype,
                               padded, True)
  assert chosen == kernel
  assert bool(note) == (kernel == "pattern")


@pytest.mark.parametrize("platform", ["tpu", "gpu", "cpu"])
def test_sparse_patterns_and_decoding_fall_back_with_a_note(platform):
  for pattern, square in (("bigbird", True), ("standard", False)):
    chosen, note = splash.choose(None, platform, pattern,
                                 jnp.bfloat16, False, square)
    if platform == "tpu" and square:
      assert chosen == "splash"
    else:
      assert chosen == "pattern" and note


def test_keys_per_query_and_pattern_are_the_like_ops():
  op, pattern = (registry.build("attention", s)
                 for s in (interpreted(STRIDED), STRIDED))
  for causal in (True, False):
    assert op.keys_per_query(T, causal) == pattern.keys_per_query(T, causal)
    np.testing.assert_array_equal(op.pattern_mask(T, causal),
                                  strided_allowed(32)(T, causal))
  layer_2 = registry.build("attention", interpreted(BIGBIRD)).for_layer(2)
  assert layer_2.layer == 2
  assert layer_2.pattern == registry.build("attention", BIGBIRD).for_layer(2)


@pytest.mark.parametrize("spec,message", [
    ("splash(implementation='splash')",
     r"needs a TPU; this machine has cpu; use interpret=True for a slow "
     r"check, or implementation=None \(which runs standard's own op here\)"),
    ("splash(implementation='flash')", "needs a GPU; this machine has cpu"),
    ("splash(implementation='cudnn')", "needs a GPU; this machine has cpu"),
    ("splash(implementation='mosaic')", r"implementation=\.\.\.\) must be"),
    ("splash(interpret=True)", "needs implementation='splash' or 'flash'"),
    ("splash(like='linear')", r"like=\.\.\.\) must be the spec of one of"),
    ("splash(like='splash')", r"like=\.\.\.\) must be the spec of one of"),
    ("splash(like='local(window=0)')", r"local\(window=\.\.\.\) must be"),
    ("splash(block_size=100)", "multiple of 128"),
    ("splash(like='local', implementation='flash', interpret=True)",
     "computes dense attention only"),
])
def test_bad_choices_are_refused_at_build(spec, message):
  with pytest.raises(ValueError, match=message):
    registry.build("attention", spec)


def test_refusals_at_call():
  q, k, v = random_qkv(6, t=16)
  op = registry.build("attention",
                      "splash(implementation='flash', interpret=True)")
  with pytest.raises(ValueError, match="takes no padding mask"):
    op(q, k, v, mask=jnp.ones((B, 16), bool))
  with pytest.raises(ValueError, match="cannot take an additive position"):
    op(q, k, v, bias=lambda i, j: jnp.zeros((H, 16, 16)))
  with pytest.raises(ValueError, match="needs bfloat16 or float16 inputs"):
    splash.choose("cudnn", "gpu", "standard", jnp.float32, False, True)
  assert not registry.compatible("splash", "alibi")
  assert registry.compatible("splash", "rope")


@pytest.mark.slow
def test_sharded_over_batch_and_heads_equals_unsharded():
  """splash with GQA (kv heads split), BigBird's per-head masks and a
  padding mask; splash with MQA (kv heads repeated); flash with 48
  positions (padding segment ids sharded)."""
  worst = sharded_error([
      (2, T, interpreted(BIGBIRD), True),
      (1, T, interpreted("standard"), True),
      (2, 48, "splash(implementation='flash', interpret=True)", False)])
  assert worst < 1e-5, worst
