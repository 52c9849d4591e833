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

from zoo import registry
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
    x_BxTxD = self.position.embed(self.embed(tokens_BxT))
    x_BxTxD = constrain(x_BxTxD, ("batch", "length", "embed"))
    for block in self.blocks:
      x_BxTxD = block(x_BxTxD, self.position, mask_BxT, step)
    return self.norm(x_BxTxD)


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
    return self.head(self.trunk(tokens_BxT, step=step)).astype(jnp.float32)

  def loss(self, batch, step: Optional[jax.Array] = None):
    """Weighted next-token cross-entropy and accuracy."""
    logits_BxTxV = self(batch["inputs"], step)
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
