"""Decoder LM and encoder classifier: one trunk, attention and positions
chosen by registry spec.

Batches (numpy or jax arrays):
  lm:         inputs BxT int, targets BxT int, weights BxT float (loss only
              where weight > 0, e.g. MQAR answer positions)
  classifier: inputs BxT int, mask BxT bool (real tokens), label B int
"""

from typing import Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from zoo import decode, registry
from zoo.layers import TransformerBlock, build_attention_and_position, rms_norm
from zoo.position.base import EMBED_STD
from zoo.sharding import constrain, logical


class Trunk(nnx.Module):
  """Token embedding, positions, a stack of blocks, final norm."""

  def __init__(self, *, vocab_size: int, seq_len: int, causal: bool,
               attention: str, position: str, num_layers: int, embed_dim: int,
               num_heads: int, num_kv_heads: int, mlp_dim: int,
               rngs: nnx.Rngs, dtype, param_dtype):
    op, self.position = build_attention_and_position(
        attention, position, embed_dim=embed_dim, num_heads=num_heads,
        seq_len=seq_len, causal=causal, rngs=rngs, param_dtype=param_dtype)
    self.embed = nnx.Embed(
        vocab_size, embed_dim, dtype=dtype, param_dtype=param_dtype,
        embedding_init=logical(nnx.initializers.normal(EMBED_STD), "vocab",
                               "embed"),
        rngs=rngs)
    self.blocks = nnx.List([
        TransformerBlock(embed_dim=embed_dim, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, mlp_dim=mlp_dim,
                         op=op.for_layer(i), causal=causal, rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype)
        for i in range(num_layers)])
    self.norm = rms_norm(embed_dim, rngs, dtype, param_dtype)

  def __call__(self, tokens_BxT, mask_BxT: Optional[jax.Array] = None,
               step: Optional[jax.Array] = None):
    with jax.named_scope("embedding"):
      x_BxTxD = self.position.embed(self.embed(tokens_BxT))
    x_BxTxD = constrain(x_BxTxD, ("batch", "length", "embed"))
    for block in self.blocks:
      x_BxTxD = block(x_BxTxD, self.position, mask_BxT, step)
    with jax.named_scope("norm"):
      return self.norm(x_BxTxD)

  def init_cache(self, batch: int, max_len: int) -> decode.Cache:
    """An empty decode state for `batch` rows of up to `max_len` positions;
    refuses a length the positional encoding cannot place."""
    limit = self.position.max_length()
    if limit is not None and max_len > limit:
      raise ValueError(
          f"decoding max_len={max_len} exceeds the {limit} positions of "
          f"position {type(self.position).registry_name}")
    return decode.Cache(
        index=jnp.zeros((), jnp.int32), max_len=max_len,
        layers=[block.attention.init_state(batch, max_len)
                for block in self.blocks])

  def decode(self, tokens_BxT, cache: decode.Cache,
             step: Optional[jax.Array] = None):
    """Hidden states of T new tokens at positions cache.index.. (T > 1 only
    into an empty cache) and the cache holding them."""
    x_BxTxD = self.position.embed(self.embed(tokens_BxT), offset=cache.index,
                                  max_len=cache.max_len)
    x_BxTxD = constrain(x_BxTxD, ("batch", "length", "embed"))
    layers = []
    for block, state in zip(self.blocks, cache.layers):
      x_BxTxD, state = block.decode(x_BxTxD, self.position, state,
                                    cache.index, step)
      layers.append(state)
    return self.norm(x_BxTxD), decode.Cache(
        index=cache.index + tokens_BxT.shape[1], layers=layers,
        max_len=cache.max_len)


def parameter_counts(model) -> dict[str, int]:
  """Parameters of an LM or classifier (built, or abstract from
  nnx.eval_shape): `total`, and `non_embedding`, Kaplan et al.'s N for
  scaling laws: the blocks and the final norm, leaving out the token
  embedding, the positions and the output head."""
  count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  return {"total": count(model),
          "non_embedding": count(model.trunk.blocks) + count(model.trunk.norm)}


