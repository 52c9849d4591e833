"""Decoding through each attention op's own state (zoo/attention/base.py,
the LM's init_cache / prefill / decode_step in zoo/models/transformer.py):
prompts prefilled in chunks, continued, then decoded token by token equal
the forward pass for every compatible attention x position pair; writing
past the capacity is refused; the state each family keeps; BigBird's
prefix-consistent layout; the cache's sharding."""

import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo import registry
from zoo.attention import sparse
from zoo.layers import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SEQ_LEN, VOCAB = 16, 32
# How the 16 tokens are fed: a prompt of 5, a continuation of 3 into the
# filled cache (chunked prefill), 4 single steps (past local's window of 4
# and across sparse blocks), then a second turn of 4.
PIECES = (5, 3, 1, 1, 1, 1, 4)
# As tests/position/test_compatibility.py: arguments that keep ops tiny.
SMALL_ARGS = {"window": 4, "block": 4, "block_q": 4, "block_k": 4,
              "chunk": 4, "num_random": 1, "num_features": 8,
              "feature_dim": 4}
# Variants beyond each op's (small) defaults, each with one position:
# FAVOR+, the fixed pattern, BigBird with enough blocks for random ones,
# splash of each pattern.
VARIANTS = (("linear(feature='favor', num_features=8, chunk=4)", "rope"),
            ("sparse(pattern='fixed', block=4, summary=2)", "alibi"),
            ("bigbird(block=2, num_random=1)", "t5"),
            ("splash(like='local(window=4)')", "rope"),
            ("splash(like='sparse(block=4)')", "rope"),
            ("splash(like='bigbird(block=2, num_random=1)')", "rope"))
# Layers in the parity program: two with rotary positions (each layer
# rotates q and k at the cache's position), one elsewhere (compiling
# dominates; the linear test below decodes 2 layers too).
LAYERS = {"rope": 2}
FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}


def small_spec(name: str) -> str:
  args = {p.name: SMALL_ARGS[p.name] for p in registry.params("attention", name)
          if p.name in SMALL_ARGS}
  if not args:
    return name
  return f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def pairs():
  specs = [small_spec(a) for a in registry.names("attention")]
  return [(a, p) for a in specs for p in registry.names("position")
          if registry.compatible(a, p)] + list(VARIANTS)


def lm(attention, position, seq_len=SEQ_LEN, seed=0, num_layers=2):
  return registry.get("model", "lm")(ModelConfig(
      vocab_size=VOCAB, seq_len=seq_len, attention=attention,
      position=position, num_layers=num_layers, embed_dim=16, num_heads=4,
      num_kv_heads=2, mlp_dim=32), rngs=nnx.Rngs(seed))


def forward_and_decoded(model, tokens_BxT, pieces=PIECES):
  """Full forward logits, those of the tokens fed in `pieces` (prefill for
  a piece of several tokens, decode_step for one), and the final cache."""
  cache = model.init_cache(tokens_BxT.shape[0], tokens_BxT.shape[1])

  def step(cache, token_B):
    logits_BxV, cache = model.decode_step(token_B, cache)
    return cache, logits_BxV

  logits, start = [], 0
  for n, run in itertools.groupby(pieces):
    if n == 1:  # consecutive single steps: one scanned decode step
      steps = len(list(run))
      cache, logits_SxBxV = jax.lax.scan(
          step, cache, tokens_BxT[:, start:start + steps].T)
      logits.append(logits_SxBxV.swapaxes(0, 1))
      start += steps
      continue
    for _ in run:
      logits_BxNxV, cache = model.prefill(tokens_BxT[:, start:start + n],
                                          cache)
      logits.append(logits_BxNxV)
      start += n
  assert start == tokens_BxT.shape[1]
  return model(tokens_BxT), jnp.concatenate(logits, axis=1), cache


# One op of each decode state (KV cache, pattern rows, ring, recurrent):
# the fast tier's share of `pairs`.
FAST_OPS = ("standard", "bigbird", "local", "linear")


def fast_pairs():
  """One pair per FAST_OPS op, with the position its decode path finds
  hardest (a bias, then rotary)."""
  order = ("t5", "alibi", "rope", "sinusoidal", "learned", "none")
  best = {}
  for a, p in pairs():
    if registry.parse(a)[0] not in FAST_OPS:
      continue
    if a not in best or order.index(p) < order.index(best[a]):
      best[a] = p
  return sorted(best.items())


