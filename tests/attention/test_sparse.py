"""Sparse ops against the dense reference under each pattern's mask, built
here in numpy from the pattern definitions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import registry

B, T, H, D = 2, 13, 4, 8  # T is not a multiple of the blocks used below


def random_qkv(seed, g=2, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, T, H, D), dtype),
          jax.random.normal(kk, (B, T, g, D), dtype),
          jax.random.normal(kv, (B, T, g, D), dtype))


def key_mask():
  """BxT padding mask; batch 1 also hides key 0, so its causal query 0 has
  no key (zero output)."""
  mask = np.random.default_rng(0).random((B, T)) < 0.7
  mask[1, 0] = False
  return mask


def strided_allowed(l, causal):
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  ok = (np.abs(i - j) < l) | ((i - j) % l == 0)
  return ok & (j <= i) if causal else ok


def fixed_allowed(l, c, causal):
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  ok = (i // l == j // l) | (j % l >= l - c)
  return ok & (j <= i) if causal else ok


def bigbird_allowed(layout_HxNxN, l, causal):
  """HxTxT from a per-head block layout."""
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  ok = layout_HxNxN[:, i // l, j // l]
  return ok & (j <= i) if causal else ok


@functools.partial(jax.jit, static_argnames=("op", "causal", "bias"))
def _jit_call(op, q, k, v, mask, causal, bias):
  return op(q, k, v, causal=causal, mask=mask, bias=bias)


def call(op, q, k, v, causal=False, mask=None, bias=None):
  """op(q, k, v, ...) under jit: one compile per op and shape, not one per
  primitive as in eager mode. `op` is an op or a spec."""
  if isinstance(op, str):
    op = registry.build("attention", op)
  return _jit_call(op, q, k, v, None if mask is None else jnp.asarray(mask),
                   causal, bias)


def dense(q, k, v, allowed, mask=None, bias=None):
  """The dense op under `allowed` (TxS, or HxTxS: one mask per head, run
  head by head) and an optional BxS padding mask."""
  if allowed.ndim == 3:
    r = q.shape[2] // k.shape[2]
    head_bias = lambda h: None if bias is None else (
        lambda qp, kp: bias(qp, kp)[h:h + 1])
    return jnp.concatenate([
        dense(q[:, :, h:h + 1], k[:, :, h // r:h // r + 1],
              v[:, :, h // r:h // r + 1], allowed[h], mask, head_bias(h))
        for h in range(q.shape[2])], axis=2)
  allowed = np.broadcast_to(allowed, (B, T, T))
  if mask is not None:
    allowed = allowed & mask[:, None, :]
  return call("standard", q, k, v, mask=jnp.asarray(allowed), bias=bias)


SPARSE = [("sparse(pattern='strided', block=4)",
           lambda c: strided_allowed(4, c)),
          ("sparse(pattern='fixed', block=4, summary=1)",
           lambda c: fixed_allowed(4, 1, c)),
          ("sparse(pattern='fixed', block=5, summary=2)",
           lambda c: fixed_allowed(5, 2, c))]


@pytest.mark.parametrize("spec,allowed", SPARSE)
@pytest.mark.parametrize("causal", [True, pytest.param(False,
                                                       marks=pytest.mark.slow)])
@pytest.mark.parametrize("padded", [False, True])
def test_sparse_matches_dense_with_pattern_mask(spec, allowed, causal, padded):
  q, k, v = random_qkv(0)
  mask = key_mask() if padded else None
  out = call(spec, q, k, v, causal=causal,
             mask=None if mask is None else jnp.asarray(mask))
  np.testing.assert_allclose(out, dense(q, k, v, allowed(causal), mask),
                             atol=1e-5)
  if padded and causal:
    assert not np.asarray(out[1, 0]).any()


BIGBIRD = [(2, 1, 3, 2), (2, 2, 2, 1), (3, 0, 1, 3), (4, 1, 3, 0), (2, 3, 1, 1)]


@pytest.mark.parametrize("block,num_global,num_window,num_random", BIGBIRD)
@pytest.mark.parametrize("causal", [True, False])
def test_bigbird_layout_follows_definition(block, num_global, num_window,
                                           num_random, causal):
  op = registry.build(
      "attention", f"bigbird(block={block}, num_global={num_global}, "
      f"num_window={num_window}, num_random={num_random})")
  n = 9
  lead, trail = (num_global + 1) // 2, num_global // 2
  glob = set(range(lead)) | (set() if causal else set(range(n - trail, n)))
  for layout in op.block_layout(n, causal, num_heads=3):
    for i in range(n):
      if causal:
        fixed = {j for j in glob if j <= i}
        fixed |= set(range(max(i - num_window + 1, 0), i + 1))
        free = set(range(i)) - fixed
      else:
        if i in glob:
          assert layout[i].all()
          continue
        low = i - (num_window - 1) // 2
        fixed = set(glob)
        fixed |= set(range(max(low, 0), min(low + num_window, n)))
        free = set(range(n)) - fixed
      row = set(np.flatnonzero(layout[i]))
      assert fixed <= row
      assert row - fixed <= free
      assert len(row - fixed) == min(num_random, len(free))


def test_bigbird_random_blocks_differ_per_head_and_layer():
  op = registry.build("attention", "bigbird(block=2)")
  layouts = op.block_layout(16, False, num_heads=4)
  assert all((layouts[0] != layouts[h]).any() for h in range(1, 4))
  other_layer = op.for_layer(1).block_layout(16, False, num_heads=4)
  assert (layouts != other_layer).any()
  np.testing.assert_array_equal(layouts,
                                op.for_layer(0).block_layout(16, False, 4))


def test_bigbird_defaults_are_the_papers():
  op = registry.build("attention", "bigbird")
  assert (op.num_global, op.num_window, op.num_random) == (2, 3, 3)
  np.testing.assert_array_equal(op.global_blocks(8, causal=False), [0, 7])
  np.testing.assert_array_equal(op.global_blocks(8, causal=True), [0])


@pytest.mark.parametrize("block,num_global,num_window,num_random", BIGBIRD)
@pytest.mark.parametrize("causal", [True, False])
def test_bigbird_matches_dense_with_layout_mask(block, num_global, num_window,
                                                num_random, causal):
  op = registry.build(
      "attention", f"bigbird(block={block}, num_global={num_global}, "
      f"num_window={num_window}, num_random={num_random})").for_layer(2)
  q, k, v = random_qkv(1)
  mask = key_mask()
  out = call(op, q, k, v, causal=causal, mask=jnp.asarray(mask))
  layout = op.block_layout(-(-T // block), causal, num_heads=H)
  ref = dense(q, k, v, bigbird_allowed(layout, block, causal), mask)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_bigbird_is_deterministic_under_seed_and_differs_across_seeds():
  q, k, v = random_qkv(2)
  build = lambda seed: registry.build(
      "attention", f"bigbird(block=1, num_window=1, num_random=2, seed={seed})")
  for causal in (True, False):
    np.testing.assert_array_equal(build(0).block_layout(T, causal),
                                  build(0).block_layout(T, causal))
    assert (build(0).block_layout(T, causal)
            != build(1).block_layout(T, causal)).any()
  assert not np.allclose(call(build(0), q, k, v, causal=True),
                         call(build(1), q, k, v, causal=True))


def small_bigbird_allowed(causal):
  layout = registry.build("attention", "bigbird(block=2, num_random=1)"
                          ).block_layout(-(-T // 2), causal, num_heads=H)
  return bigbird_allowed(layout, 2, causal)


ALL = SPARSE[:2] + [("bigbird(block=2, num_random=1)", small_bigbird_allowed)]


@pytest.mark.parametrize("spec,allowed", ALL)
def test_multi_query_attention(spec, allowed):
  """One kv head shared by all four query heads (the other tests use two)."""
  q, k, v = random_qkv(3, g=1)
  out = call(spec, q, k, v, causal=True)
  np.testing.assert_allclose(out, dense(q, k, v, allowed(True)), atol=1e-5)


@pytest.mark.parametrize("spec,allowed", ALL)
@pytest.mark.parametrize("causal", [True, pytest.param(False,
                                                       marks=pytest.mark.slow)])
def test_bias_is_evaluated_on_gathered_positions(spec, allowed, causal):
  q, k, v = random_qkv(4)
  slopes = jnp.array([0.5, 0.25, 0.125, 0.0625])

  def bias(q_pos, k_pos):
    distance = q_pos[:, None] - k_pos[None, :]
    return -slopes[:, None, None] * jnp.abs(distance) + 0.1 * (distance > 0)

  mask = key_mask()
  out = call(spec, q, k, v, causal=causal, bias=bias, mask=jnp.asarray(mask))
  np.testing.assert_allclose(
      out, dense(q, k, v, allowed(causal), mask, bias), atol=1e-5)


@pytest.mark.parametrize("spec,allowed", ALL)
def test_gradients_match_dense(spec, allowed):
  q, k, v = random_qkv(5)
  mask = jnp.asarray(key_mask())
  w = jax.random.normal(jax.random.key(9), q.shape)
  op = registry.build("attention", spec)

  def grads(f):
    loss = lambda *qkv: jnp.sum(f(*qkv) * w)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  got = grads(lambda *a: op(*a, causal=True, mask=mask))
  ref = grads(lambda *a: dense(*a, allowed(True), np.asarray(mask)))
  for g_op, g_ref in zip(got, ref):
    np.testing.assert_allclose(g_op, g_ref, atol=1e-5)


@pytest.mark.parametrize("spec,allowed", ALL)
def test_bf16_inputs_give_bf16_close_to_fp32(spec, allowed):
  q, k, v = random_qkv(6)
  out = call(spec, *(a.astype(jnp.bfloat16) for a in (q, k, v)), causal=True)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32),
                             dense(q, k, v, allowed(True)), atol=0.1)


@pytest.mark.parametrize("spec", [spec for spec, _ in ALL])
@pytest.mark.parametrize("t", [5])
def test_causal_outputs_ignore_later_keys(spec, t):
  q, k, v = random_qkv(7)
  noise = jax.random.normal(jax.random.key(8), k.shape)
  later = (jnp.arange(T) > t)[None, :, None, None]
  op = registry.build("attention", spec)
  out = call(op, q, k, v, causal=True)
  moved = call(op, q, jnp.where(later, k + noise, k),
               jnp.where(later, v - noise, v), causal=True)
  np.testing.assert_array_equal(out[:, :t + 1], moved[:, :t + 1])


@pytest.mark.parametrize("name", ["sparse", "bigbird"])
def test_unequal_lengths_are_refused(name):
  q, k, v = random_qkv(9)
  with pytest.raises(ValueError, match="q_len == kv_len"):
    registry.build("attention", name)(q[:, :5], k, v, causal=True)


@pytest.mark.parametrize("spec,arg", [
    ("sparse(pattern='dilated')", "pattern"),
    ("sparse(block=0)", "block"),
    ("sparse(pattern='fixed', block=4, summary=5)", "summary"),
    ("sparse(pattern='fixed', summary=0)", "summary"),
    ("bigbird(block=0)", "block"),
    ("bigbird(num_global=-1)", "num_global"),
    ("bigbird(num_window=0)", "num_window"),
    ("bigbird(num_random=-1)", "num_random"),
    ("bigbird(seed=-1)", "seed"),
])
def test_bad_arguments_are_refused(spec, arg):
  with pytest.raises(ValueError, match=rf"\({arg}="):
    registry.build("attention", spec)