@registry.register("model", "lm")
class TransformerLM(nnx.Module):
  """Decoder-only causal language model with an untied output head."""

  def __init__(self, *, vocab_size: int, seq_len: int, attention: str,
               position: str, num_layers: int, embed_dim: int, num_heads: int,
               num_kv_heads: int, mlp_dim: int, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.trunk = Trunk(
        vocab_size=vocab_size, seq_len=seq_len, causal=True,
        attention=attention, position=position, num_layers=num_layers,
        embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
        mlp_dim=mlp_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.head = nnx.Linear(embed_dim, vocab_size, use_bias=False, dtype=dtype,
                           param_dtype=param_dtype,
                           kernel_init=logical(nnx.initializers.lecun_normal(),
                                               "embed", "vocab"), rngs=rngs)

  def __call__(self, tokens_BxT, step: Optional[jax.Array] = None):
    """BxT tokens -> BxTxV logits (fp32); `step` is the training step (for
    attention that redraws random features)."""
    h_BxTxD = self.trunk(tokens_BxT, step=step)
    with jax.named_scope("head"):
      return self.head(h_BxTxD).astype(jnp.float32)

  def init_cache(self, batch: int, max_len: int) -> decode.Cache:
    """An empty decode state (per layer: KV cache, ring buffer or recurrent
    state, by attention family; see zoo/decode.py) for up to `max_len`
    positions."""
    return self.trunk.init_cache(batch, max_len)

  def prefill(self, tokens_BxT, cache: decode.Cache,
              step: Optional[jax.Array] = None):
    """Logits BxTxV (fp32) of a prompt, as the forward pass gives them, and
    `cache` (empty, from init_cache) holding it."""
    h_BxTxD, cache = self.trunk.decode(tokens_BxT, cache, step)
    return self.head(h_BxTxD).astype(jnp.float32), cache

  def decode_step(self, tokens_B, cache: decode.Cache,
                  step: Optional[jax.Array] = None):
    """Logits BxV (fp32) of one more token per row, at position
    cache.index (< max_len), and the cache holding it."""
    h_Bx1xD, cache = self.trunk.decode(tokens_B[:, None], cache, step)
    return self.head(h_Bx1xD[:, 0]).astype(jnp.float32), cache

  def loss(self, batch, step: Optional[jax.Array] = None):
    """Weighted next-token cross-entropy and accuracy."""
    logits_BxTxV = self(batch["inputs"], step)
    with jax.named_scope("loss"):
      weights_BxT = batch["weights"].astype(jnp.float32)
      xent_BxT = optax.softmax_cross_entropy_with_integer_labels(
          logits_BxTxV, batch["targets"])
      correct_BxT = jnp.argmax(logits_BxTxV, -1) == batch["targets"]
      total = jnp.maximum(weights_BxT.sum(), 1.0)
      loss = (xent_BxT * weights_BxT).sum() / total
    return loss, {"loss": loss, "bits_per_token": loss / jnp.log(2.0),
                  "accuracy": (correct_BxT * weights_BxT).sum() / total}


@registry.register("model", "classifier")
class EncoderClassifier(nnx.Module):
  """Bidirectional encoder, mean-pooled over real tokens, linear head."""

  def __init__(self, *, vocab_size: int, num_classes: int, seq_len: int,
               attention: str, position: str, num_layers: int, embed_dim: int,
               num_heads: int, num_kv_heads: int, mlp_dim: int,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.trunk = Trunk(
        vocab_size=vocab_size, seq_len=seq_len, causal=False,
        attention=attention, position=position, num_layers=num_layers,
        embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
        mlp_dim=mlp_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.head = nnx.Linear(embed_dim, num_classes, dtype=dtype,
                           param_dtype=param_dtype,
                           kernel_init=logical(nnx.initializers.lecun_normal(),
                                               "embed", None),
                           bias_init=logical(nnx.initializers.zeros, None),
                           rngs=rngs)

  def __call__(self, tokens_BxT, mask_BxT, step: Optional[jax.Array] = None):
    """BxT tokens, BxT bool -> BxC logits (fp32)."""
    h_BxTxD = self.trunk(tokens_BxT, mask_BxT, step)
    m_BxTx1 = mask_BxT[..., None].astype(h_BxTxD.dtype)
    pooled_BxD = (h_BxTxD * m_BxTx1).sum(1) / jnp.maximum(m_BxTx1.sum(1), 1)
    return self.head(pooled_BxD).astype(jnp.float32)

  def loss(self, batch, step: Optional[jax.Array] = None):
    logits_BxC = self(batch["inputs"], batch["mask"], step)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxC, batch["label"]).mean()
    accuracy = (jnp.argmax(logits_BxC, -1) == batch["label"]).mean()
    return loss, {"loss": loss, "accuracy": accuracy}
