"""zoo/decode.py: prefill + token-by-token decoding equals the forward pass for
every compatible attention x position pair; the decode state of each family
(KV cache, ring buffer, recurrent state); BigBird's prefix-consistent
layout; the sampler as one compiled loop; the cache's sharding."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo import decode, registry
from zoo.attention.base import AttentionOp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, PROMPT, VOCAB = 16, 5, 32
# As tests/position/test_compatibility.py: arguments that keep ops tiny.
SMALL_ARGS = {"window": 4, "block": 4, "block_q": 4, "block_k": 4,
              "chunk": 4, "num_random": 1, "num_features": 8}
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
  return registry.get("model", "lm")(
      vocab_size=VOCAB, seq_len=seq_len, attention=attention,
      position=position, num_layers=num_layers, embed_dim=16, num_heads=4,
      num_kv_heads=2, mlp_dim=32, rngs=nnx.Rngs(seed))


def forward_and_decoded(model, tokens_BxT, prompt: int):
  """Full forward logits, those of prefill(prompt) + one step per remaining
  token, and the cache after the last."""
  cache = model.init_cache(tokens_BxT.shape[0], tokens_BxT.shape[1])
  prefilled_BxPxV, cache = model.prefill(tokens_BxT[:, :prompt], cache)

  def one(cache, token_B):
    logits_BxV, cache = model.decode_step(token_B, cache)
    return cache, logits_BxV

  cache, stepped_TxBxV = jax.lax.scan(one, cache, tokens_BxT[:, prompt:].T)
  decoded = jnp.concatenate([prefilled_BxPxV, stepped_TxBxV.swapaxes(0, 1)],
                            axis=1)
  return model(tokens_BxT), decoded, cache


@pytest.fixture(scope="module")
def parity():
  """(pair, max |decoded - forward|, max |forward|) for every pair, all in
  one compiled program (at these sizes compiling dominates)."""
  cases = pairs()
  models = [lm(a, p, num_layers=LAYERS.get(p, 1)) for a, p in cases]
  graphdef, state = nnx.split(models)
  tokens = jax.random.randint(jax.random.key(1), (2, SEQ_LEN), 0, VOCAB)

  def run(state, tokens):
    diffs = []
    for model in nnx.merge(graphdef, state):
      full, decoded, _ = forward_and_decoded(model, tokens, PROMPT)
      diffs.append(jnp.stack([jnp.abs(decoded - full).max(),
                              jnp.abs(full).max()]))
    return jnp.stack(diffs)

  compiled = jax.jit(run).lower(state, tokens).compile(
      compiler_options=FAST_COMPILE)
  return dict(zip(cases, np.asarray(compiled(state, tokens))))


def test_every_compatible_pair_is_covered(parity):
  names = {registry.parse(a)[0] for a, _ in parity}
  assert names == set(registry.names("attention"))
  assert {p for _, p in parity} == set(registry.names("position"))
  assert len(parity) > 45


@pytest.mark.parametrize("attention,position", pairs())
def test_prefill_and_decode_equal_the_forward_pass(parity, attention,
                                                   position):
  """Logits at every position: prefill of 5 tokens, then 11 single steps
  (past local's window of 4 and across sparse blocks), against the full
  forward pass; fp32, 4 heads over 2 kv heads."""
  diff, scale = parity[attention, position]
  assert scale > 0.1
  assert diff < 2e-5, (attention, position, diff)


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


def test_linear_state_after_ten_training_lengths():
  """160 steps of models trained at 16 (elu+1 and FAVOR+): the recurrent
  state and logits stay finite and equal the forward pass at 160."""
  models = [lm("linear(chunk=4)", "sinusoidal"),
            lm("linear(feature='favor', num_features=8, chunk=4)", "rope")]
  tokens = jax.random.randint(jax.random.key(2), (1, 10 * SEQ_LEN), 0, VOCAB)
  runs = jax.jit(lambda tokens: [forward_and_decoded(m, tokens, 1)
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
  index_HxNxN, tiles_UxLxL = decode.pattern_tiles(op, 37, 4, op.block)
  l = tiles_UxLxL.shape[1]
  n = index_HxNxN.shape[1]
  rebuilt = tiles_UxLxL[index_HxNxN].transpose(0, 1, 3, 2, 4).reshape(
      -1, n * l, n * l)[:, :37, :37]
  want = op.pattern_mask(37, True, num_heads=4)
  np.testing.assert_array_equal(np.broadcast_to(rebuilt, want.shape), want)
  assert len(tiles_UxLxL) <= 6


def test_an_op_of_no_family_is_refused_when_the_cache_is_built():
  @dataclasses.dataclass(frozen=True)
  class Mystery(AttentionOp):
    registry_name = "mystery"

    def attend(self, q, k, v, *, causal, mask, bias):
      return q

  with pytest.raises(ValueError, match=r"attention mystery: no decode state "
                     r"for Mystery; decodable: standard, xla, blockwise, "
                     r"sparse, bigbird, local, linear and splash of those"):
    decode.decoder(Mystery())


def test_learned_positions_refuse_a_cache_past_their_table():
  model = lm("standard", "learned")
  with pytest.raises(ValueError, match=r"decoding max_len=17 exceeds the 16 "
                     r"positions of position learned"):
    model.init_cache(1, 17)


# The sampler.

@pytest.fixture(scope="module")
def model():
  return lm("standard", "rope", seq_len=32, seed=3)


def greedy_by_recomputing(model, prompt, n):
  """Greedy tokens, each from a full forward pass over all tokens so far
  (one compiled length: later positions do not change earlier logits)."""
  p = len(prompt)
  forward = jax.jit(lambda tokens: model(tokens)[0])
  tokens = np.zeros((1, p + n), np.int32)
  tokens[0, :p] = prompt
  for t in range(p, p + n):
    tokens[0, t] = int(jnp.argmax(forward(tokens)[t - 1]))
  return tokens[0, p:].tolist()


@pytest.fixture(scope="module")
def greedy(model):
  """Two prompts and their greedy continuations of 8 tokens."""
  prompt = jnp.asarray([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]])
  tokens, lengths = decode.generate(model, prompt, max_new_tokens=8,
                                    sampling=decode.Sampling(temperature=0))
  assert lengths.tolist() == [8, 8]
  return prompt, tokens.tolist()


def test_greedy_generation_equals_recomputing_the_forward_pass(model, greedy):
  prompt, tokens = greedy
  assert tokens[0] == greedy_by_recomputing(model, prompt[0].tolist(), 8)


def test_a_stop_token_ends_each_row(model, greedy):
  prompt, free = greedy
  stop = free[0][2]
  tokens, lengths = decode.generate(
      model, prompt, max_new_tokens=8,
      sampling=decode.Sampling(temperature=0, stop_token=stop))
  first = [row.index(stop) + 1 if stop in row else 8 for row in free]
  assert lengths.tolist() == first
  for row, free_row, n in zip(tokens.tolist(), free, first):
    assert row[:n] == free_row[:n]
    assert row[n:] == [stop] * (8 - n)


def test_sampling_follows_its_seed(model):
  prompt = jnp.asarray([[3, 1, 4]])
  hot = decode.Sampling(temperature=2.0)
  a, b, c = (decode.generate(model, prompt, max_new_tokens=12, sampling=hot,
                             seed=s)[0].tolist() for s in (0, 0, 1))
  assert a == b != c


def test_top_k_and_top_p_keep_the_likely_tokens():
  logits_BxV = jnp.log(jnp.asarray([[0.5, 0.3, 0.1, 0.06, 0.04]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  settings = [decode.Sampling(), decode.Sampling(top_k=2),
              decode.Sampling(top_k=1), decode.Sampling(top_p=0.85),
              decode.Sampling(top_p=0.75), decode.Sampling(top_p=1e-6)]
  draws = jax.jit(lambda keys: [jax.vmap(
      lambda key: decode.choose(logits_BxV, key, s)[0])(keys)
                                for s in settings])(keys)
  everything, top2, top1, p85, p75, tiny = map(np.asarray, draws)
  np.testing.assert_allclose(np.bincount(everything, minlength=5) / 2000,
                             [0.5, 0.3, 0.1, 0.06, 0.04], atol=0.04)
  assert set(top2) == {0, 1}
  assert set(top1) == set(tiny) == {0}
  # Nucleus 0.85: 0.5 + 0.3 < 0.85 <= 0.5 + 0.3 + 0.1.
  assert set(p85) == {0, 1, 2}
  assert set(p75) == {0, 1}


def test_generation_is_one_loop_whatever_its_length(model):
  """The decode step is traced once, inside a while loop: the program does
  not grow with max_new_tokens."""
  graphdef, state = nnx.split(model)

  def program(n):
    return str(jax.make_jaxpr(lambda s, p: decode._generate(
        graphdef, s, p, jax.random.key(0), None, max_new_tokens=n,
        max_len=n + 3, sampling=decode.Sampling()))(
            state, jnp.zeros((1, 4), jnp.int32)))

  assert "while[" in program(4)
  assert program(4).count("dot_general") == program(40).count("dot_general")


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -1.0}, r"temperature=-1.0 must be >= 0 \(0: greedy\)"),
    ({"top_k": -2}, r"top_k=-2 must be >= 0"),
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
    ({"stop_token": -1}, r"stop_token=-1 must be a token id >= 0"),
])
def test_bad_sampling_values_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    decode.Sampling(**kwargs)


def test_bad_generation_requests_are_refused(model):
  prompt = jnp.asarray([[1, 2]])
  with pytest.raises(ValueError, match=r"max_new_tokens=0 must be >= 1"):
    decode.generate(model, prompt, max_new_tokens=0)
  with pytest.raises(ValueError, match=r"stop_token=32 must be below the "
                     r"vocabulary size 32"):
    decode.generate(model, prompt, max_new_tokens=2,
                    sampling=decode.Sampling(stop_token=32))
  with pytest.raises(ValueError, match=r"needs 6 cache positions; "
                     r"max_len=4"):
    decode.generate(model, prompt, max_new_tokens=5, max_len=4)


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
    runs = jax.jit(lambda tokens: [forward_and_decoded(m, tokens, PROMPT)
                                   for m in models])(tokens)
  return {attention: {
      "specs": [list(leaf.sharding.spec) + [None] * (
          leaf.ndim - len(leaf.sharding.spec))
                for leaf in jax.tree.leaves(cache.layers[0])],
      "diff": float(jnp.abs(decoded - full).max())}
          for attention, (full, decoded, cache) in zip(specs, runs)}


def test_the_cache_is_sharded_like_the_activations():
  code = (f"import sys; sys.path.insert(0, {ROOT!r}); import json; "
          "from tests import test_decode as t; "
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