def parity_of(cases):
  """{pair: (max |decoded - forward|, max |forward|)} for `cases`, all in
  one compiled program (at these sizes compiling dominates)."""
  models = [lm(a, p, num_layers=LAYERS.get(p, 1)) for a, p in cases]
  graphdef, state = nnx.split(models)
  tokens = jax.random.randint(jax.random.key(1), (2, SEQ_LEN), 0, VOCAB)

  def run(state, tokens):
    diffs = []
    for model in nnx.merge(graphdef, state):
      full, decoded, _ = forward_and_decoded(model, tokens)
      diffs.append(jnp.stack([jnp.abs(decoded - full).max(),
                              jnp.abs(full).max()]))
    return jnp.stack(diffs)

  compiled = jax.jit(run).lower(state, tokens).compile(
      compiler_options=FAST_COMPILE)
  return dict(zip(cases, np.asarray(compiled(state, tokens))))


@pytest.fixture(scope="module")
def parity_fast():
  return parity_of(fast_pairs())


@pytest.fixture(scope="module")
def parity_all():
  return parity_of([c for c in pairs() if c not in fast_pairs()])


def test_every_compatible_pair_is_covered():
  cases = pairs()
  names = {registry.parse(a)[0] for a, _ in cases}
  assert names == set(registry.names("attention"))
  assert {p for _, p in cases} == set(registry.names("position"))
  assert len(cases) > 45


def check_parity(parity, attention, position):
  """Logits at every position, fed as PIECES (prefill into an empty cache,
  prefill continuing it, single steps, a second turn), against the full
  forward pass; fp32, 4 heads over 2 kv heads."""
  diff, scale = parity[attention, position]
  assert scale > 0.1
  assert diff < 2e-5, (attention, position, diff)


@pytest.mark.parametrize("attention,position", fast_pairs())
def test_chunked_prefill_and_decode_equal_the_forward_pass(
    parity_fast, attention, position):
  check_parity(parity_fast, attention, position)


@pytest.mark.slow
@pytest.mark.parametrize("attention,position",
                         [c for c in pairs() if c not in fast_pairs()])
def test_every_other_pair_decodes_like_the_forward_pass(
    parity_all, attention, position):
  check_parity(parity_all, attention, position)


def test_each_family_keeps_its_state():
  """Capacity C for the KV caches, the window for local's ring buffer
  (whatever C), the recurrent state for linear; kv heads only."""
  def shapes(attention, max_len):
    cache = lm(attention, "none").init_cache(3, max_len)
    return [x.shape for x in jax.tree.leaves(cache.layers[0])]

  assert shapes("standard", 40) == [(3, 2, 40, 4)] * 2
  assert shapes("bigbird(block=4)", 40) == [(3, 2, 40, 4)] * 2
  assert shapes("local(window=4)", 40) == [(3, 2, 4, 4)] * 2
  assert shapes("local(window=4)", 4000) == [(3, 2, 4, 4)] * 2
  assert shapes("local(window=8)", 5) == [(3, 2, 5, 4)] * 2
  assert shapes("linear", 4000) == [(3, 2, 4, 4), (3, 2, 4), (3, 2)]
  assert shapes("linear(feature='favor', num_features=8)", 40) == [
      (3, 2, 8, 4), (3, 2, 8), (3, 2)]
  assert shapes("splash(like='local(window=4)')", 40) == [(3, 2, 4, 4)] * 2


@pytest.mark.slow
def test_linear_state_after_ten_training_lengths():
  """160 steps of models trained at 16 (elu+1 and FAVOR+): the recurrent
  state and logits stay finite and equal the forward pass at 160."""
  models = [lm("linear(chunk=4)", "sinusoidal"),
            lm("linear(feature='favor', num_features=8, chunk=4)", "rope")]
  tokens = jax.random.randint(jax.random.key(2), (1, 10 * SEQ_LEN), 0, VOCAB)
  pieces = (1,) * tokens.shape[1]
  runs = jax.jit(lambda tokens: [forward_and_decoded(m, tokens, pieces)
                                 for m in models])(tokens)
  for full, decoded, cache in runs:
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(cache.layers))
    np.testing.assert_allclose(decoded, full, atol=5e-5)


@pytest.mark.parametrize("spec", ["bigbird(block=2, num_random=1)",
                                  "bigbird(block=4, num_global=4, "
                                  "num_window=2, num_random=2)"])
def test_bigbird_causal_layout_is_prefix_consistent(spec):
  """Row i's random blocks depend only on rows < i: the causal pattern at
  any capacity agrees with a shorter length's on their common rows."""
  op = registry.build("attention", spec).for_layer(3)
  longest = op.pattern_mask(64, True, num_heads=4)
  for t in (1, 3, 8, 16, 33, 63):
    np.testing.assert_array_equal(op.pattern_mask(t, True, num_heads=4),
                                  longest[:, :t, :t])


