"""Decoder LM and encoder classifier: one trunk, attention and positions
chosen by registry spec, every size from one `ModelConfig`.

Batches (numpy or jax arrays):
  lm:         inputs BxT int, targets BxT int, weights BxT float (loss only
              where weight > 0, e.g. MQAR answer positions)
  classifier: inputs BxT int, mask BxT bool (real tokens), label B int

The LM decodes: `init_cache`, then `prefill` (T >= 1 tokens, into an empty
cache or continuing one) and `decode_step` (one token), each layer through
its attention op's own decode state (see zoo/attention/base.py).
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from zoo import registry
from zoo.layers import (REMAT_POLICIES, ModelConfig, TransformerBlock,
                        build_attention_and_position, rms_norm)
from zoo.position.base import EMBED_STD
from zoo.sharding import BATCH, EMBED, LENGTH, VOCAB, constrain, logical

__all__ = ["Cache", "EncoderClassifier", "ModelConfig", "TransformerLM",
           "Trunk", "parameter_counts"]


@struct.dataclass
class Cache:
  """A decoder's decode state: the position of the next token, each
  layer's state (its op's) and the capacity (static). `init_cache` sets
  `index` to the Python int 0, so a prompt prefilled into a cache known to
  be empty runs each op's training form; after a write it is an int32
  array (traced under jit), and a jitted function given an empty cache as
  an argument takes the general path, with the same result."""

  index: Any
  layers: list
  max_len: int = struct.field(pytree_node=False)


class Trunk(nnx.Module):
  """Token embedding, positions, a stack of blocks, final norm."""

  def __init__(self, config: ModelConfig, *, causal: bool, rngs: nnx.Rngs):
    ops, self.position = build_attention_and_position(config, causal=causal,
                                                      rngs=rngs)
    self.embed = nnx.Embed(
        config.vocab_size, config.embed_dim, dtype=config.compute_dtype,
        param_dtype=config.parameter_dtype,
        embedding_init=logical(nnx.initializers.normal(EMBED_STD), VOCAB,
                               EMBED),
        rngs=rngs)
    self.blocks = nnx.List([
        TransformerBlock(config, op, causal=causal, rngs=rngs)
        for op in ops])
    self.norm = rms_norm(config.embed_dim, rngs, config.compute_dtype,
                         config.parameter_dtype)
    self.remat = config.remat

  def __call__(self, tokens_BxT, mask_BxT: Optional[jax.Array] = None):
    with jax.named_scope("embedding"):
      x_BxTxD = self.position.embed(self.embed(tokens_BxT))
    x_BxTxD = constrain(x_BxTxD, (BATCH, LENGTH, EMBED))
    run = lambda block, position, x, mask: block(x, position, mask)
    if self.remat != "none":  # ModelConfig.remat: what the backward keeps
      run = nnx.remat(run, policy=REMAT_POLICIES[self.remat])
    for block in self.blocks:
      x_BxTxD = run(block, self.position, x_BxTxD, mask_BxT)
    with jax.named_scope("norm"):
      return self.norm(x_BxTxD)

  def init_cache(self, batch: int, max_len: int) -> Cache:
    """An empty decode state for `batch` rows of up to `max_len` positions;
    refuses a length the positional encoding cannot place."""
    limit = self.position.max_length()
    if limit is not None and max_len > limit:
      raise ValueError(
          f"decoding max_len={max_len} exceeds the {limit} positions of "
          f"position {type(self.position).registry_name}")
    return Cache(index=0, max_len=max_len,
                 layers=[block.attention.init_state(batch, max_len)
                         for block in self.blocks])

  def decode(self, tokens_BxT, cache: Cache):
    """Hidden states of T new tokens at positions cache.index.. and the
    cache holding them. Refuses (ValueError) to write past the capacity
    when the index is known; under jit the overflowing rows are NaN."""
    t, index = tokens_BxT.shape[1], cache.index
    if not isinstance(index, jax.core.Tracer) and int(index) + t > cache.max_len:
      first, last = int(index), int(index) + t - 1
      where = f"position {first}" if t == 1 else f"positions {first}..{last}"
      raise ValueError(
          f"decoding {where} is past the cache's capacity max_len="
          f"{cache.max_len}; build the cache with a larger max_len")
    x_BxTxD = self.position.embed(self.embed(tokens_BxT), offset=index,
                                  max_len=cache.max_len)
    x_BxTxD = constrain(x_BxTxD, (BATCH, LENGTH, EMBED))
    layers = []
    for block, state in zip(self.blocks, cache.layers):
      x_BxTxD, state = block.decode(x_BxTxD, self.position, state, index)
      layers.append(state)
    room_T = index + jnp.arange(t) < cache.max_len
    h_BxTxD = jnp.where(room_T[None, :, None], self.norm(x_BxTxD), jnp.nan)
    return h_BxTxD, Cache(index=jnp.asarray(index + t, jnp.int32),
                          layers=layers, max_len=cache.max_len)


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

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.trunk = Trunk(config, causal=True, rngs=rngs)
    self.head = nnx.Linear(
        config.embed_dim, config.vocab_size, use_bias=False,
        dtype=config.compute_dtype, param_dtype=config.parameter_dtype,
        kernel_init=logical(nnx.initializers.lecun_normal(), EMBED, VOCAB),
        rngs=rngs)

  def __call__(self, tokens_BxT):
    """BxT tokens -> BxTxV logits (fp32)."""
    h_BxTxD = self.trunk(tokens_BxT)
    with jax.named_scope("head"):
      return self.head(h_BxTxD).astype(jnp.float32)

  def init_cache(self, batch: int, max_len: int) -> Cache:
    """An empty decode state (per layer, its attention op's: KV cache, ring
    buffer, recurrent state...) for up to `max_len` positions."""
    return self.trunk.init_cache(batch, max_len)

  def prefill(self, tokens_BxT, cache: Cache):
    """Logits BxTxV (fp32) of T tokens at positions cache.index.., equal to
    the forward pass over everything the cache holds and these tokens, and
    the cache holding them: a prompt, a chunk of one, or the next turn."""
    h_BxTxD, cache = self.trunk.decode(tokens_BxT, cache)
    return self.head(h_BxTxD).astype(jnp.float32), cache

  def decode_step(self, tokens_B, cache: Cache):
    """Logits BxV (fp32) of one more token per row, at position
    cache.index (< max_len), and the cache holding it."""
    h_Bx1xD, cache = self.trunk.decode(tokens_B[:, None], cache)
    return self.head(h_Bx1xD[:, 0]).astype(jnp.float32), cache

  def loss(self, batch):
    """Weighted next-token cross-entropy and accuracy; where the batch
    marks recall hits (`hits`, BxT bool: zoo.data.text.recall_hits), also
    bits per token on the hits and on the rest, and each one's share of
    the weight (`hits_fraction`, `rest_fraction`: what an evaluation over
    many batches weights those metrics by)."""
    logits_BxTxV = self(batch["inputs"])
    with jax.named_scope("loss"):
      weights_BxT = batch["weights"].astype(jnp.float32)
      xent_BxT = optax.softmax_cross_entropy_with_integer_labels(
          logits_BxTxV, batch["targets"])
      correct_BxT = jnp.argmax(logits_BxTxV, -1) == batch["targets"]
      total = jnp.maximum(weights_BxT.sum(), 1.0)
      loss = (xent_BxT * weights_BxT).sum() / total
      metrics = {"loss": loss, "bits_per_token": loss / jnp.log(2.0),
                 "accuracy": (correct_BxT * weights_BxT).sum() / total}
      if "hits" in batch:
        for name, part_BxT in (("hits", batch["hits"]),
                               ("rest", ~batch["hits"])):
          w_BxT = weights_BxT * part_BxT
          metrics[f"bits_per_token_{name}"] = (xent_BxT * w_BxT).sum() / (
              jnp.maximum(w_BxT.sum(), 1.0) * jnp.log(2.0))
          metrics[f"{name}_fraction"] = w_BxT.sum() / total
    return loss, metrics


@registry.register("model", "classifier")
class EncoderClassifier(nnx.Module):
  """Bidirectional encoder, mean-pooled over real tokens, linear head over
  `config.num_classes`."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if config.num_classes < 2:
      raise ValueError(f"the classifier needs num_classes >= 2; got "
                       f"{config.num_classes}")
    self.config = config
    self.trunk = Trunk(config, causal=False, rngs=rngs)
    self.head = nnx.Linear(
        config.embed_dim, config.num_classes, dtype=config.compute_dtype,
        param_dtype=config.parameter_dtype,
        kernel_init=logical(nnx.initializers.lecun_normal(), EMBED, None),
        bias_init=logical(nnx.initializers.zeros, None), rngs=rngs)

  def __call__(self, tokens_BxT, mask_BxT):
    """BxT tokens, BxT bool -> BxC logits (fp32)."""
    h_BxTxD = self.trunk(tokens_BxT, mask_BxT)
    m_BxTx1 = mask_BxT[..., None].astype(h_BxTxD.dtype)
    pooled_BxD = (h_BxTxD * m_BxTx1).sum(1) / jnp.maximum(m_BxTx1.sum(1), 1)
    return self.head(pooled_BxD).astype(jnp.float32)

  def loss(self, batch):
    """Cross-entropy and accuracy, means over the examples weighted by
    `weights` (B; all 1 when the batch has none)."""
    logits_BxC = self(batch["inputs"], batch["mask"])
    weights_B = batch.get("weights", jnp.ones(logits_BxC.shape[:1]))
    weights_B = weights_B.astype(jnp.float32)
    total = jnp.maximum(weights_B.sum(), 1.0)
    xent_B = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxC, batch["label"])
    loss = (xent_B * weights_B).sum() / total
    correct_B = jnp.argmax(logits_BxC, -1) == batch["label"]
    return loss, {"loss": loss,
                  "accuracy": (correct_B * weights_B).sum() / total}
