"""Dense softmax attention: the einsum reference and the fused XLA path."""

import dataclasses

import jax
import jax.numpy as jnp

from zoo import registry
from zoo.attention.base import AttentionOp, positions_qk


def dense_mask(q, k, *, causal, mask):
  """BxTxS boolean of allowed (query, key) pairs, or None for all."""
  t, s = q.shape[1], k.shape[1]
  allowed = None
  if causal:
    q_pos, k_pos = positions_qk(t, s)
    allowed = (q_pos[:, None] >= k_pos[None, :])[None]
  if mask is not None:
    m = mask[:, None, :] if mask.ndim == 2 else mask
    allowed = m if allowed is None else allowed & m
  return allowed


@registry.register("attention", "standard")
@dataclasses.dataclass(frozen=True)
class Standard(AttentionOp):
  """Dense softmax attention written as einsums: the reference every op is
  checked against. Memory grows as length squared."""

  full_mask = True

  def attend(self, q, k, v, *, causal, mask, bias):
    b, t, h, d = q.shape
    # Each kv head repeated to its query heads, so the scores are one
    # batched matmul over (batch, head), which XLA:CPU runs better than a
    # grouped 5-D einsum; the scale goes on q, T x K multiplies instead of
    # T x S.
    r = h // k.shape[2]
    k_BxSxHxK = jnp.repeat(k, r, axis=2).astype(jnp.float32)
    v_BxSxHxK = jnp.repeat(v, r, axis=2).astype(jnp.float32)
    q_BxTxHxK = q.astype(jnp.float32) / jnp.sqrt(jnp.float32(d))
    logits_BxHxTxS = jnp.einsum("bthd,bshd->bhts", q_BxTxHxK, k_BxSxHxK)
    if bias is not None:
      q_pos, k_pos = positions_qk(t, k.shape[1])
      logits_BxHxTxS += bias(q_pos, k_pos).astype(jnp.float32)[None]
    allowed_BxTxS = dense_mask(q, k, causal=causal, mask=mask)
    if allowed_BxTxS is not None:
      allowed_Bx1xTxS = allowed_BxTxS[:, None]
      logits_BxHxTxS = jnp.where(allowed_Bx1xTxS, logits_BxHxTxS, -jnp.inf)
    weights_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1)
    if mask is not None or t > k.shape[1]:
      # A query whose every key is masked has NaN weights: make them 0.
      # (Under a causal mask alone, with as many keys as queries or more,
      # every query sees at least one key.)
      weights_BxHxTxS = jnp.where(allowed_Bx1xTxS, weights_BxHxTxS, 0.0)
    out_BxTxHxK = jnp.einsum("bhts,bshd->bthd", weights_BxHxTxS, v_BxSxHxK)
    return out_BxTxHxK.astype(q.dtype)


@registry.register("attention", "xla")
@dataclasses.dataclass(frozen=True)
class Xla(AttentionOp):
  """`jax.nn.dot_product_attention`: XLA's fused attention, cuDNN flash
  attention on GPU when `implementation='cudnn'` (fp16/bf16 inputs)."""

  implementation: str | None = None
  full_mask = True

  def __post_init__(self):
    if self.implementation not in (None, "xla", "cudnn"):
      raise ValueError(
          f"attention xla(implementation=...) must be None, 'xla' or 'cudnn'; "
          f"got {self.implementation!r}")

  def attend(self, q, k, v, *, causal, mask, bias):
    t, s = q.shape[1], k.shape[1]
    bias_1xHxTxS = None
    if bias is not None:
      bias_1xHxTxS = bias(*positions_qk(t, s))[None].astype(jnp.float32)
    # jax's is_causal aligns the triangle at the top-left; ours aligns at the
    # end, so unequal lengths go through the explicit mask.
    fused_causal = causal and t == s
    allowed_BxTxS = dense_mask(q, k, causal=causal and not fused_causal,
                               mask=mask)
    mask_Bx1xTxS = None if allowed_BxTxS is None else allowed_BxTxS[:, None]
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias_1xHxTxS, mask=mask_Bx1xTxS, is_causal=fused_causal,
        implementation=self.implementation)
    if allowed_BxTxS is not None:
      has_key_BxTx1x1 = jnp.any(allowed_BxTxS, axis=-1)[:, :, None, None]
      out = jnp.where(has_key_BxTx1x1, out, 0)
    return out.astype(q.dtype)
