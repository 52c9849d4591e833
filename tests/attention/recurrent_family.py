"""Shared by the gated recurrence family tests: a small LM with the family,
its decoding against its forward pass, one training step, the listing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zoo import registry
from zoo.layers import ModelConfig

SEQ_LEN, VOCAB = 16, 32
# A prompt of 5, a continuation of 4 into the filled state, 3 single steps,
# then a second turn of 4.
PIECES = (5, 4, 1, 1, 1, 4)
# Compile fast rather than run fast (as tests/models/test_decoding.py).
FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}


def lm(attention: str, position: str = "none", num_layers: int = 2):
  """4 heads over 2 kv heads of dim 4."""
  return registry.get("model", "lm")(ModelConfig(
      vocab_size=VOCAB, seq_len=SEQ_LEN, attention=attention,
      position=position, num_layers=num_layers, embed_dim=16, num_heads=4,
      num_kv_heads=2, mlp_dim=32), rngs=nnx.Rngs(0))


def decoding_error(attention: str, position: str = "none") -> tuple:
  """(max |decoded - forward|, max |forward|) of logits over SEQ_LEN
  tokens fed in PIECES (prefill, continuation, single steps), one program."""
  model = lm(attention, position)
  tokens = jax.random.randint(jax.random.key(1), (2, SEQ_LEN), 0, VOCAB)

  def run(tokens):
    cache = model.init_cache(2, SEQ_LEN)
    logits, start = [], 0
    for n in PIECES:
      if n == 1:
        step, cache = model.decode_step(tokens[:, start], cache)
        logits.append(step[:, None])
      else:
        piece, cache = model.prefill(tokens[:, start:start + n], cache)
        logits.append(piece)
      start += n
    full = model(tokens)
    return jnp.abs(jnp.concatenate(logits, 1) - full).max(), jnp.abs(
        full).max()

  assert sum(PIECES) == SEQ_LEN
  compiled = jax.jit(run).lower(tokens).compile(compiler_options=FAST_COMPILE)
  return tuple(float(x) for x in compiled(tokens))


def train_step_losses(attention: str, steps: int = 2) -> np.ndarray:
  """Losses of `steps` SGD steps of a small LM with `attention`."""
  model = lm(attention)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(2), (2, SEQ_LEN + 1), 0, VOCAB)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": jnp.ones((2, SEQ_LEN))}

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: m.loss(batch)[0])(model)
    optimizer.update(model, grads)
    return loss

  return np.array([step(model, optimizer) for _ in range(steps)])


def listing(capsys) -> str:
  """What `python -m zoo.registry` prints."""
  registry.main([])
  return capsys.readouterr().out


def part_and_inputs(spec: str, seed: int = 0, b=2, t=6, d=16, h=4, g=2, k=4):
  """`spec`'s layer part (built as a layer of width d with h query and g kv
  heads of dim k would build it) and random x, q, k, v for it."""
  op = registry.build("attention", spec)
  part = op.layer_part(embed_dim=d, num_heads=h, num_kv_heads=g, head_dim=k,
                       rngs=nnx.Rngs(seed), dtype=np.float32,
                       param_dtype=np.float32)
  rng = np.random.default_rng(seed)
  return part, [rng.standard_normal(shape).astype(np.float32) for shape in
                ((b, t, d), (b, t, h, k), (b, t, g, k), (b, t, g, k))]