@pytest.mark.parametrize("spec", ["sparse(block=4)",
                                  "sparse(pattern='fixed', block=4, "
                                  "summary=2)",
                                  "bigbird(block=2, num_random=2)"])
def test_pattern_tiles_hold_the_pattern(spec):
  """The tiles a pattern decodes with reproduce op.allows at the capacity,
  row by row, capacity not a multiple of the block."""
  op = registry.build("attention", spec)
  index_HxNxN, tiles_UxLxL = sparse.pattern_tiles(op, 37, 4, op.block)
  l = tiles_UxLxL.shape[1]
  n = index_HxNxN.shape[1]
  rebuilt = tiles_UxLxL[index_HxNxN].transpose(0, 1, 3, 2, 4).reshape(
      -1, n * l, n * l)[:, :37, :37]
  want = op.pattern_mask(37, True, num_heads=4)
  np.testing.assert_array_equal(np.broadcast_to(rebuilt, want.shape), want)
  assert len(tiles_UxLxL) <= 6


@pytest.mark.parametrize("attention", [
    small_spec(a) if a in ("standard", "local", "linear")
    else pytest.param(small_spec(a), marks=pytest.mark.slow)
    for a in registry.names("attention")])
def test_writing_past_the_capacity_is_refused(attention):
  """Every family: a decode step or a prefill past max_len raises with one
  line (the index is known outside jit); inside jit, where it is not, the
  overflowing logits are NaN rather than those of a clamped write."""
  model = lm(attention, "none", num_layers=1)
  tokens = jnp.arange(8, dtype=jnp.int32)[None] % VOCAB
  _, cache = model.prefill(tokens[:, :6], model.init_cache(1, 6))
  with pytest.raises(ValueError, match=r"^decoding position 6 is past the "
                     r"cache's capacity max_len=6; build the cache with a "
                     r"larger max_len$"):
    model.decode_step(tokens[:, 6], cache)
  _, half = model.prefill(tokens[:, :4], model.init_cache(1, 6))
  with pytest.raises(ValueError, match=r"positions 4\.\.7 is past"):
    model.prefill(tokens[:, 4:8], half)
  logits_1xV, _ = jax.jit(model.decode_step)(tokens[:, 6], cache)
  assert np.isnan(np.asarray(logits_1xV)).all()


def test_bidirectional_attention_is_refused_a_cache():
  model = registry.get("model", "classifier")(ModelConfig(
      vocab_size=VOCAB, seq_len=SEQ_LEN, num_classes=2, embed_dim=16,
      num_heads=4, num_kv_heads=2, mlp_dim=32), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"decoding needs causal attention"):
    model.trunk.init_cache(1, 8)


def test_learned_positions_refuse_a_cache_past_their_table():
  model = lm("standard", "learned")
  with pytest.raises(ValueError, match=r"decoding max_len=17 exceeds the 16 "
                     r"positions of position learned"):
    model.init_cache(1, 17)


# The cache's sharding, on 4 fake devices in a subprocess.

def _worker_sharded_decode():
  """Decodes on a (data 2, tensor 2) mesh: returns each family's cache
  partition specs and the largest difference from the forward pass."""
  import flax.linen as nn
  from zoo import sharding
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
  rules = sharding.parse_rules(sharding.DEFAULT_RULES)
  tokens = jax.random.randint(jax.random.key(1), (2, SEQ_LEN), 0, VOCAB)
  specs = ("standard", "local(window=4)", "linear(chunk=4)")
  models = [lm(attention, "none", num_layers=1) for attention in specs]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    runs = jax.jit(lambda tokens: [forward_and_decoded(m, tokens)
                                   for m in models])(tokens)
  return {attention: {
      "specs": [list(leaf.sharding.spec) + [None] * (
          leaf.ndim - len(leaf.sharding.spec))
                for leaf in jax.tree.leaves(cache.layers[0])],
      "diff": float(jnp.abs(decoded - full).max())}
          for attention, (full, decoded, cache) in zip(specs, runs)}


@pytest.mark.slow
def test_the_cache_is_sharded_like_the_activations():
  code = (f"import sys; sys.path.insert(0, {ROOT!r}); import json; "
          "from tests.models import test_decoding as t; "
          "print('RESULT', json.dumps(t._worker_sharded_decode()))")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
  out = json.loads(line[-1][len("RESULT "):])
  kv = ["data", "tensor", None, None]
  assert out["standard"]["specs"] == [kv, kv]
  assert out["local(window=4)"]["specs"] == [kv, kv]
  assert out["linear(chunk=4)"]["specs"] == [
      ["data", "tensor", None, None], ["data", "tensor", None],
      ["data", "tensor"]]
  for row in out.values():
    assert row["diff"] < 1e-5
