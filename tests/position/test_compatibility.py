"""Every registered attention x position pair either trains (a few steps, finite
loss) or is refused naming both parts; relative encodings break the
permutation equivariance of a bidirectional stack."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from zoo import registry
from zoo.models.transformer import ModelConfig, Trunk

SEQ_LEN, VOCAB = 16, 16

# Spec arguments that keep an op tiny at SEQ_LEN, applied to every op that has
# an argument of that name (so ops registered later are sized too).
SMALL_ARGS = {"window": 4, "block": 4, "block_q": 4, "block_k": 4,
              "chunk": 4, "num_random": 1, "num_features": 8,
              "feature_dim": 4}


def attention_spec(name: str) -> str:
  args = {p.name: SMALL_ARGS[p.name] for p in registry.params("attention", name)
          if p.name in SMALL_ARGS}
  if not args:
    return name
  return f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def lm(attention: str, position: str):
  return registry.get("model", "lm")(ModelConfig(
      vocab_size=VOCAB, seq_len=SEQ_LEN, attention=attention,
      position=position, num_layers=1, embed_dim=16, num_heads=2,
      num_kv_heads=2, mlp_dim=32), rngs=nnx.Rngs(0))


# Compile fast rather than run fast: each program runs three tiny steps.
# (xla_backend_optimization_level=0 would be faster still, but on CPU it
# turned a finite loss into NaN for local attention with a bias.)
FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}


def train_step(graphdef, state, batch):
  models, optimizers = nnx.merge(graphdef, state)

  def loss_fn(model):
    return model.loss(batch)[0]

  losses = []
  for model, optimizer in zip(models, optimizers):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    losses.append(loss)
  return jnp.stack(losses), nnx.state((models, optimizers))


@functools.cache
def train_losses(attention: str) -> dict[str, np.ndarray]:
  """Losses of 3 SGD steps of an LM with `attention` and each compatible
  position, trained side by side in one program (at these sizes XLA's cost
  per program dominates)."""
  positions = [p for p in registry.names("position")
               if registry.compatible(attention, p)]
  models = [lm(attention_spec(attention), p) for p in positions]
  optimizers = [nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param)
                for m in models]
  graphdef, state = nnx.split((models, optimizers))
  tokens = jax.random.randint(jax.random.key(1), (2, SEQ_LEN + 1), 0, VOCAB)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": jnp.ones((2, SEQ_LEN))}
  step = jax.jit(train_step).lower(graphdef, state, batch).compile(
      compiler_options=FAST_COMPILE)
  losses = []
  for _ in range(3):
    loss_P, state = step(graphdef, state, batch)
    losses.append(loss_P)
  return dict(zip(positions, np.stack(losses, axis=1)))


# Every op in the full suite; one of each kind (softmax, windowed,
# kernel linear) in the fast tier.
FAST_ATTENTION = ("standard", "local", "linear")


@pytest.mark.parametrize("position", registry.names("position"))
@pytest.mark.parametrize("attention", [
    a if a in FAST_ATTENTION else pytest.param(a, marks=pytest.mark.slow)
    for a in registry.names("attention")])
def test_pair_trains_or_is_refused(attention, position):
  spec = attention_spec(attention)
  if registry.compatible(attention, position):
    losses = train_losses(attention)[position]
    assert np.isfinite(losses).all(), (spec, position, losses)
  else:
    with pytest.raises(ValueError, match=rf"attention {re.escape(repr(spec))} "
                       rf"cannot take position '{position}'"):
      lm(spec, position)


def test_linear_attention_refuses_a_bias():
  with pytest.raises(ValueError, match=r"attention 'linear' cannot take "
                     r"position 'alibi' \(a bias encoding\); with this "
                     r"attention use one of: learned, none, sinusoidal"):
    lm("linear", "alibi")


def test_rotary_is_refused_by_elu_and_taken_by_favor():
  """elu(Rq) + 1 of rotated vectors makes scores depend on absolute
  position, so elu features refuse rope; FAVOR+ estimates the rotated
  softmax kernel and takes it."""
  with pytest.raises(ValueError, match=r"attention 'linear' cannot take "
                     r"position 'rope' \(a rotary encoding\)"):
    lm("linear", "rope")
  model = lm("linear(feature='favor', num_features=8, chunk=4)", "rope")
  tokens = jnp.zeros((1, SEQ_LEN), jnp.int32)
  assert np.isfinite(np.asarray(model(tokens))).all()


@pytest.mark.parametrize("position", ["rope", "alibi", "t5",
                                      "t5(bidirectional=True)"])
def test_relative_positions_break_permutation_equivariance(position):
  model = Trunk(ModelConfig(vocab_size=VOCAB, seq_len=SEQ_LEN,
                            attention="standard", position=position,
                            num_layers=2, embed_dim=16, num_heads=2,
                            num_kv_heads=2, mlp_dim=32, dtype="float32",
                            param_dtype="float32"),
                causal=False, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, SEQ_LEN), 0, VOCAB)
  perm = np.random.default_rng(0).permutation(SEQ_LEN)
  diff = jnp.abs(model(tokens[:, perm]) - model(tokens)[:, perm]).max()
  assert diff > 1e-2
