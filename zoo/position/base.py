"""The positional-encoding contract.

A positional encoding is an `nnx.Module` built by the model as

    registry.build("position", spec, embed_dim=D, num_heads=H, seq_len=T,
                   causal=..., rngs=rngs, param_dtype=...)

(spec arguments have defaults; the keyword arguments above are context, and a
part takes the ones it needs). Its `kind` says how it enters the model:

- "none":     nothing (attention is then permutation-equivariant);
- "absolute": `embed(x_BxTxD, offset, max_len)` adds a vector per position to
              the embeddings (positions offset.. of a sequence of at most
              max_len; decoding passes a traced offset);
- "rotary":   `rotate(x_BxTxHxK, positions_T)` rotates queries and keys;
- "bias":     `bias()` returns a callable (q_pos_T, k_pos_S) -> HxTxS of
              additive logits that the attention op evaluates per block.
The base class is the identity for each, so a model calls all three.
"""

from typing import ClassVar, Optional

from flax import nnx

from zoo.attention.base import Bias

# Init std of token embeddings and of learned position vectors: both enter the
# residual stream at one scale (unit variance per coordinate, the scale the
# fixed sinusoidal table has too: its entries have RMS 1/sqrt(2)).
EMBED_STD = 1.0


class Position(nnx.Module):
  """Base: no position information."""

  kind: ClassVar[str] = "none"

  def embed(self, x_BxTxD, offset=0, max_len: Optional[int] = None):
    del offset, max_len
    return x_BxTxD

  def rotate(self, x_BxTxHxK, positions_T):
    del positions_T
    return x_BxTxHxK

  def bias(self) -> Optional[Bias]:
    return None

  def max_length(self) -> Optional[int]:
    """The most positions this encoding can place (None: any number)."""
    return None
