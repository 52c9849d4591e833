"""The trainer's LM step on one random byte batch, as the throughput
benchmarks (step_throughput, model_throughput) build it: the LM of
`config.model` over a 256-byte vocabulary, the trainer's shardings and
optimizer, and its train step (`train.make_train_step`) under the config's
layout (mesh and logical rules)."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from zoo import layers, plan, registry, sharding, train

VOCAB = 256


@dataclasses.dataclass
class LmStep:
  setup: plan.Setup
  layout: sharding.Layout
  batch: dict  # inputs, targets [B, T] int32 and weights [B, T]

  def context(self) -> sharding.Layout:
    """The layout (mesh and logical rules) that compiling and running
    need, as a context manager."""
    return self.layout

  def compile_step(self, donate: bool):
    """The compiled train step (state, batch) -> (state, metrics); with
    `donate` the state passed in is consumed. Call inside `context()`."""
    s = self.setup
    return jax.jit(train.make_train_step(s.graphdef),
                   donate_argnums=0 if donate else (),
                   out_shardings=(s.state_shardings, None)
                   ).lower(s.abstract_state, self.batch).compile()

  def init_state(self):
    """A fresh sharded train state. Call inside `context()`."""
    s = self.setup
    return jax.jit(lambda: nnx.state(s.create()),
                   out_shardings=s.state_shardings)()


def build(config) -> LmStep:
  t, b = config.data.seq_len, config.batch_size
  model_config = layers.ModelConfig.from_config(config, vocab_size=VOCAB)
  model_cls = registry.get("model", "lm")
  model_fn = lambda: model_cls(model_config, rngs=nnx.Rngs(0))
  planned = plan.Plan(task=None, model_config=model_config,
                      model_fn=model_fn,
                      abstract_model=nnx.eval_shape(model_fn))
  layout = sharding.Layout.from_config(config.mesh)
  s = plan.setup(planned, layout, plan.make_optimizer(config)[0])
  tokens_BxT = jax.random.randint(jax.random.key(0), (b, t + 1), 0, VOCAB)
  batch = {"inputs": tokens_BxT[:, :-1], "targets": tokens_BxT[:, 1:],
           "weights": jnp.ones((b, t), jnp.float32)}
  return LmStep(s, layout, batch)
