"""Shared building blocks: attention projections and heads, MLP, norms and the
pre-norm transformer block. Every attention family and positional encoding
plugs in here; nothing in this file knows which one it runs.

Shapes: B batch, T length, D embed, H heads, G kv heads, K head dim, F mlp.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from zoo import decode, registry
from zoo.attention.base import AttentionOp
from zoo.position.base import Position
from zoo.sharding import constrain, logical

_init = nnx.initializers.lecun_normal()


def _fan_in_init(in_axis, out_axis):
  """LeCun normal with the fan-in taken over `in_axis` of a multi-axis
  einsum kernel: q, k and v (DxHxK) have fan-in D, the output projection
  (HxKxD) fan-in H*K, whatever the number of heads."""
  return nnx.initializers.lecun_normal(in_axis=in_axis, out_axis=out_axis)


def build_attention_and_position(attention: str, position: str, *,
                                 embed_dim: int, num_heads: int, seq_len: int,
                                 causal: bool, rngs: nnx.Rngs, param_dtype
                                 ) -> tuple[AttentionOp, Position]:
  """Builds both parts from their specs and refuses incompatible pairs
  (before building the position, which may hold parameters). `causal` tells
  direction-aware encodings (T5's buckets) whether the model is a decoder."""
  op = registry.build("attention", attention)
  kind = registry.get("position", registry.parse(position)[0]).kind
  if kind not in op.positions:
    works = [p for p in registry.names("position")
             if registry.get("position", p).kind in op.positions]
    raise ValueError(
        f"attention {attention!r} cannot take position {position!r} (a "
        f"{kind} encoding); with this attention use one of: "
        f"{', '.join(works)}")
  pe = registry.build("position", position, embed_dim=embed_dim,
                      num_heads=num_heads, seq_len=seq_len, causal=causal,
                      rngs=rngs, param_dtype=param_dtype)
  return op, pe


class MultiHeadAttention(nnx.Module):
  """Projections to H query heads and G kv heads (grouped-query when G < H),
  positions applied to q and k, a registered attention op, and the output
  projection."""

  def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int,
               op: AttentionOp, causal: bool, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    if embed_dim % num_heads:
      raise ValueError(f"model.embed_dim={embed_dim} must be divisible by "
                       f"model.num_heads={num_heads}")
    if num_heads % num_kv_heads:
      raise ValueError(f"model.num_heads={num_heads} must be divisible by "
                       f"model.num_kv_heads={num_kv_heads}")
    d, h, g, k = embed_dim, num_heads, num_kv_heads, embed_dim // num_heads
    self.op, self.causal = op, causal
    self.num_kv_heads, self.head_dim, self.dtype = g, k, dtype

    def proj(spec, shape, names, init):
      return nnx.Einsum(spec, shape, kernel_init=logical(init, *names),
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    to_heads = _fan_in_init(0, (1, 2))
    self.query = proj("ND,DHK->NHK", (d, h, k), ("embed", "heads", "kv"),
                      to_heads)
    self.key = proj("ND,DGK->NGK", (d, g, k), ("embed", "heads", "kv"),
                    to_heads)
    self.value = proj("ND,DGK->NGK", (d, g, k), ("embed", "heads", "kv"),
                      to_heads)
    self.out = proj("NHK,HKD->ND", (h, k, d), ("heads", "kv", "embed"),
                    _fan_in_init((0, 1), 2))

  def __call__(self, x_BxTxD, position: Position,
               mask_BxT: Optional[jax.Array] = None,
               step: Optional[jax.Array] = None):
    """`step` is the training step, for ops that redraw random features."""
    positions_T = jnp.arange(x_BxTxD.shape[1])
    with jax.named_scope("qkv_projection"):
      q_BxTxHxK = position.rotate(over_tokens(self.query, x_BxTxD),
                                  positions_T)
      k_BxTxGxK = position.rotate(over_tokens(self.key, x_BxTxD),
                                  positions_T)
      v_BxTxGxK = over_tokens(self.value, x_BxTxD)
    q_BxTxHxK = constrain(q_BxTxHxK, ("batch", "length", "heads", "kv"))
    with jax.named_scope("attention_op"):
      out_BxTxHxK = self.op(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK,
                            causal=self.causal, mask=mask_BxT,
                            bias=position.bias(), step=step)
    with jax.named_scope("out_projection"):
      return over_tokens(self.out, out_BxTxHxK)

  def init_state(self, batch: int, max_len: int):
    """This layer's empty decode state for up to `max_len` positions (see
    zoo/decode.py); refuses bidirectional attention and an op with no
    decodable family."""
    if not self.causal:
      raise ValueError("decoding needs causal attention (a decoder LM); this "
                       "attention is bidirectional")
    return decode.decoder(self.op).init(batch, max_len, self.num_kv_heads,
                                        self.head_dim, self.dtype)

  def decode(self, x_BxTxD, position: Position, state, index,
             step: Optional[jax.Array] = None):
    """Causal attention of T new tokens at positions index.. against the
    decode state: T > 1 prefills an empty state (index 0), T == 1 decodes
    one token. Returns (out_BxTxD, state)."""
    t = x_BxTxD.shape[1]
    positions_T = index + jnp.arange(t)
    q_BxTxHxK = position.rotate(over_tokens(self.query, x_BxTxD),
                                positions_T)
    k_BxTxGxK = position.rotate(over_tokens(self.key, x_BxTxD), positions_T)
    v_BxTxGxK = over_tokens(self.value, x_BxTxD)
    q_BxTxHxK = constrain(q_BxTxHxK, ("batch", "length", "heads", "kv"))
    decoder = decode.decoder(self.op)
    if t > 1:
      state, out_BxTxHxK = decoder.prefill(state, q_BxTxHxK, k_BxTxGxK,
                                           v_BxTxGxK, bias=position.bias(),
                                           step=step)
    else:
      state, out_BxHxK = decoder.step(state, index, q_BxTxHxK[:, 0],
                                      k_BxTxGxK[:, 0], v_BxTxGxK[:, 0],
                                      bias=position.bias(), step=step)
      out_BxTxHxK = out_BxHxK[:, None]
    return over_tokens(self.out, out_BxTxHxK), state


def over_tokens(layer, x_BxTx___):
  """`layer` applied with batch and length flattened into one token axis
  (BxTx... -> (B*T)x... and back). The weight gradient then contracts a
  single axis: with two (B and T), XLA:CPU writes a transposed copy of the
  activation gradient first (an MLP's forward+backward, timed alone, ran
  1.8x slower; experiments/step_throughput.py --profile shows the copy)."""
  b, t = x_BxTx___.shape[:2]
  y_Nx___ = layer(x_BxTx___.reshape(b * t, *x_BxTx___.shape[2:]))
  return y_Nx___.reshape(b, t, *y_Nx___.shape[1:])


class Mlp(nnx.Module):
  """D -> F -> D with GELU."""

  def __init__(self, *, embed_dim: int, mlp_dim: int, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.up = nnx.Linear(embed_dim, mlp_dim, use_bias=False, dtype=dtype,
                         param_dtype=param_dtype,
                         kernel_init=logical(_init, "embed", "mlp"), rngs=rngs)
    self.down = nnx.Linear(mlp_dim, embed_dim, use_bias=False, dtype=dtype,
                           param_dtype=param_dtype,
                           kernel_init=logical(_init, "mlp", "embed"),
                           rngs=rngs)

  def __call__(self, x_BxTxD):
    with jax.named_scope("mlp_up"):
      h_BxTxF = over_tokens(self.up, x_BxTxD)
    with jax.named_scope("gelu"):
      h_BxTxF = constrain(jax.nn.gelu(h_BxTxF), ("batch", "length", "mlp"))
    with jax.named_scope("mlp_down"):
      return over_tokens(self.down, h_BxTxF)


def rms_norm(embed_dim: int, rngs: nnx.Rngs, dtype, param_dtype):
  return nnx.RMSNorm(embed_dim, dtype=dtype, param_dtype=param_dtype,
                     scale_init=logical(nnx.initializers.ones, "embed"),
                     rngs=rngs)


class TransformerBlock(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int,
               mlp_dim: int, op: AttentionOp, causal: bool, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.attention_norm = rms_norm(embed_dim, rngs, dtype, param_dtype)
    self.attention = MultiHeadAttention(
        embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
        op=op, causal=causal, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mlp_norm = rms_norm(embed_dim, rngs, dtype, param_dtype)
    self.mlp = Mlp(embed_dim=embed_dim, mlp_dim=mlp_dim, rngs=rngs,
                   dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x_BxTxD, position: Position,
               mask_BxT: Optional[jax.Array] = None,
               step: Optional[jax.Array] = None):
    with jax.named_scope("norm"):
      h_BxTxD = self.attention_norm(x_BxTxD)
    x_BxTxD = x_BxTxD + self.attention(h_BxTxD, position, mask_BxT, step)
    with jax.named_scope("norm"):
      h_BxTxD = self.mlp_norm(x_BxTxD)
    x_BxTxD = x_BxTxD + self.mlp(h_BxTxD)
    return constrain(x_BxTxD, ("batch", "length", "embed"))

  def decode(self, x_BxTxD, position: Position, state, index,
             step: Optional[jax.Array] = None):
    """The block against its attention's decode state (see
    MultiHeadAttention.decode); returns (x_BxTxD, state)."""
    h_BxTxD, state = self.attention.decode(self.attention_norm(x_BxTxD),
                                           position, state, index, step)
    x_BxTxD = x_BxTxD + h_BxTxD
    x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
    return constrain(x_BxTxD, ("batch", "length", "embed")), state
