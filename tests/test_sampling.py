"""zoo/sampling.py: the sampler as one compiled loop over the decode steps;
greedy equals recomputing the forward pass; stop tokens, seeds, top-k and
top-p; bad requests refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo import registry
from zoo.layers import ModelConfig
from zoo.sampling import Sampling, _generate, choose, generate

VOCAB = 32


def lm(attention, position, seq_len, seed):
  return registry.get("model", "lm")(ModelConfig(
      vocab_size=VOCAB, seq_len=seq_len, attention=attention,
      position=position, num_layers=2, embed_dim=16, num_heads=4,
      num_kv_heads=2, mlp_dim=32), rngs=nnx.Rngs(seed))


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
  tokens, lengths = generate(model, prompt, max_new_tokens=8,
                                    sampling=Sampling(temperature=0))
  assert lengths.tolist() == [8, 8]
  return prompt, tokens.tolist()


def test_greedy_generation_equals_recomputing_the_forward_pass(model, greedy):
  prompt, tokens = greedy
  assert tokens[0] == greedy_by_recomputing(model, prompt[0].tolist(), 8)


def test_a_stop_token_ends_each_row(model, greedy):
  prompt, free = greedy
  stop = free[0][2]
  tokens, lengths = generate(
      model, prompt, max_new_tokens=8,
      sampling=Sampling(temperature=0, stop_token=stop))
  first = [row.index(stop) + 1 if stop in row else 8 for row in free]
  assert lengths.tolist() == first
  for row, free_row, n in zip(tokens.tolist(), free, first):
    assert row[:n] == free_row[:n]
    assert row[n:] == [stop] * (8 - n)


def test_sampling_follows_its_seed(model):
  prompt = jnp.asarray([[3, 1, 4]])
  hot = Sampling(temperature=2.0)
  a, b, c = (generate(model, prompt, max_new_tokens=12, sampling=hot,
                             seed=s)[0].tolist() for s in (0, 0, 1))
  assert a == b != c


def test_top_k_and_top_p_keep_the_likely_tokens():
  logits_BxV = jnp.log(jnp.asarray([[0.5, 0.3, 0.1, 0.06, 0.04]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  settings = [Sampling(), Sampling(top_k=2),
              Sampling(top_k=1), Sampling(top_p=0.85),
              Sampling(top_p=0.75), Sampling(top_p=1e-6)]
  draws = jax.jit(lambda keys: [jax.vmap(
      lambda key: choose(logits_BxV, key, s)[0])(keys)
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
    return str(jax.make_jaxpr(lambda s, p: _generate(
        graphdef, s, p, jax.random.key(0), max_new_tokens=n,
        max_len=n + 3, sampling=Sampling()))(
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
    Sampling(**kwargs)


def test_bad_generation_requests_are_refused(model):
  prompt = jnp.asarray([[1, 2]])
  with pytest.raises(ValueError, match=r"max_new_tokens=0 must be >= 1"):
    generate(model, prompt, max_new_tokens=0)
  with pytest.raises(ValueError, match=r"stop_token=32 must be below the "
                     r"vocabulary size 32"):
    generate(model, prompt, max_new_tokens=2,
                    sampling=Sampling(stop_token=32))
  with pytest.raises(ValueError, match=r"needs 6 cache positions; "
                     r"max_len=4"):
    generate(model, prompt, max_new_tokens=5, max_len=4)


