"""Where a kernel runs: per shard of batch and heads under the ambient mesh
(XLA cannot partition a custom call or a Pallas kernel), or, where no kernel
applies, the XLA form with a warning logged once.

Shapes: B batch, T length, H heads, G kv heads.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from zoo.sharding import BATCH, HEADS


def shard_heads(run, q_BxTxHx_, *kv_BxTxGx_, segments_BxT=None):
  """run(q, *kv, segments) -> out_BxTxHx_ for a kernel that XLA cannot
  partition, given query-side q [B, T, H, ...] and kv-side arrays
  [B, T, G, ...]: under the ambient mesh it runs in `jax.shard_map` over
  batch and heads (the mesh axes the logical rules give them; an axis that
  does not divide its dimension is replicated), kv heads repeated to one
  per query head where they cannot split like the query heads. Outside a
  mesh, run itself."""
  b, _, h = q_BxTxHx_.shape[:3]
  g = kv_BxTxGx_[0].shape[2]
  mesh, batch, heads = mesh_axes(b, h)
  if mesh is None:
    return run(q_BxTxHx_, *kv_BxTxGx_, segments_BxT)
  if g % size(mesh, heads):
    kv_BxTxGx_ = tuple(jnp.repeat(x, h // g, axis=2) for x in kv_BxTxGx_)
  spec = P(batch, None, heads)
  segments_spec = None if segments_BxT is None else P(batch)
  return jax.shard_map(
      run, mesh=mesh, check_vma=False, out_specs=spec,
      in_specs=(spec,) * (1 + len(kv_BxTxGx_)) + (segments_spec,))(
          q_BxTxHx_, *kv_BxTxGx_, segments_BxT)


def mesh_axes(batch_size, num_heads):
  """(mesh, batch axes, heads axes) of the ambient mesh under the logical
  rules, an axis dropped (replicated) when it does not divide its dimension;
  (None, None, None) outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None, None, None
  batch, heads = nn.logical_to_mesh_axes((BATCH, HEADS))
  batch = batch if batch_size % size(mesh, batch) == 0 else None
  heads = heads if num_heads % size(mesh, heads) == 0 else None
  return mesh, batch, heads


def size(mesh, axes) -> int:
  """Devices along mesh axes (None, a name or a tuple of names)."""
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in names]))


_WARNED = set()


def warn_once(message):
  """Logs a fallback once per process (ops are traced once per layer)."""
  if message not in _WARNED:
    _WARNED.add(message)
    logging.warning(message)
