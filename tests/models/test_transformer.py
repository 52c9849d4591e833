"""Model properties: shapes, the permutation equivariance of attention without
positions (and its loss with them), causality of the LM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo import registry
from zoo.models.transformer import ModelConfig, Trunk, parameter_counts


def trunk(position, causal=False, attention="standard"):
  return Trunk(ModelConfig(vocab_size=50, seq_len=12, attention=attention,
                           position=position, num_layers=2, embed_dim=32,
                           num_heads=4, num_kv_heads=2, mlp_dim=64,
                           dtype="float32", param_dtype="float32"),
               causal=causal, rngs=nnx.Rngs(0))


TOKENS = jax.random.randint(jax.random.key(0), (2, 12), 0, 50)
PERM = np.random.default_rng(0).permutation(12)


@pytest.mark.parametrize("attention", ["standard", "xla"])
def test_no_position_is_permutation_equivariant(attention):
  model = trunk("none", attention=attention)
  np.testing.assert_allclose(model(TOKENS[:, PERM]), model(TOKENS)[:, PERM],
                             atol=1e-5)


@pytest.mark.parametrize("position", ["sinusoidal", "learned"])
def test_absolute_position_breaks_equivariance(position):
  model = trunk(position)
  if position == "learned":  # a zero-initialised table would hide positions
    model.position.table[...] = jax.random.normal(jax.random.key(1),
                                                  model.position.table.shape)
  diff = jnp.abs(model(TOKENS[:, PERM]) - model(TOKENS)[:, PERM]).max()
  assert diff > 1e-2


def test_lm_is_causal():
  model = registry.get("model", "lm")(ModelConfig(
      vocab_size=50, seq_len=12, attention="xla", position="learned",
      num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=1, mlp_dim=64),
      rngs=nnx.Rngs(0))
  changed = TOKENS.at[:, 7:].set(3)
  np.testing.assert_allclose(model(changed)[:, :7], model(TOKENS)[:, :7],
                             atol=1e-5)
  assert jnp.abs(model(changed)[:, 7:] - model(TOKENS)[:, 7:]).max() > 1e-3


def test_classifier_ignores_padding():
  model = registry.get("model", "classifier")(ModelConfig(
      vocab_size=50, num_classes=3, seq_len=12, attention="standard",
      position="sinusoidal", num_layers=1, embed_dim=32, num_heads=4,
      num_kv_heads=4, mlp_dim=64), rngs=nnx.Rngs(0))
  mask = jnp.arange(12)[None, :] < jnp.array([[12], [8]])
  other = TOKENS.at[1, 8:].set(7)
  np.testing.assert_allclose(model(other, mask)[1], model(TOKENS, mask)[1],
                             atol=1e-5)
  assert model(TOKENS, mask).shape == (2, 3)


@pytest.mark.slow
def test_dtype_and_param_dtype_are_honoured():
  model = Trunk(ModelConfig(vocab_size=50, seq_len=12, attention="standard",
                            position="learned", num_layers=1, embed_dim=32,
                            num_heads=4, num_kv_heads=4, mlp_dim=64,
                            dtype="bfloat16", param_dtype="bfloat16"),
                causal=True, rngs=nnx.Rngs(0))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.bfloat16 for p in params)
  assert model(TOKENS).dtype == jnp.bfloat16


def test_parameters_carry_logical_axes():
  model = trunk("learned")
  kernel = model.blocks[0].attention.query.kernel
  assert kernel.get_metadata()["out_sharding"] == ("embed", "heads", "kv")
  assert model.blocks[0].mlp.up.kernel.get_metadata()["out_sharding"] == (
      "embed", "mlp")


def test_bad_head_counts_are_refused():
  with pytest.raises(ValueError, match="embed_dim=30 must be divisible by "
                     "model.num_heads=4"):
    Trunk(ModelConfig(vocab_size=50, seq_len=12, attention="standard",
                      position="none", num_layers=1, embed_dim=30,
                      num_heads=4, num_kv_heads=4, mlp_dim=64,
                      dtype="float32", param_dtype="float32"),
          causal=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_heads=4 must be divisible by "
                     "model.num_kv_heads=3"):
    config_args = dict(vocab_size=50, seq_len=12, attention="standard",
                       position="none", num_layers=1, embed_dim=32,
                       num_heads=4, num_kv_heads=3, mlp_dim=64,
                       dtype="float32", param_dtype="float32")
    Trunk(ModelConfig(**config_args), causal=True, rngs=nnx.Rngs(0))


def test_learned_table_shorter_than_sequence_is_refused():
  with pytest.raises(ValueError, match=r"learned\(max_len=8\) is shorter"):
    Trunk(ModelConfig(vocab_size=50, seq_len=12, attention="standard",
                      position="learned(max_len=8)", num_layers=1,
                      embed_dim=32, num_heads=4, num_kv_heads=4, mlp_dim=64,
                      dtype="float32", param_dtype="float32"),
          causal=True, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_learned_positions_start_at_the_token_embeddings_scale():
  model = registry.get("model", "lm")(ModelConfig(
      vocab_size=512, seq_len=256, attention="standard", position="learned",
      num_layers=1, embed_dim=64, num_heads=4, num_kv_heads=4, mlp_dim=64),
      rngs=nnx.Rngs(0))
  tokens = float(np.std(np.asarray(model.trunk.embed.embedding[...])))
  positions = float(np.std(np.asarray(model.trunk.position.table[...])))
  assert abs(positions / tokens - 1) < 0.1, (positions, tokens)


def test_parameter_counts_by_hand():
  """D=32, H=4 heads of K=8, G=2 kv heads, MLP F=48, 2 layers, vocabulary
  50, learned positions over 12: per layer q D*H*K, k and v D*G*K each, out
  H*K*D, MLP 2*D*F, two norms 2*D; a final norm D; embedding, head and
  positions V*D, D*V and 12*D."""
  d, h, g, k, f, v, t = 32, 4, 2, 8, 48, 50, 12
  block = d * h * k + 2 * d * g * k + h * k * d + 2 * d * f + 2 * d
  model = nnx.eval_shape(lambda: registry.get("model", "lm")(ModelConfig(
      vocab_size=v, seq_len=t, attention="standard", position="learned",
      num_layers=2, embed_dim=d, num_heads=h, num_kv_heads=g, mlp_dim=f),
      rngs=nnx.Rngs(0)))
  counts = parameter_counts(model)
  assert counts["non_embedding"] == 2 * block + d
  assert counts["total"] == 2 * block + d + 2 * v * d + t * d


def test_each_layer_draws_its_own_random_structure():
  model = registry.get("model", "lm")(ModelConfig(
      vocab_size=16, seq_len=16, attention="bigbird(block=2)",
      position="none", num_layers=2, embed_dim=16, num_heads=2,
      num_kv_heads=2, mlp_dim=16), rngs=nnx.Rngs(0))
  ops = [block.attention.op for block in model.trunk.blocks]
  assert [op.layer for op in ops] == [0, 1]
  assert (ops[0].block_layout(8, True, 2) != ops[1].block_layout(8, True, 2)
          ).any()
