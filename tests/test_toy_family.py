"""A new attention family is one file and one registry line: a toy recurrent
op defined only here, with its own decode state, registers, trains through
the trainer from a config string, and decodes (prompt, continuation, single
steps) with the forward pass's logits. Nothing under zoo/ knows it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

from zoo import metrics, registry, train
from zoo.attention.base import AttentionOp, group_queries
from zoo.layers import ModelConfig


@struct.dataclass
class DecayState:
  """S = sum over keys so far of decay^(age) k v^T, per kv head."""

  s_BxGxKxK: jax.Array


@dataclasses.dataclass(frozen=True)
class Decay(AttentionOp):
  """o_t = S_t^T q_t with S_t = decay S_{t-1} + k_t v_t^T: causal only, no
  softmax; the parallel form is a decay-weighted causal matrix."""

  decay: float = 0.5
  positions = frozenset({"none", "absolute"})

  def attend(self, q, k, v, *, causal, mask, bias):
    assert causal and mask is None and bias is None
    return self._from(self.init_state(q.shape[0], 0, k.shape[2], k.shape[3],
                                      q.dtype), q, k, v)[0]

  def _from(self, state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK):
    t, g = q_BxTxHxK.shape[1], k_BxTxGxK.shape[2]
    age_TxT = np.arange(t)[:, None] - np.arange(t)[None, :]
    weights_TxT = np.where(age_TxT >= 0, self.decay ** np.maximum(age_TxT, 0),
                           0.0)
    q_BxTxGxRxK = group_queries(q_BxTxHxK, g)
    scores = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxTxGxK) * weights_TxT
    out = jnp.einsum("bgrts,bsgk->btgrk", scores, v_BxTxGxK)
    carried_T = self.decay ** (np.arange(t) + 1.0)
    out += carried_T[None, :, None, None, None] * jnp.einsum(
        "btgrk,bgkv->btgrv", q_BxTxGxRxK, state.s_BxGxKxK)
    s_BxGxKxK = self.decay ** t * state.s_BxGxKxK + jnp.einsum(
        "bsgk,s,bsgv->bgkv", k_BxTxGxK, self.decay ** (t - 1.0 - np.arange(t)),
        v_BxTxGxK)
    return out.reshape(q_BxTxHxK.shape), DecayState(s_BxGxKxK)

  def init_state(self, batch, capacity, kv_heads, head_dim, dtype):
    return DecayState(jnp.zeros((batch, kv_heads, head_dim, head_dim), dtype))

  def state_size(self, length, kv_heads, head_dim):
    return kv_heads * head_dim * head_dim

  def prefill(self, state, q, k, v, *, index, bias):
    return self._from(state, q, k, v)

  def decode_step(self, state, q_BxHxK, k_BxGxK, v_BxGxK, *, index, bias):
    s_BxGxKxK = self.decay * state.s_BxGxKxK + jnp.einsum(
        "bgk,bgv->bgkv", k_BxGxK, v_BxGxK)
    g = k_BxGxK.shape[1]
    b, h, d = q_BxHxK.shape
    out = jnp.einsum("bgrk,bgkv->bgrv", q_BxHxK.reshape(b, g, h // g, d),
                     s_BxGxKxK)
    return out.reshape(b, h, d), DecayState(s_BxGxKxK)


@pytest.fixture
def toy_registered(monkeypatch):
  """Registers the toy family for one test; the registry is restored after."""
  for kind in registry.KINDS:  # every built-in part, loaded first
    registry.names(kind)
  monkeypatch.setattr(registry, "_PARTS", {
      kind: dict(parts) for kind, parts in registry._PARTS.items()})  # noqa: SLF001
  registry.register("attention", "toy_decay")(Decay)


def test_the_toy_family_trains_from_a_config_string(toy_registered,
                                                    tiny_config, tmp_path):
  tiny_config.model.attention = "toy_decay(decay=0.9)"
  tiny_config.model.position = "none"
  tiny_config.num_train_steps = 2
  tiny_config.log_every_steps = tiny_config.eval_every_steps = 2
  train.train_and_evaluate(tiny_config, str(tmp_path))
  rows = metrics.read(str(tmp_path))
  assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["eval_loss"])


def test_the_toy_family_decodes_like_its_forward_pass(toy_registered):
  model = registry.get("model", "lm")(ModelConfig(
      vocab_size=32, seq_len=12, attention="toy_decay(decay=0.7)",
      position="learned", num_layers=2, embed_dim=16, num_heads=4,
      num_kv_heads=2, mlp_dim=32), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 32)
  cache = model.init_cache(2, 12)
  prompt, cache = model.prefill(tokens[:, :5], cache)
  more, cache = model.prefill(tokens[:, 5:9], cache)
  steps = []
  for i in range(9, 12):
    logits, cache = model.decode_step(tokens[:, i], cache)
    steps.append(logits[:, None])
  np.testing.assert_allclose(
      jnp.concatenate([prompt, more, *steps], axis=1), model(tokens),
      atol=2e-5)
  assert jax.tree.leaves(cache.layers[0])[0].shape == (2, 2, 4, 4)
  assert "toy_decay" in registry.names("attention")
