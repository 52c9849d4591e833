"""Shared building blocks: the model config, attention projections and
heads, MLP, norms and the pre-norm transformer block. Every attention family
and positional encoding plugs in here; nothing in this file knows which one
it runs.

Shapes: B batch, T length, D embed, H heads, G kv heads, K head dim, F mlp.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from zoo import registry
from zoo.attention.base import AttentionOp
from zoo.position.base import Position
from zoo.sharding import (BATCH, EMBED, HEADS, KV, LENGTH, MLP, constrain,
                          logical)

_init = nnx.initializers.lecun_normal()

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# model.remat: what a block keeps for the backward pass (jax.checkpoint
# policies); "none" keeps everything, as without rematerialisation.
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "matmuls": jax.checkpoint_policies.checkpoint_dots,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What shapes a model, built once from a run's config (`from_config`)
  and handed whole to every module that needs part of it. `num_classes` is
  the classifier's output size (0 for a language model); `dtype` is the
  compute dtype and `param_dtype` the parameters', by name."""

  vocab_size: int
  seq_len: int
  attention: str = "standard"
  position: str = "none"
  num_layers: int = 2
  embed_dim: int = 64
  num_heads: int = 4
  num_kv_heads: int = 4
  mlp_dim: int = 256
  num_classes: int = 0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"

  def __post_init__(self):
    for key in ("vocab_size", "seq_len", "num_layers", "embed_dim",
                "num_heads", "num_kv_heads", "mlp_dim"):
      if getattr(self, key) < 1:
        raise ValueError(f"model.{key}={getattr(self, key)} must be >= 1")
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in DTYPES:
        raise ValueError(f"model.{key}={getattr(self, key)!r}; valid: "
                         f"{', '.join(DTYPES)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r}; valid: "
                       f"{', '.join(REMAT_POLICIES)}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"model.embed_dim={self.embed_dim} must be divisible "
                       f"by model.num_heads={self.num_heads}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be divisible "
                       f"by model.num_kv_heads={self.num_kv_heads}")
    n = len(stack_specs(self.attention))
    if self.num_layers % n:
      raise ValueError(
          f"model.attention={self.attention!r} lists {n} layer specs, which "
          f"does not divide model.num_layers={self.num_layers}; list one "
          "spec, or a number of specs that divides the layers")

  @classmethod
  def from_config(cls, config, **task_args) -> "ModelConfig":
    """From a run's config (`config.model`, `config.data.seq_len`) and the
    task's model arguments (vocab_size, num_classes)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    model = {k: v for k, v in config.model.items() if k in fields}
    return cls(**model, seq_len=config.data.seq_len, **task_args)

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @property
  def parameter_dtype(self) -> Any:
    return DTYPES[self.param_dtype]

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads


def stack_specs(attention: str) -> list[str]:
  """The attention specs of a stack, `'gla;gla;standard'` (cycled over the
  layers), one per `;`-separated part."""
  specs = [spec.strip() for spec in attention.split(";")]
  if not all(specs):
    raise ValueError(f"model.attention={attention!r} has an empty layer spec; "
                     "write one spec or 'spec;spec;...'")
  return specs


def layer_ops(attention: str, num_layers: int) -> list[AttentionOp]:
  """Each layer's attention op of a stack spec (the specs cycled over
  `num_layers` layers, each op bound to its layer)."""
  specs = stack_specs(attention)
  built = {spec: registry.build("attention", spec) for spec in specs}
  return [built[specs[i % len(specs)]].for_layer(i) for i in range(num_layers)]


def stack_budget(attention: str, num_layers: int, length: int, causal: bool,
                 kv_heads: int, head_dim: int) -> dict:
  """What experiments match a stack on: keys per query (mean over layers)
  and decode-state floats per batch row (summed over layers, and their
  mean per layer) at `length`."""
  ops = layer_ops(attention, num_layers)
  state = sum(op.state_size(length, kv_heads, head_dim) for op in ops)
  return {"keys_per_query": sum(op.keys_per_query(length, causal)
                                for op in ops) / num_layers,
          "state_floats": state, "state_floats_per_layer": state / num_layers}


def _fan_in_init(in_axis, out_axis):
  """LeCun normal with the fan-in taken over `in_axis` of a multi-axis
  einsum kernel: q, k and v (DxHxK) have fan-in D, the output projection
  (HxKxD) fan-in H*K, whatever the number of heads."""
  return nnx.initializers.lecun_normal(in_axis=in_axis, out_axis=out_axis)


def build_attention_and_position(config: ModelConfig, *, causal: bool,
                                 rngs: nnx.Rngs
                                 ) -> tuple[list[AttentionOp], Position]:
  """Builds each layer's op (the stack's specs cycled over the layers, each
  op for its layer) and the position, refusing incompatible pairs before
  building the position, which may hold parameters. `causal` tells
  direction-aware encodings (T5's buckets) whether the model is a
  decoder."""
  specs = stack_specs(config.attention)
  kind = registry.get("position", registry.parse(config.position)[0]).kind
  ops = layer_ops(config.attention, config.num_layers)
  for spec, op in zip(specs, ops):
    if kind not in op.positions:
      works = [p for p in registry.names("position")
               if registry.get("position", p).kind in op.positions]
      raise ValueError(
          f"attention {spec!r} cannot take position {config.position!r} (a "
          f"{kind} encoding); with this attention use one of: "
          f"{', '.join(works)}")
  pe = registry.build("position", config.position,
                      embed_dim=config.embed_dim, num_heads=config.num_heads,
                      seq_len=config.seq_len, causal=causal, rngs=rngs,
                      param_dtype=config.parameter_dtype)
  return ops, pe


class TrainingStep(nnx.Variable):
  """The training step an attention op that redraws random structure uses
  (`AttentionOp.redraws`); set by the train step, saved with the model."""


def set_training_step(model: nnx.Module, step) -> None:
  """Sets every TrainingStep variable in `model` to `step`."""
  nnx.update(model, jax.tree.map(lambda _: jnp.asarray(step, jnp.int32),
                                 nnx.state(model, TrainingStep)))


def _constrain_state(state):
  """A decode state's leaves, laid out batch x kv heads x ... by the op
  contract, constrained to the activations' batch and heads axes."""
  return jax.tree.map(
      lambda x: constrain(x, (BATCH, HEADS) + (None,) * (x.ndim - 2))
      if x.ndim >= 2 else x, state)


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
    if op.redraws:
      self.training_step = TrainingStep(jnp.zeros((), jnp.int32))
    self.part = op.layer_part(embed_dim=d, num_heads=h, num_kv_heads=g,
                              head_dim=k, rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)

    def proj(spec, shape, names, init):
      return nnx.Einsum(spec, shape, kernel_init=logical(init, *names),
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    to_heads = _fan_in_init(0, (1, 2))
    self.query = proj("ND,DHK->NHK", (d, h, k), (EMBED, HEADS, KV), to_heads)
    self.key = proj("ND,DGK->NGK", (d, g, k), (EMBED, HEADS, KV), to_heads)
    self.value = proj("ND,DGK->NGK", (d, g, k), (EMBED, HEADS, KV), to_heads)
    self.out = proj("NHK,HKD->ND", (h, k, d), (HEADS, KV, EMBED),
                    _fan_in_init((0, 1), 2))

  def bound_op(self) -> AttentionOp:
    """The op at the model's training step (see TrainingStep)."""
    if self.op.redraws:
      return self.op.at_step(self.training_step[...])
    return self.op

  def _qkv(self, x_BxTxD, position: Position, positions_T):
    with jax.named_scope("qkv_projection"):
      q_BxTxHxK = position.rotate(over_tokens(self.query, x_BxTxD),
                                  positions_T)
      k_BxTxGxK = position.rotate(over_tokens(self.key, x_BxTxD),
                                  positions_T)
      v_BxTxGxK = over_tokens(self.value, x_BxTxD)
    return constrain(q_BxTxHxK, (BATCH, LENGTH, HEADS, KV)), k_BxTxGxK, v_BxTxGxK

  def __call__(self, x_BxTxD, position: Position,
               mask_BxT: Optional[jax.Array] = None):
    q_BxTxHxK, k_BxTxGxK, v_BxTxGxK = self._qkv(
        x_BxTxD, position, jnp.arange(x_BxTxD.shape[1]))
    gates = {}
    if self.part is not None:
      with jax.named_scope("layer_part"):
        q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, gates, _ = self.part.inputs(
            x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, None)
    with jax.named_scope("attention_op"):
      out_BxTxHxK = self.bound_op()(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK,
                                    causal=self.causal, mask=mask_BxT,
                                    bias=position.bias(), **gates)
    if self.part is not None:
      with jax.named_scope("layer_part"):
        out_BxTxHxK = self.part.output(x_BxTxD, out_BxTxHxK)
    with jax.named_scope("out_projection"):
      return over_tokens(self.out, out_BxTxHxK)

  def init_state(self, batch: int, max_len: int):
    """This layer's empty decode state for up to `max_len` positions, the
    op's own (KV cache, ring buffer, recurrent state...); refuses
    bidirectional attention."""
    if not self.causal:
      raise ValueError("decoding needs causal attention (a decoder LM); this "
                       "attention is bidirectional")
    part = None if self.part is None else self.part.init_state(batch,
                                                                self.dtype)
    return _constrain_state((self.op.init_state(
        batch, max_len, self.num_kv_heads, self.head_dim, self.dtype), part))

  def decode(self, x_BxTxD, position: Position, state, index):
    """Causal attention of T new tokens at positions index.. against the
    decode state, continuing it (`index` the Python int 0 for an empty
    state, else a traced scalar). Returns (out_BxTxD, state)."""
    t = x_BxTxD.shape[1]
    q_BxTxHxK, k_BxTxGxK, v_BxTxGxK = self._qkv(
        x_BxTxD, position, index + jnp.arange(t))
    op_state, part_state = state
    gates = {}
    if self.part is not None:
      q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, gates, part_state = self.part.inputs(
          x_BxTxD, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, part_state)
    op = self.bound_op()
    if t == 1:
      out_BxHxK, op_state = op.decode_step(
          op_state, q_BxTxHxK[:, 0], k_BxTxGxK[:, 0], v_BxTxGxK[:, 0],
          index=index, bias=position.bias(),
          **{key: x[:, 0] for key, x in gates.items()})
      out_BxTxHxK = out_BxHxK[:, None]
    else:
      out_BxTxHxK, op_state = op.prefill(
          op_state, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, index=index,
          bias=position.bias(), **gates)
    if self.part is not None:
      out_BxTxHxK = self.part.output(x_BxTxD, out_BxTxHxK)
    return (over_tokens(self.out, out_BxTxHxK),
            _constrain_state((op_state, part_state)))


def over_tokens(layer, x_BxTx___):
  """`layer` applied with batch and length flattened into one token axis
  (BxTx... -> (B*T)x... and back). The weight gradient then contracts a
  single axis: with two (B and T), XLA:CPU writes a transposed copy of the
  activation gradient first (`experiments.step_throughput --profile` shows
  the copy)."""
  b, t = x_BxTx___.shape[:2]
  y_Nx___ = layer(x_BxTx___.reshape(b * t, *x_BxTx___.shape[2:]))
  return y_Nx___.reshape(b, t, *y_Nx___.shape[1:])


class Mlp(nnx.Module):
  """D -> F -> D with GELU."""

  def __init__(self, *, embed_dim: int, mlp_dim: int, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.up = nnx.Linear(embed_dim, mlp_dim, use_bias=False, dtype=dtype,
                         param_dtype=param_dtype,
                         kernel_init=logical(_init, EMBED, MLP), rngs=rngs)
    self.down = nnx.Linear(mlp_dim, embed_dim, use_bias=False, dtype=dtype,
                           param_dtype=param_dtype,
                           kernel_init=logical(_init, MLP, EMBED), rngs=rngs)

  def __call__(self, x_BxTxD):
    with jax.named_scope("mlp_up"):
      h_BxTxF = over_tokens(self.up, x_BxTxD)
    with jax.named_scope("gelu"):
      h_BxTxF = constrain(jax.nn.gelu(h_BxTxF), (BATCH, LENGTH, MLP))
    with jax.named_scope("mlp_down"):
      return over_tokens(self.down, h_BxTxF)


def rms_norm(embed_dim: int, rngs: nnx.Rngs, dtype, param_dtype):
  return nnx.RMSNorm(embed_dim, dtype=dtype, param_dtype=param_dtype,
                     scale_init=logical(nnx.initializers.ones, EMBED),
                     rngs=rngs)


class TransformerBlock(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: ModelConfig, op: AttentionOp, *, causal: bool,
               rngs: nnx.Rngs):
    dtype, param_dtype = config.compute_dtype, config.parameter_dtype
    self.attention_norm = rms_norm(config.embed_dim, rngs, dtype, param_dtype)
    self.attention = MultiHeadAttention(
        embed_dim=config.embed_dim, num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads, op=op, causal=causal, rngs=rngs,
        dtype=dtype, param_dtype=param_dtype)
    self.mlp_norm = rms_norm(config.embed_dim, rngs, dtype, param_dtype)
    self.mlp = Mlp(embed_dim=config.embed_dim, mlp_dim=config.mlp_dim,
                   rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x_BxTxD, position: Position,
               mask_BxT: Optional[jax.Array] = None):
    with jax.named_scope("norm"):
      h_BxTxD = self.attention_norm(x_BxTxD)
    x_BxTxD = x_BxTxD + self.attention(h_BxTxD, position, mask_BxT)
    with jax.named_scope("norm"):
      h_BxTxD = self.mlp_norm(x_BxTxD)
    x_BxTxD = x_BxTxD + self.mlp(h_BxTxD)
    return constrain(x_BxTxD, (BATCH, LENGTH, EMBED))

  def decode(self, x_BxTxD, position: Position, state, index):
    """The block against its attention's decode state (see
    MultiHeadAttention.decode); returns (x_BxTxD, state)."""
    h_BxTxD, state = self.attention.decode(self.attention_norm(x_BxTxD),
                                           position, state, index)
    x_BxTxD = x_BxTxD + h_BxTxD
    x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
    return constrain(x_BxTxD, (BATCH, LENGTH, EMBED)), state
