"""Shared layers: projection init follows each kernel's true fan-in; the
model config refuses bad sizes; an op that redraws reads the training step
the train step sets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from zoo import registry, train
from zoo.layers import (ModelConfig, MultiHeadAttention, TrainingStep,
                        set_training_step)

D = 256


@pytest.mark.parametrize("heads", [1, 4, 16])
@pytest.mark.parametrize("grouped", [False, True])
def test_projection_init_has_fan_in_of_its_input(heads, grouped):
  """q, k, v (DxHxK) start with std 1/sqrt(D) whatever the head counts, the
  output projection (HxKxD) with 1/sqrt(H*K): the variance of an
  activation then does not depend on H or on grouped-query attention."""
  kv_heads = 1 if grouped else heads
  layer = MultiHeadAttention(
      embed_dim=D, num_heads=heads, num_kv_heads=kv_heads,
      op=registry.build("attention", "standard"), causal=True,
      rngs=nnx.Rngs(0))
  head_dim = D // heads
  for name, fan_in in (("query", D), ("key", D), ("value", D),
                       ("out", heads * head_dim)):
    std = float(np.std(np.asarray(getattr(layer, name).kernel[...])))
    assert abs(std * np.sqrt(fan_in) - 1) < 0.1, (name, std, fan_in)


@pytest.mark.parametrize("kwargs,message", [
    ({"num_layers": 0}, r"^model.num_layers=0 must be >= 1$"),
    ({"dtype": "float16"}, r"^model.dtype='float16'; valid: float32, "
     r"bfloat16$"),
    ({"embed_dim": 30}, r"^model.embed_dim=30 must be divisible by "
     r"model.num_heads=4$"),
    ({"num_kv_heads": 3}, r"^model.num_heads=4 must be divisible by "
     r"model.num_kv_heads=3$"),
])
def test_model_config_refuses_bad_sizes(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(vocab_size=8, seq_len=8, **kwargs)


def test_redraws_follow_the_step_the_train_step_sets():
  """FAVOR+ with redraw_every=2: the layer holds a TrainingStep (others
  hold none); steps 0 and 1 share a draw, step 2 draws anew; one train
  step leaves the state at the optimizer's new step, which evaluation and
  a restored model then use."""
  config = ModelConfig(
      vocab_size=16, seq_len=8, num_layers=1, embed_dim=16, num_heads=2,
      num_kv_heads=2, mlp_dim=16,
      attention="linear(feature='favor', num_features=8, redraw_every=2)")
  model = registry.get("model", "lm")(config, rngs=nnx.Rngs(0))
  plain = registry.get("model", "lm")(
      ModelConfig(vocab_size=16, seq_len=8), rngs=nnx.Rngs(0))
  assert not jax.tree.leaves(nnx.state(plain, TrainingStep))
  tokens = jnp.arange(8)[None] % 16
  at = {}
  for step in (0, 1, 2):
    set_training_step(model, step)
    at[step] = np.asarray(model(tokens))
  np.testing.assert_array_equal(at[0], at[1])
  assert np.abs(at[2] - at[0]).max() > 1e-3
  set_training_step(model, 0)
  optimizer = nnx.Optimizer(model, optax.sgd(0.0), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  batch = {"inputs": tokens, "targets": tokens, "weights": jnp.ones((1, 8))}
  state, _ = jax.jit(train.make_train_step(graphdef))(state, batch)
  trained, _ = nnx.merge(graphdef, state)
  assert [int(x) for x in jax.tree.leaves(
      nnx.state(trained, TrainingStep))] == [1]
