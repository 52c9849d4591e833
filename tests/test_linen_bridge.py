"""zoo from flax.linen: the whole LM wrapped by `nnx.bridge.to_linen` inside a
linen module, and a zoo attention op called in a linen attention layer; both
train a few steps (the WORKSPACE recipe)."""

import flax.linen as nn
import jax
import optax
import pytest
from flax import nnx

from zoo import registry
from zoo.models.transformer import ModelConfig, TransformerLM

VOCAB, SEQ_LEN = 32, 16


class BridgedLM(nn.Module):
  """A linen model whose body is the zoo decoder LM (an NNX module)."""

  attention: str

  @nn.compact
  def __call__(self, tokens_BxT):
    lm = nnx.bridge.to_linen(TransformerLM, ModelConfig(
        vocab_size=VOCAB, seq_len=SEQ_LEN, attention=self.attention,
        position="rope", num_layers=1, embed_dim=16, num_heads=2,
        num_kv_heads=1, mlp_dim=32))
    return lm(tokens_BxT)


class ZooSelfAttention(nn.Module):
  """Someone else's linen attention layer with a zoo op inside: the op is a
  plain function of q, k, v, so no bridge is needed."""

  num_heads: int
  attention: str

  @nn.compact
  def __call__(self, x_BxTxD):
    d = x_BxTxD.shape[-1]
    op = registry.build("attention", self.attention)
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (
        nn.DenseGeneral((self.num_heads, d // self.num_heads), name=name)(
            x_BxTxD) for name in ("query", "key", "value"))
    out_BxTxHxK = op(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, causal=True)
    return nn.DenseGeneral(d, axis=(-2, -1), name="out")(out_BxTxHxK)


class LinenLM(nn.Module):
  attention: str

  @nn.compact
  def __call__(self, tokens_BxT):
    x_BxTxD = nn.Embed(VOCAB, 16)(tokens_BxT)
    x_BxTxD = x_BxTxD + ZooSelfAttention(2, self.attention)(
        nn.LayerNorm()(x_BxTxD))
    return nn.Dense(VOCAB)(nn.LayerNorm()(x_BxTxD))


def train_losses(model, steps=6):
  """Losses of `steps` Adam steps on a fixed batch of next-token data."""
  tokens = jax.random.randint(jax.random.key(0), (8, SEQ_LEN + 1), 0, VOCAB)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  variables = jax.jit(model.init)(jax.random.key(1), inputs)
  params = nn.meta.unbox(variables)["params"]
  tx = optax.adam(1e-2)

  def loss_fn(params):
    logits = model.apply({"params": params}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           targets).mean()

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses = tx.init(params), []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  return variables, losses


@pytest.mark.slow
def test_the_zoo_lm_trains_inside_a_linen_module():
  variables, losses = train_losses(BridgedLM("local(window=4)"))
  assert losses[-1] < losses[0] - 0.3
  # The logical axes travel with the parameters, for linen's sharding rules.
  specs = nn.get_partition_spec(variables)["params"]["ToLinen_0"]
  assert tuple(specs["head"]["kernel"]) == ("embed", "vocab")
  assert tuple(specs["trunk"]["blocks"][0]["attention"]["key"]["kernel"]) == (
      "embed", "heads", "kv")


def test_a_zoo_attention_op_trains_in_a_linen_layer():
  _, losses = train_losses(LinenLM("bigbird(block=4, num_random=1)"))
  assert losses[-1] < losses[0] - 0.3
